"""HPSv2 (Wu et al. 2023, Human Preference Score v2): ``HPSv2Score``.

HPSv2 is open_clip's ViT-H/14 CLIP fine-tuned on human preferences. Its published checkpoints
(``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are torch files holding open_clip's state
dict, under ``"state_dict"`` (what the authors' scorer loads) or bare. We do not use open_clip (it
needs torchvision): the open_clip keys are mapped onto transformers' ``CLIPModel``, whose
architecture is the same for this model:

* both towers: pre-LayerNorm blocks (LN eps 1e-5), exact GELU (ViT-H-14 is not a QuickGELU model),
  open_clip's packed ``attn.in_proj_weight`` [3W, W] is q, k, v stacked in that order, and the
  attention scale is head_dim ** -0.5 in both;
* image: ``conv1`` (no bias), the class token first, ``ln_pre`` before the blocks, ``ln_post`` on
  the class token, then ``x @ visual.proj`` (a [W, E] matrix: transformers' projection weight is
  its transpose);
* text: causal self-attention, ``ln_final``, the token at the end-of-text position (open_clip: the
  argmax of the token ids, since end-of-text has the highest id; transformers: the first end-of-text
  token, the same position), then ``x @ text_projection``.

Score: the authors' scorer computes ``image_features @ text_features.T`` of the L2-normalised
features and reports its diagonal: the cosine of image and prompt, about 0.2-0.35 for real images
(no logit_scale; their benchmark tables print it times 100). ``reward`` is ``scale * cosine``
(``scale`` 1 by default: the authors' number), and ``cosine`` is logged too.

Preprocessing (the authors' validation transform): the longest edge resized to 224 (bicubic, sizes
rounded), zero (black) padding to 224 x 224 centred, then CLIP's mean/std. Done in torch, on the
device (``match_pil`` as in :mod:`diffrl.rewards.clip`). Tokenizer: open_clip's SimpleTokenizer
uses CLIP's BPE vocabulary, which the LAION ViT-H-14 tokenizer on the hub has too (the default);
context length 77. transformers' CLIPTokenizer cleans text slightly differently from SimpleTokenizer
(ftfy and HTML unescaping), which only matters for unusual unicode.

Prompts are encoded once per distinct prompt, attention runs through ``diffrl.ops.reward_attention``
(see :mod:`diffrl.rewards.clip`). Checked on tiny random models written in the published key layout
against a float64 reference of the open_clip forward (tests/test_reward_models.py); not checked
against the real checkpoint (no weights offline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffrl.rewards import hf_attention
from diffrl.rewards.clip import PICKSCORE_PROCESSOR, ImagePreprocess, _ClipTextReward

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip's ViT-H-14: vision heads of width 80 (1280 / 16), text heads of width 64 (1024 / 16)
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64

# open_clip block -> transformers CLIPEncoderLayer (in_proj_* is split in three separately)
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_IN_PROJ = ("attn.in_proj_weight", "attn.in_proj_bias")
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",  # transposed
    "logit_scale": "logit_scale",
}
_VISION = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",  # transposed
}
_TRANSPOSED = ("text_projection", "visual.proj")
_TOWERS = (("transformer.resblocks.", "text_model.encoder.layers."),
           ("visual.transformer.resblocks.", "vision_model.encoder.layers."))


def published_keys(text_layers: int, vision_layers: int) -> list[str]:
    """The keys of an open_clip ViT CLIP state dict with these depths (what the HPSv2 files hold)."""
    keys = list(_TEXT) + list(_VISION)
    for (prefix, _), n in zip(_TOWERS, (text_layers, vision_layers)):
        keys += [f"{prefix}{i}.{k}" for i in range(n) for k in (*_BLOCK, *_IN_PROJ)]
    return keys


def _depth(state: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return max(ids) + 1 if ids else 0


def open_clip_to_transformers(state: dict, *, strict: bool = True) -> tuple[dict, dict]:
    """open_clip CLIP keys -> transformers CLIPModel keys: (the mapped state dict, the open_clip key
    of each transformers key). Missing keys are an error; keys that are not part of the architecture
    are too unless ``strict=False`` (then dropped)."""
    depths = (_depth(state, "transformer.resblocks."), _depth(state, "visual.transformer.resblocks."))
    expected = published_keys(*depths)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"HPSv2 checkpoint: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                       f"({len(missing)} of {len(expected)}; an open_clip ViT CLIP state dict was expected)")
    unknown = sorted(set(state) - set(expected))
    if unknown and strict:
        raise ValueError(f"HPSv2 checkpoint: unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''} "
                       "(not part of an open_clip ViT CLIP; pass strict=False to ignore them)")
    out, source = {}, {}
    for k, new in {**_TEXT, **_VISION}.items():
        out[new], source[new] = (state[k].t() if k in _TRANSPOSED else state[k]), k
    for (src, dst), n in zip(_TOWERS, depths):
        for i in range(n):
            for k, new in _BLOCK.items():
                out[f"{dst}{i}.{new}"], source[f"{dst}{i}.{new}"] = state[f"{src}{i}.{k}"], f"{src}{i}.{k}"
            for kind, packed in zip(("weight", "bias"), _IN_PROJ):
                q, k_, v = state[f"{src}{i}.{packed}"].chunk(3, dim=0)
                for name, t in zip("qkv", (q, k_, v)):
                    out[f"{dst}{i}.self_attn.{name}_proj.{kind}"] = t
                    source[f"{dst}{i}.self_attn.{name}_proj.{kind}"] = f"{src}{i}.{packed}"
    return out, source


def clip_config(state: dict, *, tokenizer=None, vision_head_width: int = VISION_HEAD_WIDTH,
                text_head_width: int = TEXT_HEAD_WIDTH):
    """A transformers CLIPConfig for an open_clip state dict (sizes read from the tensors' shapes;
    head counts are not in the shapes: width // head width, open_clip ViT-H-14's by default)."""
    from transformers import CLIPConfig  # noqa: PLC0415

    wv = state["visual.class_embedding"].shape[0]
    wt = state["token_embedding.weight"].shape[1]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    if grid * grid + 1 != state["visual.positional_embedding"].shape[0]:
        raise ValueError("HPSv2 checkpoint: visual.positional_embedding is not a square grid plus a class token")
    for name, w, hw in (("vision", wv, vision_head_width), ("text", wt, text_head_width)):
        if w % hw:
            raise ValueError(f"HPSv2 checkpoint: {name} width {w} is not a multiple of the head width {hw}")
    if state["visual.proj"].shape[1] != state["text_projection"].shape[1]:
        raise ValueError(f"HPSv2 checkpoint: image and text projections differ in width "
                         f"({state['visual.proj'].shape[1]} vs {state['text_projection'].shape[1]})")
    special = {}
    if tokenizer is not None:
        special = {k: getattr(tokenizer, k) for k in ("eos_token_id", "bos_token_id", "pad_token_id")
                   if getattr(tokenizer, k, None) is not None}
    text = dict(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=wt,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_depth(state, "transformer.resblocks."), num_attention_heads=wt // text_head_width,
                max_position_embeddings=state["positional_embedding"].shape[0], hidden_act="gelu",
                layer_norm_eps=1e-5, **special)
    vision = dict(hidden_size=wv, intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_depth(state, "visual.transformer.resblocks."),
                  num_attention_heads=wv // vision_head_width, image_size=grid * patch, patch_size=patch,
                  hidden_act="gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["text_projection"].shape[1])


def load_state_dict(path: str) -> dict:
    """The open_clip state dict of an HPSv2 file (under "state_dict", or the file itself)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors, possibly under 'state_dict')")
    return ckpt


@dataclass
class LongestEdgePreprocess:
    """open_clip's ``resize_longest_max`` validation transform on float [B, 3, H, W] in [0, 1]: the
    longest edge to ``size`` (bicubic; the other edge ``round(edge * size / longest)``), zero
    padding centred to ``size`` x ``size``, then mean/std."""

    size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    match_pil: bool = True

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        resize = ImagePreprocess(size={"height": nh, "width": nw}, crop_size=None, image_mean=self.image_mean,
                                 image_std=self.image_std, resample=3, do_center_crop=False, do_normalize=False,
                                 match_pil=self.match_pil)
        x = resize(images)
        ph, pw = self.size - nh, self.size - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))  # black, before normalisation
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype)[None, :, None, None]
        return ((x - mean) / std).to(dtype)


class HPSv2Score(_ClipTextReward):
    """HPSv2 / HPSv2.1: ``scale * cos(image, prompt)`` of the preference-tuned CLIP ViT-H/14 (``scale``
    1 by default, the authors' score: about 0.2-0.35). Heads: ``reward``, ``cosine``."""

    def __init__(self, model, tokenizer, preprocess, *, scale: float = 1.0, attention_backend: str = "auto"):
        super().__init__(model, tokenizer, preprocess, attention_backend=attention_backend)
        self.scale = float(scale)

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer=PICKSCORE_PROCESSOR, scale: float = 1.0, device=None,
                        dtype=None, attn_implementation: str = hf_attention.NAME, attention_backend: str = "auto",
                        match_pil: bool = True, strict: bool = True, vision_head_width: int = VISION_HEAD_WIDTH,
                        text_head_width: int = TEXT_HEAD_WIDTH):
        """``path``: an HPSv2 ``.pt`` file (open_clip state dict, possibly under "state_dict");
        ``tokenizer``: a CLIP BPE tokenizer or where to load one (default the LAION ViT-H-14 repository,
        the same vocabulary as open_clip's); ``strict=False`` ignores keys that are not part of the
        model (missing keys are always an error); the head widths give the head counts (open_clip
        ViT-H-14's by default)."""
        from transformers import AutoTokenizer, CLIPModel  # noqa: PLC0415

        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        state = load_state_dict(path)
        mapped, source = open_clip_to_transformers(state, strict=strict)
        config = clip_config(state, tokenizer=tokenizer, vision_head_width=vision_head_width,
                             text_head_width=text_head_width)
        with torch.device("meta"):  # the shapes the config implies, without allocating
            shapes = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
        bad = sorted({source[k] for k, v in mapped.items() if k in shapes and v.shape != shapes[k]})
        if bad:
            raise ValueError(f"HPSv2 checkpoint: tensors whose shapes do not fit the model's: {bad[:8]}"
                             f"{' ...' if len(bad) > 8 else ''}")
        vocab = config.text_config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint embeds {vocab}")
        dtype = dtype or torch.float32
        mapped = {k: v.to(dtype) for k, v in mapped.items()}
        if attn_implementation == hf_attention.NAME:
            hf_attention.register()
        model = CLIPModel.from_pretrained(None, config=config, state_dict=mapped, dtype=dtype,
                                          attn_implementation=attn_implementation)
        if device is not None:
            model = model.to(device)
        model = model.eval().requires_grad_(False)
        preprocess = LongestEdgePreprocess(size=config.vision_config.image_size, match_pil=match_pil)
        return cls(model, tokenizer, preprocess, scale=scale, attention_backend=attention_backend)

    def from_cosine(self, cos):
        return self.scale * cos

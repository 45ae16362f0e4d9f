"""ImageReward (Xu et al. 2023): ``ImageRewardScore``.

ImageReward is BLIP's image-grounded text encoder with a scalar head: a ViT-L/16 image encoder
(timm layout, LN eps 1e-6, exact GELU, packed ``qkv`` with bias, final ``norm`` on every token), a
BERT-base text encoder ("med" config: word + absolute position embeddings, no token types, post-LN
with eps 1e-12) whose every layer runs self-attention over the prompt, then cross-attention from
the prompt to all image tokens, then its feed-forward. The first token's ([CLS]) output goes
through the MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (the improved-aesthetic-predictor head with
dropouts and no activations, :class:`diffrl.rewards.clip.AestheticHead`), and the score is
``(mlp - 0.16717362830052426) / 1.0333394966054072``; the constants are the ones THUDM/ImageReward's
``ImageReward.py`` sets as ``self.mean`` / ``self.std``.

The published checkpoint ``ImageReward.pt`` is the torch state dict of that model, keys
``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``. The modules here use the same
names, so it loads as it is (``blip.vision_proj`` / ``blip.text_proj`` / ``blip.itm_head``, BLIP
heads the score does not use, and the text encoder's ``position_ids`` buffer are skipped; other
unknown keys are an error unless ``strict=False``; missing keys always are). transformers' BLIP text
model builds its cross-attention only as a decoder and does not use the attention-function
registry, hence our own modules; attention runs through ``diffrl.ops.reward_attention`` (via
:func:`diffrl.rewards.hf_attention.attention_forward`: the prompt lengths for the text
self-attention, SDPA with the same semantics on a CPU).

Preprocessing (the authors' torchvision transform): the shortest edge resized to 224 (bicubic),
centre crop 224 (torchvision's rounding of the offsets), CLIP's mean/std, in torch on the device
(``match_pil`` as in :mod:`diffrl.rewards.clip`; ``match_pil=False`` is differentiable). Tokenizer:
BERT's ``bert-base-uncased`` with ``[DEC]`` and ``[ENC]`` added as BLIP does (vocabulary 30524),
prompts truncated to 35 tokens as the authors do ([CLS] first: the scorer does not swap in [ENC]).

Prompts are tokenised and embedded once per distinct prompt; the text encoder itself runs once
per image (its cross-attention reads that image from the first layer on), padded to the longest
prompt instead of 35 (padded keys are masked: the same result). Checked on tiny random models
written in the published key layout against a float64 reference (tests/test_reward_models.py);
not checked against the real checkpoint (no weights offline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffrl.rewards import hf_attention
from diffrl.rewards.base import Reward
from diffrl.rewards.clip import AestheticHead, ImagePreprocess

MEAN = 0.16717362830052426  # THUDM/ImageReward, ImageReward.py: self.mean / self.std of the raw head output
STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # ViT-L/16: 1024 / 16 heads; BERT-base: 768 / 12
# in the published file, not used by the score
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")
_UNUSED_KEYS = ("blip.text_encoder.embeddings.position_ids",)


def _attend(module: nn.Module, q, k, v, lens):
    """[B, L, H*D] projections -> attention output [B, Lq, H*D] through reward_attention."""
    B, Lq, _ = q.shape
    h = module.heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)

    out, _ = hf_attention.attention_forward(module, split(q), split(k), split(v), lens)
    return out.reshape(B, Lq, -1)


# ----------------------------------------------------------------------------------------------
# the image encoder (BLIP's timm-style ViT)


class _PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)


class _VitAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # packed q, k, v (timm's order)
        return self.proj(_attend(self, q, k, v, None))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _VitAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _Mlp(width, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipVisionEncoder(nn.Module):
    """BLIP's ViT: pixels [B, 3, S, S] -> every token, normalised, [B, 1 + (S / patch)^2, W]."""

    def __init__(self, width: int, depth: int, heads: int, mlp: int, patch: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.patch_embed = _PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(_VitBlock(width, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------
# the text encoder (BLIP's med BertModel with cross-attention in every layer)


class _BertSelfAttention(nn.Module):
    def __init__(self, width: int, kv_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)


class _BertProjection(nn.Module):
    """dense, then LayerNorm of (it + the residual): BERT's post-LN sub-layer output."""

    def __init__(self, n_in: int, width: int):
        super().__init__()
        self.dense = nn.Linear(n_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, width: int, kv_width: int, heads: int):
        super().__init__()
        self.self = _BertSelfAttention(width, kv_width, heads)
        self.output = _BertProjection(width, width)

    def forward(self, x, kv, lens):
        a = self.self
        return self.output(_attend(a, a.query(x), a.key(kv), a.value(kv), lens), x)


class _BertIntermediate(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(width, hidden)


class _BertLayer(nn.Module):
    def __init__(self, width: int, image_width: int, heads: int, hidden: int):
        super().__init__()
        self.attention = _BertAttention(width, width, heads)
        self.crossattention = _BertAttention(width, image_width, heads)
        self.intermediate = _BertIntermediate(width, hidden)
        self.output = _BertProjection(hidden, width)

    def forward(self, x, lens, image):
        x = self.attention(x, x, lens)
        x = self.crossattention(x, image, None)  # every image token is real: no mask
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, width: int, max_positions: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.LayerNorm = nn.LayerNorm(width, eps=1e-12)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class _BertEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class BlipTextEncoder(nn.Module):
    """BLIP's image-grounded text encoder: token embeddings [B, L, W] (right padded, ``lens`` [B]
    real tokens) and image tokens [B, N, Wv] -> hidden states [B, L, W]."""

    def __init__(self, vocab: int, width: int, depth: int, heads: int, hidden: int, max_positions: int,
                 image_width: int):
        super().__init__()
        self.embeddings = _BertEmbeddings(vocab, width, max_positions)
        self.encoder = _BertEncoder(_BertLayer(width, image_width, heads, hidden) for _ in range(depth))

    def forward(self, embedded, lens, image):
        x = embedded
        for layer in self.encoder.layer:
            x = layer(x, lens, image)
        return x


class ImageRewardModel(nn.Module):
    """The ImageReward network under the published state-dict names (``blip.*``, ``mlp.layers.*``)."""

    def __init__(self, *, vision: dict, text: dict, head_dim: int):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = BlipVisionEncoder(**vision)
        self.blip.text_encoder = BlipTextEncoder(**text)
        self.mlp = AestheticHead(head_dim)

    @staticmethod
    def config_from_state(state: dict, *, vision_head_width: int = HEAD_WIDTH,
                          text_head_width: int = HEAD_WIDTH) -> dict:
        """Constructor arguments read from the tensors' shapes (head counts: width // head width)."""
        v, t = "blip.visual_encoder.", "blip.text_encoder."
        need = [v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "blocks.0.mlp.fc1.weight",
                t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight",
                t + "encoder.layer.0.intermediate.dense.weight",
                t + "encoder.layer.0.crossattention.self.key.weight", "mlp.layers.0.weight"]
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"ImageReward checkpoint: missing keys {missing} (a BLIP + MLP state dict with "
                             "blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.* was expected)")
        wv = state[v + "cls_token"].shape[-1]
        patch = state[v + "patch_embed.proj.weight"].shape[-1]
        grid = round((state[v + "pos_embed"].shape[1] - 1) ** 0.5)
        if grid * grid + 1 != state[v + "pos_embed"].shape[1]:
            raise ValueError("ImageReward checkpoint: pos_embed is not a square grid plus a class token")
        vocab, wt = state[t + "embeddings.word_embeddings.weight"].shape
        for name, w, hw in (("vision", wv, vision_head_width), ("text", wt, text_head_width)):
            if w % hw:
                raise ValueError(f"ImageReward checkpoint: {name} width {w} is not a multiple of the head width {hw}")
        image_width = state[t + "encoder.layer.0.crossattention.self.key.weight"].shape[1]
        if image_width != wv:
            raise ValueError(f"ImageReward checkpoint: the cross-attention reads {image_width}-wide image tokens "
                             f"but the image encoder is {wv} wide")
        if state["mlp.layers.0.weight"].shape[1] != wt:
            raise ValueError(f"ImageReward checkpoint: the MLP takes {state['mlp.layers.0.weight'].shape[1]} "
                             f"features but the text encoder is {wt} wide")
        return dict(
            vision=dict(width=wv, depth=_depth(state, v + "blocks."), heads=wv // vision_head_width,
                        mlp=state[v + "blocks.0.mlp.fc1.weight"].shape[0], patch=patch, image_size=grid * patch),
            text=dict(vocab=vocab, width=wt, depth=_depth(state, t + "encoder.layer."), heads=wt // text_head_width,
                      hidden=state[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                      max_positions=state[t + "embeddings.position_embeddings.weight"].shape[0],
                      image_width=wv),
            head_dim=wt)


def _depth(state: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = [int(m.group(1)) for k in state if (m := pat.match(k))]
    return max(ids) + 1 if ids else 0


def load_state_dict(path: str) -> dict:
    """The state dict of an ImageReward file (the file itself, or under "state_dict")."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{path}: not a state dict (a dict of tensors)")
    return ckpt


@dataclass
class ShortEdgePreprocess:
    """torchvision's ``Resize(size)`` (bicubic; shortest edge to ``size``) + ``CenterCrop(size)`` +
    normalisation, on float [B, 3, H, W] in [0, 1]."""

    size: int = 224
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    match_pil: bool = True

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        resize = ImagePreprocess(size={"shortest_edge": self.size}, crop_size=None, image_mean=self.image_mean,
                                 image_std=self.image_std, resample=3, do_center_crop=False, do_normalize=False,
                                 match_pil=self.match_pil)
        x = resize(images)
        h, w = x.shape[-2:]
        # torchvision rounds the offsets (half to even), transformers floors them
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        x = x[..., top:top + self.size, left:left + self.size]
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype)[None, :, None, None]
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype)[None, :, None, None]
        return ((x - mean) / std).to(dtype)


def blip_tokenizer(name_or_path: str):
    """BERT's tokenizer with BLIP's two added tokens ([DEC] as bos, [ENC]), as BLIP builds it."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScore(Reward):
    """ImageReward: ``(mlp(text_encoder(prompt | image)[CLS]) - mean) / std`` (roughly -2 to 2 for
    real images). Head: ``reward``."""

    heads = ("reward",)

    def __init__(self, model: ImageRewardModel, tokenizer, preprocess: ShortEdgePreprocess, *,
                 attention_backend: str = "auto", max_length: int = MAX_PROMPT_TOKENS):
        self.model = model.eval().requires_grad_(False)
        self.model.mlp.to(torch.float32)  # the head in float32, as the authors cast its input
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # reward_attention reads lengths of right-padded prompts
        self.preprocess = preprocess
        self.max_length = int(max_length)
        self.set_attention_backend(attention_backend)

    def set_attention_backend(self, backend: str) -> None:
        """The ``reward_attention`` backend ("auto", "torch", "triton", "flash_attn")."""
        hf_attention.set_backend(self.model, backend)

    @property
    def device(self) -> torch.device:
        return self.model.blip.visual_encoder.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.blip.visual_encoder.cls_token.dtype

    @classmethod
    def from_pretrained(cls, path: str, *, tokenizer="bert-base-uncased", device=None, dtype=None,
                        attention_backend: str = "auto", match_pil: bool = True, strict: bool = True,
                        vision_head_width: int = HEAD_WIDTH, text_head_width: int = HEAD_WIDTH):
        """``path``: ``ImageReward.pt`` (the state dict); ``tokenizer``: a BERT tokenizer, or where to
        load one (BLIP's [DEC]/[ENC] are then added); ``strict=False`` ignores unknown keys (missing
        keys are always an error); head widths give the head counts (ViT-L's and BERT-base's: 64)."""
        if isinstance(tokenizer, str):
            tokenizer = blip_tokenizer(tokenizer)
        state = load_state_dict(path)
        config = ImageRewardModel.config_from_state(state, vision_head_width=vision_head_width,
                                                    text_head_width=text_head_width)
        with torch.device("meta"):
            model = ImageRewardModel(**config)
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"ImageReward checkpoint: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                             f" ({len(missing)} of {len(expected)})")
        skipped = {k for k in state if k in _UNUSED_KEYS or k.startswith(_UNUSED)}
        unknown = sorted(set(state) - expected - skipped)
        if unknown and strict:
            raise ValueError(f"ImageReward checkpoint: unknown keys {unknown[:8]}{' ...' if len(unknown) > 8 else ''}"
                             " (not part of ImageReward; pass strict=False to ignore them)")
        dtype = dtype or torch.float32
        weights = {k: state[k].to(torch.float32 if k.startswith("mlp.") else dtype) for k in expected}
        model.load_state_dict(weights, strict=True, assign=True)
        if device is not None:
            model = model.to(device)
        vocab = config["text"]["vocab"]
        if len(tokenizer) > vocab:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint embeds {vocab}")
        preprocess = ShortEdgePreprocess(size=config["vision"]["image_size"], match_pil=match_pil)
        return cls(model, tokenizer, preprocess, attention_backend=attention_backend,
                   max_length=min(MAX_PROMPT_TOKENS, config["text"]["max_positions"]))

    def tokens(self, prompts: list[str]):
        """(ids [P, L], lengths [P], index [B]) of the distinct prompts, right padded to the longest."""
        first = {}
        index = [first.setdefault(p, len(first)) for p in prompts]
        tok = self.tokenizer(list(first), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        lens = tok["attention_mask"].sum(-1).to(torch.int32)
        return tok["input_ids"].to(self.device), lens.to(self.device), torch.tensor(index, device=self.device)

    @torch.no_grad()
    def score(self, images, prompts, group_ids):
        blip = self.model.blip
        ids, lens, index = self.tokens(prompts)
        image = blip.visual_encoder(self.preprocess(images.to(self.device), dtype=self.dtype))
        embedded = blip.text_encoder.embeddings(ids)[index]  # once per distinct prompt
        hidden = blip.text_encoder(embedded, lens[index], image)
        raw = self.model.mlp(hidden[:, 0].float())[:, 0]
        return {"reward": ((raw - MEAN) / STD).to(images.device)}

"""CLIP-based rewards: ``CLIPScore``, ``PickScore``, ``AestheticScore``.

Each loads a published checkpoint with ``from_pretrained(path_or_hub_id)`` (a local folder in the
hub layout, or a hub id resolved by transformers' cache) and scores a batch in a few batched
calls on the model's device:

* images: preprocessed in torch as the checkpoint's ``preprocessor_config.json`` says (resize of
  the shortest edge, bicubic with antialiasing, centre crop, normalise with its mean/std), batched
  on the device, no PIL round trip, no torchvision. The published scorers hand CLIPImageProcessor
  uint8 PIL images, which PIL resizes in two passes (horizontal, then vertical) rounding to uint8
  after each; ``match_pil=True`` (the default) does the same in torch: the pixel values then agree
  with CLIPImageProcessor's exactly on almost every pixel, a few differing by one or two uint8
  steps (PIL's fixed-point filter weights round differently; measured: none to 3% of the pixels
  by one step, depending on the scale factor).
  ``match_pil=False`` resizes the float image in one pass without rounding.
* prompts: each distinct prompt is tokenised and encoded once per batch (padded to the longest
  distinct prompt, not to 77) and its embedding indexed by the images that share it.
* attention: transformers' CLIP model with ``attn_implementation="diffrl"``
  (:mod:`diffrl.rewards.hf_attention`): ``diffrl.ops.reward_attention`` with the prompts' lengths.

Rewards are computed without gradients (``torch.no_grad``; ``differentiable=True`` keeps the images'
gradient for reward backpropagation, with ``match_pil=False``) and returned as float32 [B] on the
images' device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffrl.rewards import hf_attention
from diffrl.rewards.base import Reward

CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"

# PIL resampling codes (what preprocessor_config.json stores) -> torch interpolate modes
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


# ----------------------------------------------------------------------------------------------
# preprocessing


@dataclass
class ImagePreprocess:
    """CLIPImageProcessor's resize / centre crop / normalise, on float [B, 3, H, W] in [0, 1], in torch."""

    size: dict
    crop_size: dict | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    match_pil: bool = True

    @classmethod
    def from_dict(cls, cfg: dict, match_pil: bool = True) -> ImagePreprocess:
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # old configs store a bare int: the shortest edge
            size = {"shortest_edge": size}
        crop = cfg.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        resample = int(cfg.get("resample", 3))
        if resample not in _RESAMPLE:
            raise ValueError(f"preprocessor_config.json: resample={resample} (a PIL filter) has no torch equivalent "
                             f"here; supported: {sorted(_RESAMPLE)} (nearest, bilinear, bicubic)")
        return cls(size=dict(size), crop_size=dict(crop) if crop else None,
                   image_mean=tuple(cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
                   image_std=tuple(cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
                   resample=resample, do_resize=bool(cfg.get("do_resize", True)),
                   do_center_crop=bool(cfg.get("do_center_crop", True)),
                   do_normalize=bool(cfg.get("do_normalize", True)),
                   match_pil=match_pil)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, match_pil: bool = True) -> ImagePreprocess:
        return cls.from_dict(_load_json(path_or_hub_id, "preprocessor_config.json"), match_pil=match_pil)

    def resize_shape(self, h: int, w: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            s = int(self.size["shortest_edge"])
            # transformers' rule (torchvision's): the short edge becomes s, the long one int(s * long / short)
            if (h <= w and h == s) or (w <= h and w == s):
                return h, w
            if w < h:
                return int(s * h / w), s
            return s, int(s * w / h)
        return int(self.size["height"]), int(self.size["width"])

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = images.float()
        if self.match_pil:
            x = _to_uint8_steps(x)
        if self.do_resize:
            h, w = self.resize_shape(x.shape[-2], x.shape[-1])
            if self.match_pil:
                # PIL: a horizontal pass, then a vertical one, each rounded to uint8
                if w != x.shape[-1]:
                    x = _to_uint8_steps(self._resize(x, (x.shape[-2], w)))
                if h != x.shape[-2]:
                    x = _to_uint8_steps(self._resize(x, (h, w)))
            elif (h, w) != tuple(x.shape[-2:]):
                # clamped as PIL's output is: bicubic overshoots at edges
                x = self._resize(x, (h, w)).clamp(0.0, 1.0)
        if self.do_center_crop and self.crop_size:
            x = _center_crop(x, int(self.crop_size["height"]), int(self.crop_size["width"]))
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype)[None, :, None, None]
            std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype)[None, :, None, None]
            x = (x - mean) / std
        return x.to(dtype)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        mode = _RESAMPLE[self.resample]
        # antialias: when shrinking, the filter widens with the scale, as PIL's does
        kw = {"antialias": True, "align_corners": False} if mode != "nearest" else {}
        return F.interpolate(x, size=size, mode=mode, **kw)


def _to_uint8_steps(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).round() / 255.0


def _center_crop(x: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < ch or w < cw:  # too small: zero-pad around it first, as transformers does
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top:top + ch, left:left + cw]


def _resolve_file(path_or_hub_id: str, filename: str) -> str:
    if os.path.isdir(path_or_hub_id):
        path = os.path.join(path_or_hub_id, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path_or_hub_id} has no {filename}")
        return path
    from transformers.utils import cached_file  # noqa: PLC0415

    return cached_file(path_or_hub_id, filename)


def _load_json(path_or_hub_id: str, filename: str) -> dict:
    with open(_resolve_file(path_or_hub_id, filename)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# the CLIP scorers


def _features(out) -> torch.Tensor:
    # transformers 5 returns the model output with the projected pooler_output; 4.x a tensor
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _load_clip(cls_name: str, path: str, *, dtype, device, attn_implementation: str, **kwargs):
    import transformers  # noqa: PLC0415

    if attn_implementation == hf_attention.NAME:
        hf_attention.register()
    model_cls = getattr(transformers, cls_name)
    model = model_cls.from_pretrained(path, attn_implementation=attn_implementation,
                                      **({"dtype": dtype} if dtype is not None else {}), **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


class _ClipReward(Reward):
    """Shared machinery: the model, its preprocessing, the device hand-over, the attention backend."""

    def __init__(self, model: nn.Module, preprocess: ImagePreprocess, *, attention_backend: str = "auto",
                 differentiable: bool = False):
        if differentiable and preprocess.match_pil:
            raise ValueError(f"{type(self).__name__}: differentiable=True needs match_pil=False (PIL's uint8 "
                             "rounding has no gradient)")
        self.model = model.eval()
        self.preprocess = preprocess
        # reward backprop: the score is then a torch function of the images (the frozen model's weights get no
        # gradient; the attention runs diffrl's reference under autograd)
        self.differentiable = bool(differentiable)
        self.set_attention_backend(attention_backend)

    def _grad(self):
        return torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled())

    def set_attention_backend(self, backend: str) -> None:
        """The ``reward_attention`` backend the "diffrl" attention uses ("auto", "torch", "triton", "flash_attn")."""
        hf_attention.set_backend(self.model, backend)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings [B, E] of checked images."""
        pixels = self.preprocess(images.to(self.device), dtype=self.dtype)
        if hasattr(self.model, "get_image_features"):
            emb = _features(self.model.get_image_features(pixel_values=pixels))
        else:  # CLIPVisionModelWithProjection
            emb = self.model(pixel_values=pixels).image_embeds
        return F.normalize(emb.float(), dim=-1)


class _ClipTextReward(_ClipReward):
    """A CLIP model scoring images against their prompts (the text tower runs once per distinct prompt)."""

    heads = ("reward", "cosine")

    def __init__(self, model, tokenizer, preprocess: ImagePreprocess, *, attention_backend: str = "auto",
                 differentiable: bool = False):
        super().__init__(model, preprocess, attention_backend=attention_backend, differentiable=differentiable)
        self.tokenizer = tokenizer
        # the diffrl attention reads lengths from a right-padded mask (CLIP tokenizers pad right already)
        self.tokenizer.padding_side = "right"
        limit = getattr(model.config.text_config, "max_position_embeddings", 77)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, processor: str | None = None, device=None, dtype=None,
                        attn_implementation: str = hf_attention.NAME, attention_backend: str = "auto",
                        match_pil: bool | None = None, differentiable: bool = False, **kwargs):
        """Load a transformers CLIPModel checkpoint; the tokenizer and ``preprocessor_config.json`` come
        from ``processor`` (default: the same path). ``attn_implementation`` other than "diffrl"
        ("eager", "sdpa") gives transformers' own attention (for comparisons); ``match_pil``: see
        the module docstring (default True, False with ``differentiable``); ``differentiable``: the
        score keeps the images' gradient (reward backprop); other keywords go to transformers'
        ``from_pretrained``."""
        from transformers import AutoTokenizer  # noqa: PLC0415

        processor = processor or path_or_hub_id
        model = _load_clip("CLIPModel", path_or_hub_id, dtype=dtype, device=device,
                           attn_implementation=attn_implementation, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(processor)
        match_pil = not differentiable if match_pil is None else match_pil
        return cls(model, tokenizer, ImagePreprocess.from_pretrained(processor, match_pil),
                   attention_backend=attention_backend, differentiable=differentiable)

    def text_embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised float32 embeddings [P, E] of the distinct prompts, index [B] of each prompt's row)."""
        first = {}
        index = [first.setdefault(p, len(first)) for p in prompts]
        tok = self.tokenizer(list(first), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        emb = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                     attention_mask=tok["attention_mask"].to(self.device)))
        return F.normalize(emb.float(), dim=-1), torch.tensor(index, device=self.device)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.image_embeds(images)
        txt, index = self.text_embeds(prompts)
        return (img * txt[index]).sum(dim=-1)

    def from_cosine(self, cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, images, prompts, group_ids):
        with self._grad():
            cos = self.cosine(images, prompts)
            return {"reward": self.from_cosine(cos).to(images.device), "cosine": cos.to(images.device)}


class CLIPScore(_ClipTextReward):
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(image, prompt), 0)`` with ``w = 2.5``, on a
    transformers CLIP checkpoint (default ``openai/clip-vit-large-patch14``). Heads: ``reward``,
    ``cosine``. (torchmetrics' CLIPScore is ``100 * max(cos, 0)``: pass ``w=100``.)"""

    def __init__(self, model, tokenizer, preprocess, *, w: float = 2.5, attention_backend: str = "auto",
                 differentiable: bool = False):
        super().__init__(model, tokenizer, preprocess, attention_backend=attention_backend,
                         differentiable=differentiable)
        self.w = float(w)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str = CLIP_VIT_L14, *, w: float = 2.5, **kwargs):
        obj = super().from_pretrained(path_or_hub_id, **kwargs)
        obj.w = float(w)
        return obj

    def from_cosine(self, cos):
        return self.w * cos.clamp_min(0.0)


class PickScore(_ClipTextReward):
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(image, prompt)`` of the
    PickScore_v1 CLIP-H model, with the LAION CLIP-ViT-H-14 tokenizer and preprocessing (the
    checkpoint repository ships neither). Heads: ``reward`` (about 18-24 for real images; Flow-GRPO
    trains on ``reward / 26``), ``cosine``."""

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str = PICKSCORE, *, processor: str | None = None, **kwargs):
        if processor is None:
            processor = PICKSCORE_PROCESSOR if path_or_hub_id == PICKSCORE else path_or_hub_id
        return super().from_pretrained(path_or_hub_id, processor=processor, **kwargs)

    def from_cosine(self, cos):
        return self.model.logit_scale.detach().float().exp().to(cos.device) * cos


class AestheticHead(nn.Module):
    """LAION's improved aesthetic predictor head (state-dict keys ``layers.0.weight`` ... ``layers.7.bias``)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticScore(_ClipReward):
    """LAION's aesthetic score (DDPO's aesthetic reward): the MLP head on L2-normalised CLIP
    ViT-L/14 image embeddings; prompts are ignored (their number is checked). Head: ``reward``
    (roughly 1-10)."""

    heads = ("reward",)

    def __init__(self, model, head: AestheticHead, preprocess: ImagePreprocess, *, attention_backend: str = "auto",
                 differentiable: bool = False):
        super().__init__(model, preprocess, attention_backend=attention_backend, differentiable=differentiable)
        self.head = head.eval().requires_grad_(False).to(device=self.device, dtype=torch.float32)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, *, clip: str = CLIP_VIT_L14, filename: str = AESTHETIC_FILENAME,
                        device=None, dtype=None, attn_implementation: str = hf_attention.NAME,
                        attention_backend: str = "auto", match_pil: bool | None = None, differentiable: bool = False,
                        **kwargs):
        """``path_or_hub_id``: the head's ``.pth`` state dict (LAION's
        ``sac+logos+ava1-l14-linearMSE.pth``), a folder holding ``filename``, or a hub id whose
        repository holds it; ``clip``: the CLIP checkpoint whose image tower it reads."""
        path = path_or_hub_id if os.path.isfile(path_or_hub_id) else _resolve_file(path_or_hub_id, filename)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "layers.0.weight" not in state:
            raise ValueError(f"{path}: not an aesthetic-predictor state dict (no 'layers.0.weight'; "
                             f"keys {sorted(state)[:5]} ...)")
        head = AestheticHead(state["layers.0.weight"].shape[1])
        head.load_state_dict(state, strict=True)
        from transformers import AutoConfig  # noqa: PLC0415

        # the image tower and its projection only (no text tower in memory); a full CLIP config keeps
        # the projection width at its top level, which the vision config may not repeat
        config = AutoConfig.from_pretrained(clip)
        if hasattr(config, "vision_config"):
            projection_dim = config.projection_dim
            config = config.vision_config
            config.projection_dim = projection_dim
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the text tower's weights are skipped on purpose: no load report
        try:
            model = _load_clip("CLIPVisionModelWithProjection", clip, dtype=dtype, device=device,
                               attn_implementation=attn_implementation, config=config, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        proj = model.config.projection_dim
        if proj != head.layers[0].in_features:
            raise ValueError(f"the aesthetic head takes {head.layers[0].in_features}-dim embeddings but {clip} "
                             f"projects to {proj}")
        match_pil = not differentiable if match_pil is None else match_pil
        return cls(model, head, ImagePreprocess.from_pretrained(clip, match_pil), attention_backend=attention_backend,
                   differentiable=differentiable)

    def score(self, images, prompts, group_ids):
        with self._grad():
            return {"reward": self.head(self.image_embeds(images))[:, 0].to(images.device)}

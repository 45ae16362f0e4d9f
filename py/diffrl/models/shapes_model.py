"""A tiny text-conditioned rectified-flow model of the shapes world, and its diffusers-style pipeline.

Components (all ``ModelMixin + ConfigMixin``, so ``save_pretrained``/``from_pretrained`` write and read
``config.json`` + safetensors, and :class:`ShapesPipeline` loads them offline from a folder):

- :class:`ShapesTokenizer` -- word-level tokenizer for the prompt grammar of :mod:`diffrl.models.shapes`.
  Every sequence starts with ``<bos>`` (so the empty prompt, used as the classifier-free-guidance null
  prompt, is ``[<bos>]`` and no attention row is ever fully masked), then one id per word, padded with
  ``<pad>`` (id 0) to ``max_length``. It has no weights: its folder holds only ``config.json`` (vocab,
  max_length). It is a ModelMixin only so that ``DiffusionPipeline`` finds its save/load methods.
- :class:`ShapesTextEncoder` -- token + position embeddings and a few pre-norm transformer layers;
  returns per-token states ``[B, L, D]`` and a masked-mean pooled vector ``[B, D]``.
- :class:`ShapesDiT` -- a small DiT in *pixel space* (no VAE: a 32x32x3 image is already tiny). Patch 4
  -> 64 tokens; each block has adaLN-Zero modulation from (timestep embedding + pooled text), self-
  attention over patches, cross-attention to the text tokens and an MLP. It predicts the rectified-flow
  velocity ``v = eps - x0`` for ``x_t = (1 - t) x0 + t eps`` (SD3 / FlowMatchEulerDiscreteScheduler
  convention: sigma = t in [0, 1], ``timestep = 1000 t``).

Model space: images in [-1, 1] (``x = 2 img - 1``); :meth:`ShapesPipeline.decode` maps back to [0, 1].
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.utils.torch_utils import randn_tensor

from diffrl.models.shapes import COLORS, NUMBERS, RELATIONS, SHAPES

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"


def default_vocab() -> list[str]:
    """Special tokens, then every word the grammar (and parse_prompt's aliases) can produce."""
    words = ["an", "one", *NUMBERS.values(), *COLORS, *SHAPES, *(s + "s" for s in SHAPES), "and", "to", "the"]
    for rel in RELATIONS:
        words += rel.split()
    out = [PAD, BOS, UNK]
    for w in words:
        if w not in out:
            out.append(w)
    return out


class ShapesTokenizer(ModelMixin, ConfigMixin):
    """Word-level tokenizer: ``tok(prompts) -> {"input_ids": long [B, L], "attention_mask": long [B, L]}``.

    Lower-cases, drops a final period, splits on whitespace; unknown words map to ``<unk>``. Prompts
    longer than ``max_length - 1`` words are truncated. ``decode(ids)`` inverts it (special tokens dropped).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, vocab: list[str] | None = None, max_length: int = 12):
        super().__init__()
        vocab = list(vocab) if vocab is not None else default_vocab()
        if vocab[:3] != [PAD, BOS, UNK]:
            raise ValueError(f"vocab must start with {PAD}, {BOS}, {UNK}")
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        self.vocab = vocab
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.max_length = int(max_length)
        self.pad_token_id, self.bos_token_id, self.unk_token_id = 0, 1, 2
        # an empty, unsaved buffer: DiffusionPipeline.device/.dtype ask every module for one
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(prompt: str) -> list[str]:
        text = prompt.strip().lower()
        text = re.sub(r"\.\s*$", "", text)
        return text.split()

    def encode(self, prompt: str) -> list[int]:
        ids = [self.bos_token_id] + [self.ids.get(w, self.unk_token_id) for w in self.words(prompt)]
        return ids[: self.max_length]

    def __call__(self, prompts: str | list[str], device=None) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.max_length), dtype=torch.long)
        for i, p in enumerate(prompts):
            e = self.encode(p)
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in ids if i >= 3)

    def forward(self, *args, **kwargs):  # nn.Module API; the tokenizer is called, not forwarded
        return self(*args, **kwargs)

    # config-only serialisation: ModelMixin's would look for a (here empty) weights file
    def save_pretrained(self, save_directory, **kwargs):
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        config = cls.load_config(pretrained_model_name_or_path, subfolder=kwargs.get("subfolder"))
        return cls.from_config(config)


class _MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class _Attention(nn.Module):
    """Multi-head attention via SDPA; ``mask`` (bool [B, Lk], True = attend) masks keys.

    The projections carry diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so that the
    LoRA targets used for SD3 / SD / FLUX (``diffrl.trainers.DEFAULT_LORA_TARGETS``) fit this model too."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim or dim, dim)
        self.to_v = nn.Linear(kv_dim or dim, dim)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, ctx=None, mask=None):
        ctx = x if ctx is None else ctx
        b, n, d = x.shape
        h, m = self.heads, ctx.shape[1]
        q = self.to_q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.to_k(ctx).view(b, m, h, d // h).transpose(1, 2)
        v = self.to_v(ctx).view(b, m, h, d // h).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(y.transpose(1, 2).reshape(b, n, d))


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """``(input_ids [B, L], attention_mask [B, L]) -> (hidden [B, L, D], pooled [B, D])``."""

    @register_to_config
    def __init__(self, vocab_size: int = 32, max_length: int = 12, dim: int = 128, num_layers: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            self.layers.append(nn.ModuleDict(dict(n1=nn.LayerNorm(dim), attn=_Attention(dim, num_heads),
                                                  n2=nn.LayerNorm(dim), mlp=_MLP(dim, mlp_ratio))))
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.tok(input_ids) + self.pos[: input_ids.shape[1]]
        for blk in self.layers:
            x = x + blk["attn"](blk["n1"](x), mask=attention_mask)
            x = x + blk["mlp"](blk["n2"](x))
        x = self.norm(x)
        m = attention_mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return x, pooled


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` (any scale; the DiT feeds 1000 * sigma like SD3)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class _DiTBlock(nn.Module):
    def __init__(self, dim, heads, text_dim, mlp_ratio):
        super().__init__()
        self.n1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = _Attention(dim, heads, kv_dim=text_dim)
        self.n3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = _MLP(dim, mlp_ratio)
        self.ada = nn.Linear(dim, 6 * dim)
        # adaLN-Zero: every residual branch starts as the identity, which makes a deep DiT train stably
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, c, ctx, mask):
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + a1[:, None] * self.attn(_modulate(self.n1(x), s1, g1))
        x = x + self.cross(self.n2(x), ctx, mask)
        x = x + a2[:, None] * self.mlp(_modulate(self.n3(x), s2, g2))
        return x


class ShapesDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Pixel-space DiT predicting the flow velocity.

    ``forward(hidden_states [B, 3, H, W], timestep [B] or scalar in [0, 1000], encoder_hidden_states
    [B, L, Dt], pooled_projections [B, Dt], encoder_attention_mask [B, L] (1 = token)) -> v [B, 3, H, W]``.
    """

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, patch_size: int = 4, dim: int = 128,
                 num_layers: int = 4, num_heads: int = 4, mlp_ratio: float = 2.0, text_dim: int = 128,
                 prediction: str = "velocity", conv_channels: int = 0):
        super().__init__()
        if prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
        p = patch_size
        n = (sample_size // p) ** 2
        c = conv_channels
        if c:
            # Conv stem and head at full resolution: a pixel's output sees its neighbours across patch
            # borders, so samples are not stitched from independently decoded patches (the blocky
            # fragments a plain patchify/unpatchify DiT showed in short runs).
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1), nn.SiLU())
            self.patch = nn.Conv2d(c, dim, p, stride=p)
            self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(2 * c, c, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(c, in_channels, 3, padding=1))
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        else:
            self.patch = nn.Linear(in_channels * p * p, dim)
        self.pos = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.pool_mlp = nn.Sequential(nn.Linear(text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(_DiTBlock(dim, num_heads, text_dim, mlp_ratio) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, (c or in_channels) * p * p)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        if not c:  # adaLN-Zero: the plain model starts as the zero function (the conv head's last layer is)
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                encoder_attention_mask=None, return_dict: bool | None = None):
        """-> velocity tensor; ``return_dict=False`` gives ``(v,)`` and ``True`` a ``Transformer2DModelOutput``
        (diffusers' conventions, for callers written against SD3's transformer)."""
        x = hidden_states
        b, c, h, w = x.shape
        p, cc = self.config.patch_size, self.config.conv_channels
        if cc:
            feat = self.stem(x)
            tok = self.patch(feat).flatten(2).transpose(1, 2) + self.pos
        else:
            tok = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
            tok = tok.reshape(b, (h // p) * (w // p), c * p * p)
            tok = self.patch(tok) + self.pos
        t = torch.as_tensor(timestep, device=x.device).float().reshape(-1).expand(b)
        cond = self.t_mlp(timestep_embedding(t, self.config.dim)) + self.pool_mlp(pooled_projections)
        for blk in self.blocks:
            tok = blk(tok, cond, encoder_hidden_states, encoder_attention_mask)
        shift, scale = self.ada_out(F.silu(cond)).chunk(2, dim=-1)
        tok = self.proj_out(_modulate(self.norm_out(tok), shift, scale))
        co = cc or c
        out = tok.view(b, h // p, w // p, co, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, co, h, w)
        if cc:
            out = self.head(torch.cat([out, feat], dim=1))
        if self.config.prediction == "x0":
            # The network predicts the clean image and the velocity follows exactly from
            # x_t = (1 - s) x0 + s eps:  v = eps - x0 = (x_t - x0) / s. The noise in x_t then reaches
            # the output without passing through the (narrow) tokens, which cannot carry it all.
            sigma = (t / 1000).clamp(min=1e-2).to(out.dtype)[:, None, None, None]
            out = (x - out) / sigma
        if return_dict is None:
            return out
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=out)


class ShapesPipeline(DiffusionPipeline):
    """Text-to-image pipeline for the shapes world: ``pipe(prompt, ...) -> images [B, 3, 32, 32] in [0, 1]``.

    Components: ``tokenizer`` (:class:`ShapesTokenizer`), ``text_encoder`` (:class:`ShapesTextEncoder`),
    ``transformer`` (:class:`ShapesDiT`), ``scheduler`` (``FlowMatchEulerDiscreteScheduler``).

    Helpers for sampler adapters (everything a custom sampler needs without ``__call__``):

    - ``encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt=None)`` ->
      ``(cond, uncond)``, each a dict ``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, D],
      "encoder_attention_mask": long [B, L]}`` (``uncond`` is None without CFG; the negative prompt
      defaults to the empty prompt, the null condition the model was trained with).
    - the model call: ``transformer(hidden_states=x_t, timestep=1000 * sigma, **cond)`` -> velocity
      ``v = eps - x0`` (so ``x0 = x_t - sigma v`` and an Euler step is ``x + (sigma_next - sigma) v``).
    - ``vae_scale_factor`` = 1 and ``default_sample_size`` = 32 (the only size: fixed position embedding).
    - ``latents_shape(batch)`` -> ``(batch, 3, 32, 32)``; ``prepare_latents(batch, generator, device,
      dtype)`` draws them with ``randn_tensor`` (pure noise at sigma = 1).
    - ``decode(latents)`` -> images in [0, 1] (model space is pixels in [-1, 1]: ``(x + 1) / 2``, clamped).
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    #: pixel space: no VAE, latents are images (sampler adapters read this)
    vae_scale_factor = 1

    @property
    def default_sample_size(self) -> int:
        """The only size the model takes (its position embedding is fixed): 32."""
        return int(self.transformer.config.sample_size)

    def __init__(self, tokenizer: ShapesTokenizer, text_encoder: ShapesTextEncoder, transformer: ShapesDiT,
                 scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                              scheduler=scheduler)

    # ----------------------------------------------------------------------------------------- helpers

    def _text(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(prompts, device=device)
        hidden, pooled = self.text_encoder(tok["input_ids"], tok["attention_mask"])
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled,
                "encoder_attention_mask": tok["attention_mask"]}

    @torch.no_grad()
    def encode_prompt(self, prompt, do_classifier_free_guidance: bool = True, negative_prompt=None,
                      num_images_per_prompt: int = 1, device=None):
        """-> (cond, uncond): dicts of transformer keyword arguments (see the class docstring)."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        cond = self._text(prompts, device)
        uncond = None
        if do_classifier_free_guidance:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = ([neg] * len(prompts) if isinstance(neg, str)
                   else [n for n in neg for _ in range(num_images_per_prompt)])
            if len(neg) != len(prompts):
                raise ValueError(f"got {len(neg)} negative prompts for {len(prompts)} images")
            uncond = self._text(neg, device)
        return cond, uncond

    def latents_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        s = self.transformer.config.sample_size
        return (batch_size, self.transformer.config.in_channels, s, s)

    def prepare_latents(self, batch_size, generator=None, device=None, dtype=torch.float32, latents=None):
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        return randn_tensor(self.latents_shape(batch_size), generator=generator, device=device, dtype=dtype)

    @staticmethod
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def predict_velocity(self, latents, timestep, cond, uncond=None, guidance_scale: float = 1.0):
        """One (CFG) model evaluation on the concatenated [uncond; cond] batch."""
        if uncond is None or guidance_scale == 1.0:
            return self.transformer(hidden_states=latents, timestep=timestep, **cond)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(latents.shape[0])
        v_u, v_c = self.transformer(hidden_states=torch.cat([latents, latents]), timestep=torch.cat([t, t]),
                                    **both).chunk(2)
        return v_u + guidance_scale * (v_c - v_u)

    # -------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(self, prompt, num_images_per_prompt: int = 1, num_inference_steps: int = 20,
                 guidance_scale: float = 4.0, negative_prompt=None, generator=None, latents=None,
                 output_type: str = "pt", return_dict: bool = True, height: int | None = None,
                 width: int | None = None):
        """Images for ``prompt`` (diffusers' conventions: ``.images`` of the returned output, or the
        images alone with ``return_dict=False``; ``output_type`` "pt" [B, 3, 32, 32] in [0, 1], "np"
        or "pil"). ``height``/``width`` are accepted for drop-in use and must equal the model's size."""
        s = self.default_sample_size
        if (height or s, width or s) != (s, s):
            raise ValueError(f"{type(self).__name__} makes {s}x{s} images only, got {height}x{width}")
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, do_cfg, negative_prompt, num_images_per_prompt, device)
        batch = cond["pooled_projections"].shape[0]
        dtype = next(self.transformer.parameters()).dtype
        x = self.prepare_latents(batch, generator, device, dtype, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            v = self.predict_velocity(x, t.expand(batch), cond, uncond, guidance_scale)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]
        images = self.decode(x)
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
        elif output_type == "pil":
            images = self.numpy_to_pil(images.permute(0, 2, 3, 1).cpu().numpy())
        elif output_type != "pt":
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        if return_dict:
            from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
            return ImagePipelineOutput(images=images)
        return images


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """``from_pretrained``'s dtype keyword: ``dtype`` in diffusers >= 0.36 (``torch_dtype`` is deprecated
    there), ``torch_dtype`` before."""
    from diffusers.utils import deprecation_utils  # noqa: PLC0415

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


#: the packaged base model (trained by scripts/train_shapes_base.py; see its README.md)
BASE_MODEL_DIR = Path(__file__).resolve().parent / "shapes_base"
#: the packaged models by ``builtin:<name>``: the base model, and the demo's starting point, the base model
#: with a colour-swap habit (its pre-training continued on captions whose colours are often shifted)
BUILTIN_MODELS = {"shapes": BASE_MODEL_DIR, "shapes-swapped": BASE_MODEL_DIR.parent / "shapes_swapped"}


def load_base_pipeline(device=None, dtype: torch.dtype = torch.float32, name: str = "shapes") -> ShapesPipeline:
    """A packaged pre-trained shapes model (offline; ~8 MB of safetensors in the package): ``name`` is a
    key of :data:`BUILTIN_MODELS` (``shapes``: the base model; ``shapes-swapped``: the demo's)."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}: the package ships {', '.join(map(repr, BUILTIN_MODELS))}")
    folder = BUILTIN_MODELS[name]
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"the packaged shapes model {name!r} is missing ({folder}): reinstall diffrl "
                                "or train one with scripts/train_shapes_base.py")
    from diffusers.utils import logging as dlogging  # noqa: PLC0415

    bar = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()  # no "loading pipeline components" bar for a 4-file local folder
    try:
        pipe = ShapesPipeline.from_pretrained(folder, local_files_only=True, **dtype_kwarg(dtype))
    finally:
        if bar:
            dlogging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def build_pipeline(dim: int = 128, num_layers: int = 6, num_heads: int = 4, text_dim: int = 128,
                   text_layers: int = 2, mlp_ratio: float = 2.0, sample_size: int = 32,
                   patch_size: int = 8, prediction: str = "x0", conv_channels: int = 0) -> ShapesPipeline:
    """A fresh, randomly initialised pipeline (the training script's starting point; tests use small sizes)."""
    tok = ShapesTokenizer()
    te = ShapesTextEncoder(vocab_size=tok.vocab_size, max_length=tok.max_length, dim=text_dim,
                           num_layers=text_layers, num_heads=num_heads, mlp_ratio=mlp_ratio)
    dit = ShapesDiT(sample_size=sample_size, patch_size=patch_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
                    mlp_ratio=mlp_ratio, text_dim=text_dim, prediction=prediction, conv_channels=conv_channels)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = ShapesPipeline(tok, te, dit, sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["ShapesTokenizer", "ShapesTextEncoder", "ShapesDiT", "ShapesPipeline", "build_pipeline",
           "load_base_pipeline", "BASE_MODEL_DIR",
           "default_vocab", "timestep_embedding"]

"""One small adapter per diffusers pipeline family: prompt encoding, initial latents, the model call
and decoding, each done the way the pipeline's own ``__call__`` does it (through the pipeline's own
methods wherever it has one), so that a sampler with its noise turned off reproduces the pipeline.

The shared loop (``diffrl.samplers.base``) never looks inside a pipeline; it talks to an adapter:

* ``check_size(height, width)`` -> ``(height, width)``: defaults, and a clear error for sizes the
  model cannot take (multiples of ``size_multiple``, at most ``max_size()``);
* ``check_options(options)``: the family's extra ``sample(**options)`` keywords (``options``), merged
  with their defaults; unknown keywords raise;
* ``cfg_weight(guidance_scale, negative_prompt, options)`` -> the classifier-free-guidance weight
  applied by the loop, or None when the loop runs no CFG (FLUX's guidance embedding is not CFG);
* ``guidance_embedding(guidance_scale)`` -> a guidance value the model takes as input, or None;
* ``encode(prompts, negative_prompts, do_cfg, options, height, width)`` -> ``(cond, uncond, shared)``:
  ``cond`` and ``uncond`` map model keyword names to ``[P, ...]`` tensors (one row per distinct
  prompt), ``shared`` holds what every sample uses alike (FLUX's text ids);
* ``prepare_latents(batch, height, width, generator, latents, shared)`` -> latents of the pipeline's
  layout, drawn from the generator exactly as the pipeline draws them (may add to ``shared``);
* ``set_timesteps(scheduler, num_inference_steps, latents, options)`` -> the timesteps, as the
  pipeline sets them;
* ``forward(model, x, t, emb, shared)`` -> the model's prediction for a batch (``t``: ``[N]``);
* ``decode(latents, height, width)`` -> images ``[B, 3, H, W]`` float32 in [0, 1].

Class attributes: ``kind`` (``"flow"`` for FlowSDESampler, ``"ddim"`` for DDIMSampler), ``family``,
``model_attr`` (the pipeline attribute holding the denoiser). ``register_adapter(pipeline_class,
adapter_class)`` adds a family.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

#: (pipeline class or "module:Class", adapter class), looked up in order
_REGISTRY: list[tuple[object, type]] = []


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in model.parameters():
        return p.dtype
    return torch.float32


class Adapter:
    """Base of the per-family adapters. ``kind`` is the sampler family that fits the model:
    ``"ddim"`` (noise/v-prediction UNets: DDIMSampler) or ``"flow"`` (rectified flow: FlowSDESampler)."""

    kind: str = ""
    family: str = ""
    model_attr: str = ""
    #: extra ``sample(**options)`` keywords this family understands, with their defaults
    options: dict = {}

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = getattr(pipe, self.model_attr)

    # ---- properties of the pipeline ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 1))  # 1: a pixel-space model

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor

    def default_size(self) -> tuple[int, int]:
        s = getattr(self.pipe, "default_sample_size", None)
        if s is None:
            s = self.model.config.sample_size
        s = int(s) * self.vae_scale_factor
        return s, s

    def max_size(self) -> int | None:
        return None

    def check_size(self, height, width) -> tuple[int, int]:
        dh, dw = self.default_size()
        height = dh if height is None else height
        width = dw if width is None else width
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            m = self.size_multiple
            if v % m:
                raise ValueError(f"{name}={v} does not fit {type(self.pipe).__name__}: it must be a multiple of {m} "
                                 f"(the VAE's factor {self.vae_scale_factor} times the model's patch size)")
            top = self.max_size()
            if top is not None and v > top:
                raise ValueError(f"{name}={v} is too large for this model: at most {top} px "
                                 "(its position embedding covers no more)")
        return height, width

    def check_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise TypeError(f"sample() got unexpected keyword(s) {unknown} for {type(self.pipe).__name__} "
                            f"(family-specific options: {allowed})")
        return {**self.options, **options}

    def cfg_weight(self, guidance_scale, negative_prompt, options) -> float | None:
        # the pipelines' own rule: guidance is on when the scale exceeds 1
        return float(guidance_scale) if guidance_scale > 1 else None

    # ---- the pieces of a rollout ---------------------------------------------------------------

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        raise NotImplementedError

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        raise NotImplementedError

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        with _quiet_transformers():  # (the module imports diffusers' IP-adapter loaders)
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: PLC0415
                retrieve_timesteps)

        return retrieve_timesteps(scheduler, num_inference_steps, self.device)[0]

    def guidance_embedding(self, guidance_scale) -> float | None:
        """A guidance value the model takes as an input (FLUX.1-dev), or None."""
        return None

    def forward(self, model, x, t, emb, shared):
        raise NotImplementedError

    def decode(self, latents, height, width):
        raise NotImplementedError

    # helpers

    def _postprocess(self, image):
        image = self.pipe.image_processor.postprocess(image, output_type="pt",
                                                      do_denormalize=[True] * image.shape[0])
        return image.float()


# ------------------------------------------------------------------------------------------------
# Stable Diffusion 1.x / 2.x


class StableDiffusionAdapter(Adapter):
    """``StableDiffusionPipeline``: UNet with epsilon or v prediction (read from the scheduler config)."""

    kind = "ddim"
    family = "sd"
    model_attr = "unet"
    options = {"clip_skip": None}

    def __init__(self, pipe):
        super().__init__(pipe)
        if getattr(self.model.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("UNets with a guidance embedding (time_cond_proj_dim, e.g. LCM) are not supported")

    def default_size(self):
        s = self.model.config.sample_size
        h, w = (s, s) if isinstance(s, int) else s
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, do_cfg, negative_prompts,
                                               clip_skip=options["clip_skip"])
        return ({"encoder_hidden_states": cond},
                {"encoder_hidden_states": uncond} if do_cfg else None, {})

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

        shape = (batch, self.model.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None:
            return latents
        # the pipeline's prepare_latents, times DDIM's init_noise_sigma (1.0): the same draw
        return randn_tensor(shape, generator=generator, device=self.device, dtype=model_dtype(self.model))

    def _added_cond(self, emb):
        return None

    def forward(self, model, x, t, emb, shared):
        return model(x, t, encoder_hidden_states=emb["encoder_hidden_states"],
                     added_cond_kwargs=self._added_cond(emb), return_dict=False)[0]

    def _decode_latents(self, latents):
        return latents / self.pipe.vae.config.scaling_factor

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        z = self._decode_latents(latents.to(vae.dtype))
        return self._postprocess(vae.decode(z, return_dict=False)[0])


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """``StableDiffusionXLPipeline``: two text encoders, pooled embeddings and size/crop ids through
    ``added_cond_kwargs`` (``text_embeds``, ``time_ids``)."""

    family = "sdxl"
    options = {"clip_skip": None, "original_size": None, "crops_coords_top_left": (0, 0), "target_size": None,
               "negative_original_size": None, "negative_crops_coords_top_left": (0, 0),
               "negative_target_size": None}

    def default_size(self):
        s = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return s, s

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        pipe = self.pipe
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompts, clip_skip=options["clip_skip"])
        size = (height, width)
        proj = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                else pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids(tuple(options["original_size"] or size), tuple(options["crops_coords_top_left"]),
                                     tuple(options["target_size"] or size), dtype=cond.dtype,
                                     text_encoder_projection_dim=proj)
        if options["negative_original_size"] is not None and options["negative_target_size"] is not None:
            neg_ids = pipe._get_add_time_ids(tuple(options["negative_original_size"]),
                                             tuple(options["negative_crops_coords_top_left"]),
                                             tuple(options["negative_target_size"]), dtype=cond.dtype,
                                             text_encoder_projection_dim=proj)
        else:
            neg_ids = ids
        P = cond.shape[0]
        dev = self.device
        c = {"encoder_hidden_states": cond, "text_embeds": pooled.to(dev), "time_ids": ids.to(dev).repeat(P, 1)}
        u = None
        if do_cfg:
            u = {"encoder_hidden_states": uncond.to(dev), "text_embeds": neg_pooled.to(dev),
                 "time_ids": neg_ids.to(dev).repeat(P, 1)}
        return c, u, {}

    def _added_cond(self, emb):
        return {"text_embeds": emb["text_embeds"], "time_ids": emb["time_ids"]}

    def _decode_latents(self, latents):
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean = torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype)
            return latents * std / cfg.scaling_factor + mean
        return latents / cfg.scaling_factor

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        # SDXL's fp16 VAE overflows: the pipeline decodes in float32 when force_upcast says so
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            z = self._decode_latents(latents.to(vae.dtype))
            image = vae.decode(z, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return self._postprocess(image)


# ------------------------------------------------------------------------------------------------
# rectified-flow transformers


class StableDiffusion3Adapter(Adapter):
    """``StableDiffusion3Pipeline`` (SD3 / SD3.5): joint-attention transformer on 2-D latents."""

    kind = "flow"
    family = "sd3"
    model_attr = "transformer"
    options = {"clip_skip": None, "max_sequence_length": 256, "mu": None}

    @property
    def size_multiple(self):
        return self.vae_scale_factor * int(self.model.config.patch_size)

    def max_size(self):
        n = getattr(self.model.config, "pos_embed_max_size", None)
        return None if n is None else int(n) * self.size_multiple

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        cond, uncond, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompts,
            do_classifier_free_guidance=do_cfg, device=self.device, clip_skip=options["clip_skip"],
            num_images_per_prompt=1, max_sequence_length=options["max_sequence_length"])
        c = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        u = {"encoder_hidden_states": uncond, "pooled_projections": neg_pooled} if do_cfg else None
        return c, u, {}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        return self.pipe.prepare_latents(batch, self.model.config.in_channels, height, width,
                                         model_dtype(self.model), self.device, generator, latents)

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        with _quiet_transformers():
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (  # noqa: PLC0415
                calculate_shift, retrieve_timesteps)

        kw = {}
        mu = options["mu"]
        if scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            p = int(self.model.config.patch_size)
            seq = (latents.shape[2] // p) * (latents.shape[3] // p)
            mu = calculate_shift(seq, scheduler.config.get("base_image_seq_len", 256),
                                 scheduler.config.get("max_image_seq_len", 4096),
                                 scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.16))
        if mu is not None:
            kw["mu"] = mu
        return retrieve_timesteps(scheduler, num_inference_steps, self.device, **kw)[0]

    def forward(self, model, x, t, emb, shared):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=emb["encoder_hidden_states"],
                     pooled_projections=emb["pooled_projections"], return_dict=False)[0]

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self._postprocess(vae.decode(z, return_dict=False)[0])


class FluxAdapter(Adapter):
    """``FluxPipeline`` (FLUX.1 dev/schnell): packed 2x2 latents ``[B, tokens, 4 C]`` with image and
    text position ids, and the guidance embedding (``guidance_scale`` goes into the model, not into a
    CFG combination). True CFG (``true_cfg_scale > 1`` with a negative prompt) runs the loop's CFG:
    one model call on the concatenated batch, where the pipeline makes two calls."""

    kind = "flow"
    family = "flux"
    model_attr = "transformer"
    options = {"max_sequence_length": 512, "true_cfg_scale": 1.0}

    @property
    def size_multiple(self):
        return self.vae_scale_factor * 2

    def cfg_weight(self, guidance_scale, negative_prompt, options):
        tc = float(options["true_cfg_scale"])
        return tc if tc > 1 and negative_prompt is not None else None

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        pipe = self.pipe
        cond, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=options["max_sequence_length"])
        c = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        u = None
        if do_cfg:
            neg, neg_pooled, _ = pipe.encode_prompt(prompt=negative_prompts, prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1,
                                                    max_sequence_length=options["max_sequence_length"])
            u = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled}
        return c, u, {"txt_ids": text_ids}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        lat, img_ids = self.pipe.prepare_latents(batch, self.model.config.in_channels // 4, height, width,
                                                 model_dtype(self.model), self.device, generator, latents)
        shared["img_ids"] = img_ids
        return lat

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        import numpy as np  # noqa: PLC0415
        with _quiet_transformers():
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: PLC0415

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        return retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)[0]

    def forward(self, model, x, t, emb, shared):
        guidance = shared.get("guidance")
        if guidance is not None:
            guidance = torch.full([x.shape[0]], float(guidance), device=x.device, dtype=torch.float32)
        return model(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                     pooled_projections=emb["pooled_projections"], encoder_hidden_states=emb["encoder_hidden_states"],
                     txt_ids=shared["txt_ids"], img_ids=shared["img_ids"], return_dict=False)[0]

    def guidance_embedding(self, guidance_scale):
        return float(guidance_scale) if self.model.config.guidance_embeds else None

    def decode(self, latents, height, width):
        pipe, vae = self.pipe, self.pipe.vae
        z = pipe._unpack_latents(latents.to(vae.dtype), height, width, self.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return self._postprocess(vae.decode(z, return_dict=False)[0])


# ------------------------------------------------------------------------------------------------
# the built-in shapes model (diffrl.models.shapes_model)


class ShapesAdapter(Adapter):
    """``ShapesPipeline``: diffrl's tiny pixel-space flow model (no VAE; latents are 32x32 images in [-1, 1])."""

    kind = "flow"
    family = "shapes"
    model_attr = "transformer"

    @property
    def size_multiple(self):
        return int(self.model.config.patch_size)

    def max_size(self):
        return int(self.model.config.sample_size)

    def check_size(self, height, width):
        height, width = super().check_size(height, width)
        s = self.max_size()
        if (height, width) != (s, s):  # a fixed position embedding: one size only
            raise ValueError(f"{type(self.pipe).__name__} makes {s}x{s} images only, got {height}x{width}")
        return height, width

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        cond, uncond = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=do_cfg,
                                               negative_prompt=negative_prompts, device=self.device)
        return cond, uncond, {}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        return self.pipe.prepare_latents(batch, generator, self.device, model_dtype(self.model), latents)

    def forward(self, model, x, t, emb, shared):
        return model(hidden_states=x, timestep=t, **emb)

    def decode(self, latents, height, width):
        return self.pipe.decode(latents)


# ------------------------------------------------------------------------------------------------
# registry


def register_adapter(pipeline_class, adapter_class: type) -> None:
    """Support another pipeline class (matched with ``isinstance``; later registrations win).
    ``pipeline_class`` may be a class or a ``"module:ClassName"`` string resolved at look-up."""
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, Adapter)):
        raise TypeError("adapter_class must be a subclass of diffrl.samplers.adapters.Adapter")
    _REGISTRY.insert(0, (pipeline_class, adapter_class))


def _resolve(cls):
    if isinstance(cls, str):
        import importlib  # noqa: PLC0415

        module, _, name = cls.partition(":")
        try:
            with _quiet_transformers():
                return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None
    return cls


@contextlib.contextmanager
def _quiet_transformers():
    """Importing a diffusers pipeline module (to compare its class with the user's pipe, or for its
    timestep helpers) makes transformers warn that its image processors fall back to PIL without
    torchvision: true, and irrelevant here (no image processor is used), so say nothing meanwhile."""
    try:
        from transformers.utils import logging as tlog  # noqa: PLC0415
    except ImportError:
        yield
        return
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)


# lookup order is the list's order; the built-in classes are unrelated, so their order is immaterial
for _cls, _adapter in (("diffrl.models.shapes_model:ShapesPipeline", ShapesAdapter),
                       ("diffusers:FluxPipeline", FluxAdapter),
                       ("diffusers:StableDiffusion3Pipeline", StableDiffusion3Adapter),
                       ("diffusers:StableDiffusionXLPipeline", StableDiffusionXLAdapter),
                       ("diffusers:StableDiffusionPipeline", StableDiffusionAdapter)):
    _REGISTRY.append((_cls, _adapter))


def supported_pipelines() -> list[str]:
    """Names of the supported pipeline classes, built-in families first."""
    return [c.rpartition(":")[2] if isinstance(c, str) else c.__name__ for c, _ in reversed(_REGISTRY)]


def get_adapter(pipe, kind: str | None = None) -> Adapter:
    """The adapter for ``pipe``; a clear error for a pipeline of an unsupported family, or one whose
    kind does not fit the sampler (a flow model under DDIM, a UNet under the flow SDE)."""
    for cls, adapter in _REGISTRY:
        cls = _resolve(cls)
        if cls is not None and inspect.isclass(cls) and isinstance(pipe, cls):
            break
    else:
        raise ValueError(f"unsupported pipeline {type(pipe).__name__}: diffrl's samplers support "
                         f"{', '.join(supported_pipelines())} (register another family with "
                         "diffrl.samplers.register_adapter)")
    if kind is not None and adapter.kind != kind:
        want = "FlowSDESampler" if adapter.kind == "flow" else "DDIMSampler"
        raise ValueError(f"{type(pipe).__name__} is a {'rectified-flow' if adapter.kind == 'flow' else 'DDIM/UNet'} "
                         f"model: use {want} for it")
    return adapter(pipe)


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` with its (peft) adapters switched off: a PeftModel's ``disable_adapter()``
    context, or diffusers' ``disable_adapters()`` / ``enable_adapters()`` pair."""
    if hasattr(model, "disable_adapter") and callable(model.disable_adapter):
        with model.disable_adapter():
            yield model
        return
    if (callable(getattr(model, "disable_adapters", None)) and callable(getattr(model, "enable_adapters", None))
            and getattr(model, "_hf_peft_config_loaded", True)):  # diffusers models: only with adapters loaded
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
        return
    raise ValueError(f"reference='disable_adapters' needs a model with peft adapters ({type(model).__name__} has "
                     "neither disable_adapter() nor disable_adapters()); pass a reference model instead")

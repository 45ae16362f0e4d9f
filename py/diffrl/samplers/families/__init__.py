"""Model families: one small adapter per diffusers pipeline family, and the registry that maps a
pipeline to its family.

An adapter does prompt encoding, initial latents, the model call and decoding the way the pipeline's
own ``__call__`` does them (through the pipeline's own methods wherever it has one), so that a
sampler with its noise turned off reproduces the pipeline. The shared loop
(``diffrl.samplers.base``) never looks inside a pipeline; it talks to an adapter.

One module per family: ``sd`` (SD 1.x/2.x), ``sdxl``, ``sd3`` (SD3/3.5), ``flux`` (FLUX.1),
``flux_kontext`` (FLUX.1-Kontext editing), ``wan`` (Wan 2.x text-to-video), ``flux2`` (FLUX.2),
``qwenimage`` (Qwen-Image), ``zimage`` (Z-Image), ``shapes`` (diffrl's built-in model).
``docs/adding-a-family.md`` walks through adding one.

The contract
------------
What every family must implement:

* ``encode(prompts, negative_prompts, do_cfg, options, height, width)`` -> ``(cond, uncond, shared)``:
  ``cond`` and ``uncond`` map model keyword names to ``[P, ...]`` tensors (one row per distinct
  prompt), ``shared`` holds what every sample uses alike (FLUX's text ids); family options the
  later hooks need (a video's ``num_frames``) may be put in ``shared`` here, since they see it;
* ``prepare_latents(batch, height, width, generator, latents, shared)`` -> latents of the pipeline's
  layout (any rank: ``[B, C, H, W]``, packed ``[B, tokens, D]``, video ``[B, C, F, H, W]``), drawn
  from the generator exactly as the pipeline draws them (may add to ``shared``);
* ``forward(model, x, t, emb, shared)`` -> the model's prediction for a batch (``t``: ``[N]``);
* ``decode(latents, height, width)`` -> images ``[B, 3, H, W]`` (a video family: ``[B, 3, F, H, W]``)
  float32 in [0, 1].

Hooks with a default that fits most families (override where a family differs):

* ``check_size(height, width)`` -> ``(height, width)``: defaults, and a clear error for sizes the
  model cannot take (multiples of ``size_multiple``, at most ``max_size()``);
* ``check_options(options)``: the family's extra ``sample(**options)`` keywords (``options``),
  merged with their defaults; unknown keywords raise;
* ``cfg_weight(guidance_scale, negative_prompt, options)`` -> the classifier-free-guidance weight
  applied by the loop, or None when the loop runs no CFG (FLUX's guidance embedding is not CFG);
* ``guidance_embedding(guidance_scale)`` -> a guidance value the model takes as input, or None;
* ``scheduler_config()`` -> the config the sampler builds its own scheduler (DDIM or flow-match
  Euler) from; default ``pipe.scheduler.config``. A family whose pipeline ships another solver
  (Wan's UniPC with ``flow_shift``) translates its config here;
* ``set_timesteps(scheduler, num_inference_steps, latents, options)`` -> the timesteps, as the
  pipeline sets them;
* ``cfg_batch(cond, uncond)`` -> the embeddings of one model call on ``[uncond; cond]``, or None
  for two separate calls (default: concatenated when every tensor's trailing shape agrees, so a
  family whose negative prompt encodes to another length, as Qwen-Image's does, gets two calls
  without overriding anything; override to pad and mask instead);
* ``linear_cfg`` (class attribute, default True) and ``guide(v_cond, v_uncond, weight)``: with
  ``linear_cfg`` the loop fuses ``v_uncond + w (v_cond - v_uncond)`` into ``sde_step``; a family
  with a non-linear combination (Qwen-Image rescales the guided prediction to the conditional
  one's norm) sets ``linear_cfg = False`` and overrides ``guide``, which the loop and the scorer
  then call before the step (differentiably);
* ``encode_images(images)`` -> latents of the loop's layout for images ``[B, 3, H, W]`` in [0, 1]:
  the inverse of ``decode`` (the VAE's posterior mean), for trainers that start from given images
  (Diffusion-DPO's preferred/rejected pairs); families override ``latents_from_vae`` (the inverse of
  their latent scaling) rather than this.

Editing families (FLUX.1-Kontext) take their input image as an option listed in
``per_prompt_options`` (then ``encode`` gets one prompt per row, aligned with a per-prompt list), put
the image latents the model reads in ``cond`` / ``uncond`` (one row per prompt, so minibatches and
``Rollout.cat`` carry them), and put the images themselves, ``[P, 3, h, w]`` in [0, 1] as the model
saw them, in ``shared["condition_images"]``: the loop moves them into the rollout's per-sample
``condition_images``, which trainers hand to rewards that take a ``condition_images`` keyword.

``set_option_defaults(**options)`` changes an adapter's option defaults (a trainer's sampler is
called without family options: ``trainer.sampler.adapter.set_option_defaults(num_frames=5)``).

Class attributes: ``kind`` (``"flow"`` for FlowSDESampler, ``"ddim"`` for DDIMSampler), ``family``,
``model_attr`` (the pipeline attribute holding the denoiser), ``options``.
``register_adapter(pipeline_class, adapter_class)`` adds a family at run time; a built-in family is
one line of :data:`_BUILTIN`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import torch

__all__ = ["Adapter", "get_adapter", "model_dtype", "register_adapter", "supported_pipelines"]


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in model.parameters():
        return p.dtype
    return torch.float32


@contextlib.contextmanager
def quiet_transformers():
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


class Adapter:
    """Base of the per-family adapters. ``kind`` is the sampler family that fits the model:
    ``"ddim"`` (noise/v-prediction UNets: DDIMSampler) or ``"flow"`` (rectified flow: FlowSDESampler)."""

    kind: str = ""
    family: str = ""
    model_attr: str = ""
    #: extra ``sample(**options)`` keywords this family understands, with their defaults
    options: dict = {}
    #: the loop may fuse CFG as ``v_uncond + w (v_cond - v_uncond)`` into the step (else: ``guide``)
    linear_cfg: bool = True
    #: options holding one entry per prompt (an editing family's input images): when one is given,
    #: every prompt gets its own embedding row, so ``encode``'s prompts line up with its entries
    per_prompt_options: tuple[str, ...] = ()

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

    def set_option_defaults(self, **options) -> None:
        """Change the defaults of this adapter's options (for callers that pass none, e.g. trainers);
        checked as ``sample(**options)`` would check them."""
        self.options = self.check_options(options)

    def cfg_weight(self, guidance_scale, negative_prompt, options) -> float | None:
        # the pipelines' own rule: guidance is on when the scale exceeds 1
        return float(guidance_scale) if guidance_scale > 1 else None

    def guidance_embedding(self, guidance_scale) -> float | None:
        """A guidance value the model takes as an input (FLUX.1-dev), or None."""
        return None

    # ---- the schedule --------------------------------------------------------------------------

    def scheduler_config(self):
        """The config the sampler's own scheduler is built from (the pipeline's is never stepped).

        Every value of the pipeline's scheduler, explicitly: diffusers' ``from_config`` resets the keys
        listed in ``_use_default_values`` to their defaults, and those include values patched after
        construction (``StableDiffusionPipeline.__init__`` sets ``steps_offset=1`` on a scheduler built
        in code with the default 0; the copy would step at 666/333/0 where the pipeline steps at
        667/334/1)."""
        return {k: v for k, v in dict(self.pipe.scheduler.config).items() if k != "_use_default_values"}

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        with quiet_transformers():  # (the module imports diffusers' IP-adapter loaders)
            from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (  # noqa: PLC0415
                retrieve_timesteps)

        return retrieve_timesteps(scheduler, num_inference_steps, self.device)[0]

    # ---- classifier-free guidance --------------------------------------------------------------

    def cfg_batch(self, cond: dict, uncond: dict) -> dict | None:
        """The embeddings of one model call on ``[uncond; cond]``, or None: two calls (see the module
        docstring). Built once per rollout or scoring call, not per step."""
        for k in cond:
            if cond[k].shape[1:] != uncond[k].shape[1:]:
                return None
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, weight: float) -> torch.Tensor:
        """The guided prediction; only called when ``linear_cfg`` is False (else fused into the step)."""
        return v_uncond + weight * (v_cond - v_uncond)

    # ---- the pieces of a rollout ---------------------------------------------------------------

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        raise NotImplementedError

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        raise NotImplementedError

    def forward(self, model, x, t, emb, shared):
        raise NotImplementedError

    def decode(self, latents, height, width):
        raise NotImplementedError

    # ---- images to latents (the inverse of decode) ---------------------------------------------

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """The loop's latents from the VAE's (the inverse of the scaling ``decode`` undoes)."""
        raise NotImplementedError(f"{type(self).__name__} does not encode images to latents")

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (float32, the loop's layout) of images ``[B, 3, H, W]`` in [0, 1]: the VAE
        posterior's mean, scaled as the loop's latents are. Deterministic (no posterior sample)."""
        vae = self.pipe.vae
        x = (images.to(self.device, vae.dtype) * 2 - 1)
        z = vae.encode(x).latent_dist.mode()
        return self.latents_from_vae(z).float()

    # helpers

    def _postprocess(self, image):
        image = self.pipe.image_processor.postprocess(image, output_type="pt",
                                                      do_denormalize=[True] * image.shape[0])
        return image.float()


# ------------------------------------------------------------------------------------------------
# registry

#: the built-in families: (pipeline "module:Class", adapter "module:Class"), both imported on first
#: look-up so that importing diffrl imports no family module. The classes are unrelated, so their
#: order is immaterial.
_BUILTIN = (
    ("diffrl.models.shapes_model:ShapesPipeline", "diffrl.samplers.families.shapes:ShapesAdapter"),
    ("diffusers:ZImagePipeline", "diffrl.samplers.families.zimage:ZImageAdapter"),
    ("diffusers:QwenImagePipeline", "diffrl.samplers.families.qwenimage:QwenImageAdapter"),
    ("diffusers:Flux2Pipeline", "diffrl.samplers.families.flux2:Flux2Adapter"),
    ("diffusers:FluxPipeline", "diffrl.samplers.families.flux:FluxAdapter"),
    ("diffusers:StableDiffusion3Pipeline", "diffrl.samplers.families.sd3:StableDiffusion3Adapter"),
    ("diffusers:StableDiffusionXLPipeline", "diffrl.samplers.families.sdxl:StableDiffusionXLAdapter"),
    ("diffusers:StableDiffusionPipeline", "diffrl.samplers.families.sd:StableDiffusionAdapter"),
    ("diffusers:LatentConsistencyModelPipeline", "diffrl.samplers.families.lcm:LCMAdapter"),
    ("diffusers:WanPipeline", "diffrl.samplers.families.wan:WanAdapter"),
    ("diffusers:FluxKontextPipeline", "diffrl.samplers.families.flux_kontext:FluxKontextAdapter"),
)

#: (pipeline class or "module:Class", adapter class or "module:Class"), looked up in order
_REGISTRY: list[tuple[object, object]] = list(_BUILTIN)


def register_adapter(pipeline_class, adapter_class: type) -> None:
    """Support another pipeline class (matched with ``isinstance``; later registrations win).
    ``pipeline_class`` may be a class or a ``"module:ClassName"`` string resolved at look-up."""
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, Adapter)):
        raise TypeError("adapter_class must be a subclass of diffrl.samplers.adapters.Adapter")
    _REGISTRY.insert(0, (pipeline_class, adapter_class))


def _resolve(cls, *, required: bool = False):
    """A class, or a ``"module:Class"`` string imported now (None if it cannot be: a pipeline class
    of a diffusers version that lacks it; ``required`` raises instead, for our own modules)."""
    if not isinstance(cls, str):
        return cls
    module, _, name = cls.partition(":")
    try:
        with quiet_transformers():
            return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        if required:
            raise
        return None


def supported_pipelines() -> list[str]:
    """Names of the supported pipeline classes, built-in families first."""
    return [c.rpartition(":")[2] if isinstance(c, str) else c.__name__ for c, _ in reversed(_REGISTRY)]


def get_adapter(pipe, kind: str | None = None) -> Adapter:
    """The adapter for ``pipe``; a clear error for a pipeline of an unsupported family, or one whose
    kind does not fit the sampler (a flow model under DDIM, a UNet under the flow SDE)."""
    for cls, adapter in _REGISTRY:
        cls = _resolve(cls)
        if cls is not None and inspect.isclass(cls) and isinstance(pipe, cls):
            adapter = _resolve(adapter, required=True)
            break
    else:
        raise ValueError(f"unsupported pipeline {type(pipe).__name__}: diffrl's samplers support "
                         f"{', '.join(supported_pipelines())} (register another family with "
                         "diffrl.samplers.register_adapter)")
    if kind is not None and adapter.kind != kind:
        want, what = {"flow": ("FlowSDESampler", "rectified-flow"), "ddim": ("DDIMSampler", "DDIM/UNet"),
                      "lcm": ("LCMSampler", "latent consistency")}.get(adapter.kind, (adapter.kind, adapter.kind))
        raise ValueError(f"{type(pipe).__name__} is a {what} model: use {want} for it")
    return adapter(pipe)

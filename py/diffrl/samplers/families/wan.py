"""Wan 2.x text-to-video (``WanPipeline``): a rectified-flow video transformer on 5-D latents
``[B, C, F, H, W]`` with a UMT5 text encoder.

The released checkpoints ship a ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` and a
``flow_shift``; the sampler never steps it but runs its own flow-match Euler SDE, built by
:meth:`WanAdapter.scheduler_config` as ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``. With
the noise off the rollout is therefore the pipeline's output *when the pipeline is given that
Euler scheduler* (same shift), not its UniPC output (a different, higher-order solver).
"""

from __future__ import annotations

import math

import torch

from diffrl.samplers.base import _call_default
from diffrl.samplers.families import Adapter, model_dtype


class WanAdapter(Adapter):
    """``WanPipeline`` (Wan 2.1 T2V, Wan 2.2 TI2V-5B's text-to-video mode with ``expand_timesteps``).

    Options: ``num_frames`` (``4k + 1`` for the usual temporal factor 4; the pipeline rounds a bad value
    with a warning, here it is an error) and ``max_sequence_length``. Samples decode to videos
    ``[B, 3, F, H, W]`` in [0, 1]. Wan 2.2's two-expert models (``transformer_2`` / ``boundary_ratio``)
    are not supported (one denoiser is trained)."""

    kind = "flow"
    family = "wan"
    model_attr = "transformer"
    options = {"num_frames": 81, "max_sequence_length": 512}

    def __init__(self, pipe):
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "transformer_2", None) is not None \
                or pipe.config.get("boundary_ratio") is not None:
            raise ValueError("WanPipeline with two denoisers (Wan 2.2 A14B: transformer_2 / boundary_ratio) is not "
                             "supported: diffrl samples and trains one denoiser (pipe.transformer)")
        super().__init__(pipe)

    # ---- sizes, frames ---------------------------------------------------------------------------

    @property
    def vae_scale_factor(self):
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def size_multiple(self):
        # the pipeline patchifies (VAE factor x patch) and also insists on multiples of 16
        return math.lcm(16, self.vae_scale_factor * int(self.model.config.patch_size[1]))

    def default_size(self):
        pipe = self.pipe
        return _call_default(pipe, "height") or 480, _call_default(pipe, "width") or 832

    def check_options(self, options):
        options = super().check_options(options)
        n, k = options["num_frames"], int(self.pipe.vae_scale_factor_temporal)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (n - 1) % k:
            raise ValueError(f"num_frames={n!r} does not fit {type(self.pipe).__name__}: it must be {k} k + 1 "
                             f"(1, {k + 1}, {2 * k + 1}, ...: the VAE compresses {k} frames into one after the first)")
        return options

    # ---- the schedule ----------------------------------------------------------------------------

    def scheduler_config(self):
        """The pipeline's scheduler as a flow-match Euler config: a flow-sigma solver (UniPC,
        DPM-Solver with ``use_flow_sigmas``) becomes ``shift = flow_shift``; a
        ``FlowMatchEulerDiscreteScheduler`` is taken as it is."""
        cfg = super().scheduler_config()
        if "flow_shift" not in cfg:  # already a flow-match scheduler's config
            return cfg
        if not cfg.get("use_flow_sigmas", False) or cfg.get("prediction_type") != "flow_prediction":
            raise ValueError(f"{type(self.pipe.scheduler).__name__} is not set up for flow matching "
                             "(needs use_flow_sigmas=True, prediction_type='flow_prediction')")
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting"):
            if cfg.get(key, False):
                raise ValueError(f"{type(self.pipe.scheduler).__name__} with {key}=True has no flow-match Euler "
                                 "equivalent in diffrl (use flow_shift)")
        return {"num_train_timesteps": cfg.get("num_train_timesteps", 1000), "shift": float(cfg["flow_shift"])}

    # ---- the pieces of a rollout -----------------------------------------------------------------

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        cond, uncond = self.pipe.encode_prompt(prompt=prompts, negative_prompt=negative_prompts,
                                               do_classifier_free_guidance=do_cfg, num_videos_per_prompt=1,
                                               max_sequence_length=options["max_sequence_length"],
                                               device=self.device)
        dt = model_dtype(self.model)  # the pipeline casts the text states to the transformer's dtype
        c = {"encoder_hidden_states": cond.to(dt)}
        u = {"encoder_hidden_states": uncond.to(dt)} if do_cfg else None
        return c, u, {"num_frames": options["num_frames"]}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        # drawn in float32 whatever the model's dtype, as the pipeline draws them
        return self.pipe.prepare_latents(batch, self.model.config.in_channels, height, width, shared["num_frames"],
                                         torch.float32, self.device, generator, latents)

    def forward(self, model, x, t, emb, shared):
        if self.pipe.config.get("expand_timesteps", False):
            # Wan 2.2 TI2V: one timestep per 2x2 latent patch (all equal in text-to-video)
            f, h, w = x.shape[2], (x.shape[3] + 1) // 2, (x.shape[4] + 1) // 2
            t = t[:, None].expand(x.shape[0], f * h * w)
        return model(hidden_states=x, timestep=t, encoder_hidden_states=emb["encoder_hidden_states"],
                     return_dict=False)[0]

    def _latent_stats(self, z, dtype=torch.float32):
        """The VAE's per-channel latent mean and 1 / std, built in ``dtype`` (float32: as the pipeline
        builds them) and cast to ``z``'s."""
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, dtype=dtype).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, dtype=dtype).view(shape).to(z.device, z.dtype)
        return mean, inv_std

    def latents_from_vae(self, z):
        mean, inv_std = self._latent_stats(z, z.dtype)
        return (z - mean) * inv_std

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        mean, inv_std = self._latent_stats(z)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W] in [-1, 1]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="pt")  # [B, F, 3, H, W]
        return frames.permute(0, 2, 1, 3, 4).float()

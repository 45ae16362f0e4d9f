"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): a joint-attention rectified-flow
transformer on 2-D latents."""

from __future__ import annotations

from diffrl.samplers.families import Adapter, model_dtype, quiet_transformers


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
        with quiet_transformers():
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

    def latents_from_vae(self, z):
        cfg = self.pipe.vae.config
        return (z - cfg.shift_factor) * cfg.scaling_factor

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return self._postprocess(vae.decode(z, return_dict=False)[0])

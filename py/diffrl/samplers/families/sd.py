"""Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``): a UNet under DDIM."""

from __future__ import annotations

from diffrl.samplers.families import Adapter, model_dtype


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

    def latents_from_vae(self, z):
        return z * self.pipe.vae.config.scaling_factor

    def decode(self, latents, height, width):
        vae = self.pipe.vae
        z = self._decode_latents(latents.to(vae.dtype))
        return self._postprocess(vae.decode(z, return_dict=False)[0])

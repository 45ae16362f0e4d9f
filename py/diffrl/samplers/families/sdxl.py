"""Stable Diffusion XL (``StableDiffusionXLPipeline``): the SD UNet with two text encoders and
size/crop conditioning."""

from __future__ import annotations

import torch

from diffrl.samplers.families.sd import StableDiffusionAdapter


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

    def _latent_stats(self, latents):
        """The VAE's per-channel latent mean and std (SDXL-class VAEs that have them), else None."""
        cfg = self.pipe.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        c = latents.shape[1]
        return (torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype),
                torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype))

    def _decode_latents(self, latents):
        cfg = self.pipe.vae.config
        stats = self._latent_stats(latents)
        if stats is not None:
            mean, std = stats
            return latents * std / cfg.scaling_factor + mean
        return latents / cfg.scaling_factor

    def latents_from_vae(self, z):
        cfg = self.pipe.vae.config
        stats = self._latent_stats(z)
        if stats is not None:
            mean, std = stats
            return (z - mean) * cfg.scaling_factor / std
        return z * cfg.scaling_factor

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

"""FLUX.1 (``FluxPipeline``): a rectified-flow transformer on packed latents with a guidance
embedding."""

from __future__ import annotations

import torch

from diffrl.samplers.families import Adapter, model_dtype, quiet_transformers


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
        with quiet_transformers():
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

    def latents_from_vae(self, z):
        cfg = self.pipe.vae.config
        z = (z - cfg.shift_factor) * cfg.scaling_factor
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)  # the loop's layout: 2x2 patches as tokens

    def decode(self, latents, height, width):
        pipe, vae = self.pipe, self.pipe.vae
        z = pipe._unpack_latents(latents.to(vae.dtype), height, width, self.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        return self._postprocess(vae.decode(z, return_dict=False)[0])

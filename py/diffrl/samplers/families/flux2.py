"""FLUX.2 (``Flux2Pipeline``, text to image): a rectified-flow transformer on patchified, packed
latents with a guidance embedding, prompted by the stacked hidden states of a Mistral-3 text
encoder; the VAE's latents are batch-normalised."""

from __future__ import annotations

import torch

from diffrl.samplers.families import Adapter, model_dtype, quiet_transformers


class Flux2Adapter(Adapter):
    """``Flux2Pipeline`` without reference images (text to image): latents ``[B, tokens, 4 C]``
    (2x2 patches of the VAE latent as channels, one token per patch) with 4-axis position ids for
    image and text tokens. ``guidance_scale`` goes into the model's guidance embedding; there is no
    CFG. ``text_encoder_out_layers``: the text encoder's hidden states stacked into the prompt
    embedding (the pipeline's option). The pipeline's ``image`` (editing) and caption upsampling
    are not supported."""

    kind = "flow"
    family = "flux2"
    model_attr = "transformer"
    options = {"max_sequence_length": 512, "text_encoder_out_layers": (10, 20, 30)}

    @property
    def size_multiple(self):
        return self.vae_scale_factor * 2  # the VAE's factor times the 2x2 patches

    def cfg_weight(self, guidance_scale, negative_prompt, options):
        if negative_prompt is not None:
            raise ValueError("Flux2Pipeline has no negative prompt (guidance is an embedding, not CFG)")
        return None

    def guidance_embedding(self, guidance_scale):
        return float(guidance_scale) if self.model.config.guidance_embeds else None

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        emb, text_ids = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, num_images_per_prompt=1,
                                                max_sequence_length=options["max_sequence_length"],
                                                text_encoder_out_layers=tuple(options["text_encoder_out_layers"]))
        # every prompt is padded to max_sequence_length, so one row of text ids serves every sample
        return {"encoder_hidden_states": emb}, None, {"txt_ids": text_ids[:1]}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        lat, latent_ids = self.pipe.prepare_latents(batch, self.model.config.in_channels // 4, height, width,
                                                    model_dtype(self.model), self.device, generator, latents)
        shared["img_ids"] = latent_ids[:1]  # the same grid for every sample
        return lat

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        import numpy as np  # noqa: PLC0415
        with quiet_transformers():
            from diffusers.pipelines.flux2.pipeline_flux2 import (  # noqa: PLC0415
                compute_empirical_mu, retrieve_timesteps)

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=num_inference_steps)
        return retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)[0]

    def forward(self, model, x, t, emb, shared):
        n = x.shape[0]
        guidance = shared.get("guidance")
        if guidance is not None:
            guidance = torch.full([n], float(guidance), device=x.device, dtype=torch.float32)
        return model(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                     encoder_hidden_states=emb["encoder_hidden_states"], txt_ids=shared["txt_ids"].expand(n, -1, -1),
                     img_ids=shared["img_ids"].expand(n, -1, -1), return_dict=False)[0]

    def _bn(self, like):
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def latents_from_vae(self, z):
        z = self.pipe._patchify_latents(z)
        mean, std = self._bn(z)
        return self.pipe._pack_latents((z - mean) / std)

    def decode(self, latents, height, width):
        pipe, vae = self.pipe, self.pipe.vae
        f = self.size_multiple
        b, _, c = latents.shape
        # the packed tokens are the patch grid in row-major order (the pipeline's latent ids)
        z = latents.to(vae.dtype).permute(0, 2, 1).reshape(b, c, height // f, width // f)
        mean, std = self._bn(z)
        z = pipe._unpatchify_latents(z * std + mean)
        return self._postprocess(vae.decode(z, return_dict=False)[0])

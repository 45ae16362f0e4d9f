"""Qwen-Image (``QwenImagePipeline``): a dual-stream rectified-flow transformer on packed latents,
prompted by a Qwen2.5-VL text encoder, decoded by a video-style (3-D) VAE with a frame axis."""

from __future__ import annotations

import torch

from diffrl.samplers.families import Adapter, model_dtype, quiet_transformers

_EMB, _LEN = "encoder_hidden_states", "text_lens"


class QwenImageAdapter(Adapter):
    """``QwenImagePipeline``: latents packed in 2x2 patches ``[B, tokens, 4 C]``; the transformer
    takes the image grid (``img_shapes``) and a text padding mask.

    CFG is the pipeline's "true CFG" (``true_cfg_scale > 1`` with a negative prompt), combined
    non-linearly: the linear combination is rescaled, token by token, to the norm of the
    conditional prediction (``guide``). The prompt embeddings are carried padded to
    ``max_sequence_length`` with their lengths, and cut and masked per model call: prompt and
    negative run as one call on ``[uncond; cond]`` (the pipeline makes two), masked where their
    lengths differ.
    ``guidance_scale`` only feeds a guidance embedding when the transformer has one (the released
    model has none; pass any number then, e.g. 1.0)."""

    kind = "flow"
    family = "qwenimage"
    model_attr = "transformer"
    options = {"max_sequence_length": 512, "true_cfg_scale": 1.0}
    linear_cfg = False

    @property
    def size_multiple(self):
        return self.vae_scale_factor * 2  # the VAE's factor times the 2x2 packing

    def cfg_weight(self, guidance_scale, negative_prompt, options):
        tc = float(options["true_cfg_scale"])
        return tc if tc > 1 and negative_prompt is not None else None

    def guidance_embedding(self, guidance_scale):
        return float(guidance_scale) if self.model.config.guidance_embeds else None

    def guide(self, v_cond, v_uncond, weight):
        v = v_uncond + weight * (v_cond - v_uncond)
        # per token (the last axis is a packed patch's channels), back to the conditional norm
        return v * (torch.linalg.vector_norm(v_cond, dim=-1, keepdim=True)
                    / torch.linalg.vector_norm(v, dim=-1, keepdim=True))

    def _encode(self, prompts, options):
        n = options["max_sequence_length"]
        emb, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                            max_sequence_length=n)
        # the pipeline pads to the longest prompt of its batch (mask: ones then zeros, or None if
        # nothing is padded); carried padded to max_sequence_length with the lengths instead, so that
        # rollouts of separate calls concatenate, and prompt and negative share one model call
        lens = (torch.full((emb.shape[0],), emb.shape[1], dtype=torch.long, device=emb.device) if mask is None
                else mask.sum(1))
        return {_EMB: torch.nn.functional.pad(emb, (0, 0, 0, n - emb.shape[1])), _LEN: lens}

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        return self._encode(prompts, options), (self._encode(negative_prompts, options) if do_cfg else None), {}

    def prepare_latents(self, batch, height, width, generator, latents, shared):
        f = self.vae_scale_factor * 2
        shared["img_shape"] = (1, height // f, width // f)  # (frames, patch rows, patch columns)
        return self.pipe.prepare_latents(batch, self.model.config.in_channels // 4, height, width,
                                         model_dtype(self.model), self.device, generator, latents)

    def set_timesteps(self, scheduler, num_inference_steps, latents, options):
        import numpy as np  # noqa: PLC0415
        with quiet_transformers():
            from diffusers.pipelines.qwenimage.pipeline_qwenimage import (  # noqa: PLC0415
                calculate_shift, retrieve_timesteps)

        cfg = scheduler.config
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)[0]

    def forward(self, model, x, t, emb, shared):
        guidance = shared.get("guidance")
        if guidance is not None:
            guidance = torch.full([x.shape[0]], float(guidance), device=x.device, dtype=torch.float32)
        # the batch's text as the pipeline gives it: cut to the longest prompt, masked only if padded
        # (one host read of the lengths per call)
        lens = emb[_LEN]
        ls = lens.tolist()
        n = max(ls)
        mask = None if min(ls) == n else (torch.arange(n, device=lens.device) < lens[:, None]).long()
        return model(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                     encoder_hidden_states=emb[_EMB][:, :n], encoder_hidden_states_mask=mask,
                     img_shapes=[[shared["img_shape"]]] * x.shape[0], return_dict=False)[0]

    def _mean_std(self, like):
        cfg = self.pipe.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def latents_from_vae(self, z):
        mean, std = self._mean_std(z)
        z = (z - mean) / std  # [B, C, 1, h, w]
        b, c, _, h, w = z.shape
        return self.pipe._pack_latents(z[:, :, 0], b, c, h, w)

    @torch.no_grad()
    def encode_images(self, images):
        vae = self.pipe.vae
        x = (images.to(self.device, vae.dtype) * 2 - 1)[:, :, None]  # the VAE's frame axis: one frame
        return self.latents_from_vae(vae.encode(x).latent_dist.mode()).float()

    def decode(self, latents, height, width):
        pipe, vae = self.pipe, self.pipe.vae
        z = pipe._unpack_latents(latents.to(vae.dtype), height, width, self.vae_scale_factor)  # [B, C, 1, h, w]
        mean, std = self._mean_std(z)
        return self._postprocess(vae.decode(z * std + mean, return_dict=False)[0][:, :, 0])


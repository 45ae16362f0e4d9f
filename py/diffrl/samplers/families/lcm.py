"""Latent Consistency Models (``LatentConsistencyModelPipeline``): an SD UNet distilled for few steps, with
the guidance scale as a model input (``timestep_cond``) instead of classifier-free guidance."""

from __future__ import annotations

import torch

from diffrl.samplers.families.sd import StableDiffusionAdapter


class LCMAdapter(StableDiffusionAdapter):
    """``LatentConsistencyModelPipeline``: no CFG and no negative prompt (the pipeline has none); the guidance
    scale ``w`` enters as the embedding of ``w - 1`` (the pipeline's ``get_guidance_scale_embedding``)."""

    kind = "lcm"
    family = "lcm"

    def __init__(self, pipe):
        super(StableDiffusionAdapter, self).__init__(pipe)  # (SD's check refuses guidance-embedding UNets)
        if getattr(self.model.config, "time_cond_proj_dim", None) is None:
            raise ValueError("LatentConsistencyModelPipeline's UNet has no time_cond_proj_dim (guidance embedding)")

    def cfg_weight(self, guidance_scale, negative_prompt, options):
        if negative_prompt is not None:
            raise ValueError("LatentConsistencyModelPipeline takes no negative prompt (LCMs are distilled with the "
                             "empty one)")
        return None

    def guidance_embedding(self, guidance_scale):
        w = torch.tensor([float(guidance_scale) - 1.0])
        return self.pipe.get_guidance_scale_embedding(w, embedding_dim=self.model.config.time_cond_proj_dim)

    def encode(self, prompts, negative_prompts, do_cfg, options, height, width):
        cond, _ = self.pipe.encode_prompt(prompts, self.device, 1, False, None, clip_skip=options["clip_skip"])
        return {"encoder_hidden_states": cond}, None, {}

    def forward(self, model, x, t, emb, shared):
        w = shared["guidance"].to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1)
        return model(x, t, timestep_cond=w, encoder_hidden_states=emb["encoder_hidden_states"],
                     return_dict=False)[0]

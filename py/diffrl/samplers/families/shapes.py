"""diffrl's built-in shapes model (``diffrl.models.shapes_model.ShapesPipeline``): a tiny
pixel-space flow transformer."""

from __future__ import annotations

import torch

from diffrl.samplers.families import Adapter, model_dtype


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

    @torch.no_grad()
    def encode_images(self, images):
        return images.to(self.device, torch.float32) * 2 - 1  # pixel space: the latents are the image

    def decode(self, latents, height, width):
        return self.pipe.decode(latents)

"""``ColourTarget``: a differentiable toy reward, how close an image's pixels are to one colour.

``reward = -mean((pixel - rgb)^2)`` over pixels and channels (0 for an image of exactly that colour). It is
a plain torch function of the images, so its gradient reaches the model: what the reward-backprop trainer
(AlignProp / DRaFT) needs, on a task a tiny random model learns in seconds. No weights, no download.
"""

from __future__ import annotations

import math

import torch

from diffrl.rewards.base import Reward

__all__ = ["ColourTarget"]


class ColourTarget(Reward):
    """``reward``: minus the mean squared distance of the pixels to ``rgb`` (three floats in [0, 1])."""

    heads = ("reward",)
    differentiable = True

    def __init__(self, rgb=(1.0, 0.0, 0.0)):
        rgb = tuple(rgb) if isinstance(rgb, (list, tuple)) else rgb
        if not isinstance(rgb, tuple) or len(rgb) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                for v in rgb):
            raise ValueError(f"ColourTarget: rgb must be three numbers in [0, 1], got {rgb!r}")
        self.rgb = tuple(float(v) for v in rgb)

    def score(self, images, prompts, group_ids):
        target = torch.tensor(self.rgb, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return {"reward": -(images - target).pow(2).flatten(1).mean(1).float()}

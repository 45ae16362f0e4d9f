"""``GRPOTrainer``: Flow-GRPO on a flow-matching pipeline (SD3 / SD3.5, FLUX.1).

SDE sampling through ``FlowSDESampler`` (``noise_level``, ``sde_type``; ``sde_window`` makes only
steps ``[start, end)`` stochastic and trained, as MixGRPO / Flow-GRPO-Fast), advantages normalised
within each prompt's group across all ranks (``adv_std``, ``adv_clip``).
"""

from __future__ import annotations

import torch

from diffrl.trainers.base import BaseTrainer

__all__ = ["GRPOTrainer"]


class GRPOTrainer(BaseTrainer):
    """Rollouts of ``FlowSDESampler``, group advantages, the PPO objective (kind ``grpo``, diffrl.trainers.kinds)."""

    def make_sampler(self, pipe):
        from diffrl.samplers import FlowSDESampler  # noqa: PLC0415
        from diffrl.samplers.families import get_adapter  # noqa: PLC0415

        if get_adapter(pipe).kind != "flow":  # say it in trainer terms, not the sampler's
            raise ValueError(f"{type(self).__name__} trains rectified-flow pipelines (SD3 / SD3.5, FLUX.1, the shapes "
                             f"model); {type(pipe).__name__} is a DDIM/UNet model: train it with DDPOTrainer "
                             "(trainer: ddpo, e.g. preset tiny-sd-ddpo-jpeg)")
        cfg = self.config
        window = tuple(cfg.sde_window) if cfg.sde_window else None
        return FlowSDESampler(pipe, noise_level=cfg.noise_level, sde_type=cfg.sde_type, sde_steps=window)

    def compute_advantages(self, rewards, group_ids, prompts):
        from diffrl.distributed import distributed_group_advantages  # noqa: PLC0415

        clip = self.config.adv_clip if self.config.adv_clip > 0 else None
        return distributed_group_advantages(rewards.float(), group_ids.long(), std=self.config.adv_std,
                                            clip=clip).to(torch.float32)

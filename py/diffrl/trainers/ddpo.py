"""``DDPOTrainer``: DDPO on a UNet pipeline (SD 1.x / 2.x, SDXL), and RLCM on a latent consistency model.

DDIM sampling with stochasticity ``eta`` through ``DDIMSampler``; advantages from a per-prompt stat
tracker over the rewards of every rank (``use_tracker``), or group-normalised like GRPO without it.
On a ``LatentConsistencyModelPipeline`` the policy is LCM's own multistep sampler (``LCMSampler``: each step
re-noises the consistency estimate; ``eta`` does not apply), which is RLCM (Oertell et al. 2024).
The tracker's histories are part of the checkpoint, so a resumed run normalises as an uninterrupted one.
"""

from __future__ import annotations

import torch

from diffrl.trainers.base import BaseTrainer

__all__ = ["DDPOTrainer"]


class DDPOTrainer(BaseTrainer):
    """Rollouts of ``DDIMSampler``, tracker advantages, the PPO objective (kind ``ddpo``, diffrl.trainers.kinds)."""

    def __init__(self, config, **kwargs):
        from diffrl import PerPromptStatTracker  # noqa: PLC0415

        clip = config.adv_clip if config.adv_clip > 0 else None
        std = "global" if config.adv_std == "global" else "group"
        # before super().__init__: resuming there restores the tracker's state into it
        self.tracker = (PerPromptStatTracker(config.tracker_buffer_size, config.tracker_min_count, std=std, clip=clip)
                        if config.use_tracker else None)
        super().__init__(config, **kwargs)

    def make_sampler(self, pipe):
        from diffrl.samplers import DDIMSampler  # noqa: PLC0415
        from diffrl.samplers.families import get_adapter  # noqa: PLC0415

        kind = get_adapter(pipe).kind
        if kind == "lcm":  # RLCM: the consistency model's own stochastic multistep sampler is the policy (eta unused)
            from diffrl.samplers import LCMSampler  # noqa: PLC0415

            return LCMSampler(pipe)
        if kind != "ddim":  # say it in trainer terms, not the sampler's
            raise ValueError(f"DDPOTrainer trains DDIM/UNet pipelines (SD 1.5, SDXL); {type(pipe).__name__} is a "
                             "rectified-flow model: train it with GRPOTrainer (trainer: grpo) or NFTTrainer "
                             "(trainer: nft)")
        return DDIMSampler(pipe, eta=self.config.eta)

    def compute_advantages(self, rewards, group_ids, prompts, heads=None, rollout=None):
        from diffrl.distributed import distributed_group_advantages, gather_rewards, prompt_group_ids  # noqa: PLC0415

        cfg = self.config
        if self.tracker is None:
            clip = cfg.adv_clip if cfg.adv_clip > 0 else None
            return distributed_group_advantages(rewards.float(), group_ids.long(), std=cfg.adv_std, clip=clip)
        # the tracker is keyed by prompt; prompt hashes are equal on every rank, so every rank
        # updates an identical tracker with the gathered batch (in rank order) and keeps its rows
        keys = prompt_group_ids(prompts, device=rewards.device)
        all_r, all_k, start, stop = gather_rewards(rewards.float(), keys)
        adv = self.tracker.update(all_k.cpu().tolist(), all_r.cpu())
        return torch.as_tensor(adv, dtype=torch.float32)[start:stop].to(rewards.device)

    def extra_state(self):
        return {"tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_extra_state(self, states):
        if self.tracker is not None and "tracker" in states:
            self.tracker.load_state_dict(states["tracker"])

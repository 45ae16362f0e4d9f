"""``GRPOTrainer``: Flow-GRPO on a flow-matching pipeline (SD3 / SD3.5, FLUX.1).

SDE sampling through ``FlowSDESampler`` (``noise_level``, ``sde_type``; ``sde_window`` makes only
steps ``[start, end)`` stochastic and trained, as MixGRPO / Flow-GRPO-Fast; ``sde_window_move`` moves it per
epoch, ``share_prefix`` with ``same_initial_noise`` runs a group's steps before it once), advantages normalised
within each prompt's group across all ranks (``adv_std``, ``adv_clip``; ``advantage: win_rate`` and
``reward_aggregation: per_reward``: :mod:`diffrl.trainers.advantage`).
"""

from __future__ import annotations

import torch

from diffrl.trainers.base import BaseTrainer

__all__ = ["GRPOTrainer"]


class GRPOTrainer(BaseTrainer):
    """Rollouts of ``FlowSDESampler``, group advantages, the PPO objective (kind ``grpo``, diffrl.trainers.kinds).

    ``pairwise_reward``: a callable ``(images_a, images_b, prompts) -> [N]`` probabilities that each image of
    ``images_a`` is preferred to its partner, for ``advantage: win_rate`` (Pref-GRPO); without it the win
    rates come from the scalar reward."""

    def __init__(self, config, *, pairwise_reward=None, **kwargs):
        if pairwise_reward is not None and config.advantage != "win_rate":
            raise ValueError("pairwise_reward is used by advantage: win_rate only; the config has advantage: "
                             f"{config.advantage}")
        if pairwise_reward is not None and not callable(pairwise_reward):
            raise TypeError(f"pairwise_reward must be callable, got {type(pairwise_reward).__name__}")
        self.pairwise_reward = pairwise_reward
        super().__init__(config, **kwargs)

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

    def sampling_window(self, epoch: int):
        """The stochastic steps of ``epoch``'s rollouts: ``sde_window`` where it is fixed; moved per epoch by
        ``sde_window_move``: ``random`` draws its start uniformly from the epoch's generator (the same on
        every rank), ``slide`` moves it one step every ``sde_window_slide_every`` epochs from its configured
        start, wrapping to 0 after the last position."""
        cfg = self.config
        if cfg.sde_window_move == "fixed":
            return "default"
        start, end = cfg.sde_window
        size, positions = end - start, cfg.num_inference_steps - (end - start) + 1
        if cfg.sde_window_move == "random":
            start = int(torch.randint(positions, (), generator=self._generator(epoch, 3)))
        else:
            start = (start + (epoch - 1) // cfg.sde_window_slide_every) % positions  # epochs count from 1
        return (start, start + size)

    def compute_advantages(self, rewards, group_ids, prompts, heads=None, rollout=None):
        from diffrl.trainers.advantage import grpo_advantages  # noqa: PLC0415

        dense = None
        if self.config.advantage == "dense":
            from diffrl.trainers.advantage import dense_step_rewards  # noqa: PLC0415

            if rollout is None:
                raise ValueError("advantage: dense needs the rollout (its trajectories are completed and scored)")
            dense = dense_step_rewards(self.sampler, self.reward_fn, rollout, rewards)
        return grpo_advantages(self.config, rewards, group_ids, heads=heads, rollout=rollout,
                               pairwise=self.pairwise_reward, dense=dense)

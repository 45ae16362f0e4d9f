"""Where an epoch's training data comes from: the data-source hook of the trainers.

A data source's ``collect(epoch)`` returns an :class:`EpochData`: the batch the objective trains on,
its advantages (None: no update this epoch, e.g. a non-finite reward), and the metrics it measured.
:class:`RolloutSource` (the online RL trainers) samples the policy being trained, scores the images
and turns the rewards into advantages through the trainer's ``compute_advantages``. An offline
source (preference pairs from a dataset, for DPO) returns its pairs the same way.

Everything random comes from the trainer's generators seeded by (seed, epoch, rank, purpose), so an
epoch's data depends only on the state at its start (see :mod:`diffrl.trainers.base`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EpochData", "RolloutSource"]


@dataclass
class EpochData:
    batch: Any                          # what the objective trains on (a Rollout, for the RL trainers)
    advantages: torch.Tensor | None     # this rank's [B]; None: skip the update of this epoch
    record: dict[str, Any] = field(default_factory=dict)  # metrics of the epoch's data (rewards, times)


class RolloutSource:
    """Rollouts of the trained policy: ``prompts_per_epoch`` prompts x ``group_size`` images per epoch,
    split over the ranks by prompt (a group never spans ranks)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.config = trainer.config

    def prompts(self, epoch: int) -> tuple[list[str], list[int]]:
        """This rank's prompts of ``epoch`` and their group ids (positions in the epoch's global draw,
        the same on every rank: a group never spans ranks, each rank samples its share)."""
        tr = self.trainer
        n = self.config.prompts_per_epoch
        draw = torch.randint(len(tr.prompts), (n,), generator=tr._generator(epoch, 0)).tolist()
        mine = list(range(tr.rank, n, tr.world))
        return [tr.prompts[draw[i]] for i in mine], mine

    def sample(self, epoch: int):
        from diffrl.samplers import Rollout  # noqa: PLC0415

        tr, cfg = self.trainer, self.config
        prompts, gids = self.prompts(epoch)
        if not prompts:
            raise ValueError(f"prompts_per_epoch={cfg.prompts_per_epoch} gives rank {tr.rank} of {tr.world} "
                             "no prompts; use at least one prompt per process")
        per_call = max(1, cfg.sample_batch_size // cfg.group_size)
        window = tr.sampling_window(epoch)
        parts = []
        for c, i in enumerate(range(0, len(prompts), per_call)):
            gen = tr._generator(epoch, 1, tr.rank, c)
            with torch.no_grad(), tr.accelerator.autocast(), tr.sampling_weights():
                parts.append(tr.sampler.sample(
                    prompts[i:i + per_call], num_images_per_prompt=cfg.group_size,
                    num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                    height=cfg.resolution, width=cfg.resolution, generator=gen, group_ids=gids[i:i + per_call],
                    same_initial_noise=cfg.same_initial_noise, share_prefix=cfg.share_prefix, sde_steps=window,
                    keep_final_latents=tr.objective_class.keep_final_latents))
        return Rollout.cat(parts)

    def score(self, rollout) -> dict[str, torch.Tensor]:
        from diffrl.rewards.base import accepts_condition_images  # noqa: PLC0415

        reward_fn, kw = self.trainer.reward_fn, {}
        # an editing family's input images, for the rewards that take them (diffrl.rewards.base)
        if getattr(rollout, "condition_images", None) is not None and accepts_condition_images(reward_fn):
            kw["condition_images"] = rollout.condition_images
        with torch.no_grad():
            out = reward_fn(rollout.images, rollout.prompts, **kw)
        if not isinstance(out, dict) or "reward" not in out:
            raise TypeError("a reward must return a dict with a 'reward' entry")
        return {k: v.detach().float().reshape(len(rollout), -1).mean(1) if isinstance(v, torch.Tensor) else v
                for k, v in out.items()}

    def collect(self, epoch: int) -> EpochData:
        from diffrl.distributed import gather_rewards  # noqa: PLC0415

        tr = self.trainer
        t0 = time.perf_counter()
        rollout = self.sample(epoch)
        t1 = time.perf_counter()
        heads = self.score(rollout)
        rewards = heads["reward"].to(tr.device)
        t2 = time.perf_counter()
        gids = rollout.group_ids.to(tr.device)
        all_rewards = gather_rewards(rewards, gids)[0]
        rec: dict[str, Any] = {"reward_mean": float(all_rewards.mean()),
                               "reward_std": float(all_rewards.std(unbiased=False)) if all_rewards.numel() else 0.0}
        for k, v in heads.items():  # every head's mean over all ranks (one gather per head)
            if k != "reward" and isinstance(v, torch.Tensor):
                rec[f"reward/{k}"] = float(gather_rewards(v.to(tr.device), gids)[0].mean())
        rec.update(time_sample=t1 - t0, time_reward=t2 - t1, samples=len(all_rewards))
        window = tr.sampling_window(epoch)
        if window != "default":  # a moving window: where it was this epoch
            rec["sde_window_start"] = window[0]
        if not bool(torch.isfinite(all_rewards).all()):  # advantages of non-finite rewards mean nothing
            return EpochData(rollout, None, rec)
        tensors = {k: v.to(tr.device) for k, v in heads.items() if isinstance(v, torch.Tensor)}
        adv = tr.compute_advantages(rewards, gids, rollout.prompts, heads=tensors, rollout=rollout)
        # this rank's batch of the last epoch, for inspection and the multi-process tests
        tr.last_batch = {"rewards": rewards.detach().cpu(), "group_ids": rollout.group_ids.cpu(),
                         "advantages": adv.detach().cpu(), "prompts": list(rollout.prompts)}
        all_adv = gather_rewards(adv.float(), gids)[0]  # stats of the global batch
        rec.update(adv_mean=float(all_adv.mean()), adv_std=float(all_adv.std(unbiased=False)),
                   adv_min=float(all_adv.min()), adv_max=float(all_adv.max()))
        return EpochData(rollout, adv, rec)

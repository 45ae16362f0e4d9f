"""Where an epoch's training data comes from: the data-source hook of the trainers.

A data source's ``collect(epoch)`` returns an :class:`EpochData`: the batch the objective trains on,
its advantages (None: no update this epoch, e.g. a non-finite reward), and the metrics it measured.
:class:`RolloutSource` (the online RL trainers) samples the policy being trained, scores the images
and turns the rewards into advantages through the trainer's ``compute_advantages``. An offline
source (preference pairs from a dataset, for DPO) returns its pairs the same way.

Everything random comes from the trainer's generators seeded by (seed, epoch, rank, purpose), so an
epoch's data depends only on the state at its start (see :mod:`diffrl.trainers.base`).

Per-prompt metadata (``trainer.prompt_metadata``, from a ``.jsonl`` prompts file) goes to the reward
with each image (``reward(images, prompts, metadata=...)``, for rewards that accept it).

``overlap_scoring``: the reward scores each sampler call's images in a background thread while the
next call samples (a remote reward's request is in flight, a local one runs beside the sampler). The
scores are the same as those of one call on the whole batch when the reward scores each image
independently of the rest of its batch (JPEG, shapes, a remote reward of either; batched neural models
may differ in the last bits), and the reward runs under ``no_grad`` in that thread.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EpochData", "RolloutSource", "read_prompts"]


def read_prompts(prompts, path: str = "", *, key: str = "prompts") -> tuple[list[str], list | None]:
    """``(prompts, metadata)``: the strings of ``prompts``, then those of the file at ``path``: one prompt a
    line, or for a ``.jsonl`` file one JSON object a line with a ``"prompt"`` string (GenEval's metadata
    format), the whole object being that prompt's metadata. ``metadata`` is None when no prompt has any,
    else one dict (or None for a plain prompt) per prompt."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    out, meta = list(prompts), [None] * len(prompts)
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"{key}_file {str(file)!r} does not exist")
        lines = [line.strip() for line in file.read_text().splitlines()]
        if file.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{n}: not a JSON object ({e})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"{file}:{n}: each line must be a JSON object with a \"prompt\" string")
                out.append(obj["prompt"])
                meta.append(obj)
        else:
            out += [line for line in lines if line]
            meta += [None] * (len(out) - len(meta))
    return out, (meta if any(m is not None for m in meta) else None)


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

    def metadata(self, epoch: int) -> list | None:
        """Per-prompt metadata of this rank's prompts of ``epoch`` (as :meth:`prompts` draws them), or None."""
        tr = self.trainer
        meta = getattr(tr, "prompt_metadata", None)
        if meta is None:
            return None
        n = self.config.prompts_per_epoch
        draw = torch.randint(len(tr.prompts), (n,), generator=tr._generator(epoch, 0)).tolist()
        return [meta[draw[i]] for i in range(tr.rank, n, tr.world)]

    def sample(self, epoch: int, on_part=None):
        """This rank's rollout of ``epoch``; ``on_part(part)`` is called with each sampler call's rollout."""
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
            if on_part is not None:
                on_part(parts[-1])
        return Rollout.cat(parts)

    def score(self, rollout, metadata=None) -> dict[str, torch.Tensor]:
        """The reward's heads [B] of ``rollout`` (``metadata``: one entry per sample, or None)."""
        from diffrl.rewards.base import call_reward  # noqa: PLC0415

        # an editing family's input images go to the rewards that take them (diffrl.rewards.base)
        with torch.no_grad():
            out = call_reward(self.trainer.reward_fn, rollout.images, rollout.prompts, metadata=metadata,
                              condition_images=getattr(rollout, "condition_images", None))
        if not isinstance(out, dict) or "reward" not in out:
            raise TypeError("a reward must return a dict with a 'reward' entry")
        return {k: v.detach().float().reshape(len(rollout), -1).mean(1) if isinstance(v, torch.Tensor) else v
                for k, v in out.items()}

    def collect(self, epoch: int) -> EpochData:
        from diffrl.distributed import gather_rewards  # noqa: PLC0415

        tr = self.trainer
        meta = self.metadata(epoch)
        if meta is not None:  # prompt-major: each prompt's metadata for its group_size images
            meta = [m for m in meta for _ in range(self.config.group_size)]
        t0 = time.perf_counter()
        if getattr(self.config, "overlap_scoring", False):
            rollout, t1, heads = self._sample_and_score_overlapped(epoch, meta)
        else:
            rollout = self.sample(epoch)
            t1 = time.perf_counter()
            heads = self.score(rollout, meta)
        rewards = heads["reward"].to(tr.device)
        t2 = time.perf_counter()  # (overlapped: time_reward is the wait for the scores after the last call)
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

    def _sample_and_score_overlapped(self, epoch: int, meta):
        """(rollout, time after sampling, heads): each sampler call's images scored in a background thread
        while the next call samples; the heads concatenated in sample order."""
        futures, done = [], [0]

        def submit(part):
            lo = done[0]
            done[0] += len(part)
            futures.append(pool.submit(self.score, part, None if meta is None else meta[lo:done[0]]))

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffrl-reward") as pool:
            rollout = self.sample(epoch, on_part=submit)
            t1 = time.perf_counter()
            parts = [f.result() for f in futures]  # (re-raises the reward's error here)
        keys = list(parts[0])
        if any(list(p) != keys for p in parts[1:]):
            raise ValueError(f"the reward returned different heads for the sampler calls of one epoch: "
                             f"{[sorted(p) for p in parts]}")
        heads = {k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor) else parts[0][k]
                 for k in keys}
        return rollout, t1, heads

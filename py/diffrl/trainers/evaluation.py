"""Held-out evaluation during training: every ``eval_every`` epochs, the current policy on fixed prompts.

The eval prompts (``eval_prompts`` + ``eval_prompts_file``) get one image each, sampled with the
training sampler's noise switched off (Euler / DDIM eta 0: the pipeline's own deterministic sampling)
from initial noise that depends only on the run seed and the prompt's position, so every evaluation
of a run sees the same starting points and differs only by the weights. The images are written as the
epoch's grid and scored by the training reward (with the prompts' metadata); the epoch's metrics
record gets ``eval/reward`` and ``eval/<head>`` for the other heads (means over the eval prompts),
which the trackers log like every numeric entry.
"""

from __future__ import annotations

import copy

import torch

__all__ = ["deterministic_sampler", "evaluate_policy", "EVAL_PURPOSE"]

EVAL_PURPOSE = 3  # the trainer's generator keys (0, EVAL_PURPOSE, i): prompt i's initial noise, every evaluation

# the noise knobs of the samplers (FlowSDESampler, DDIMSampler): 0 makes every step deterministic
_NOISE_ATTRS = ("noise_level", "eta")


def deterministic_sampler(sampler):
    """A shallow copy of ``sampler`` (same pipeline) with its noise off, or ``sampler`` itself when it has
    no known noise knob (it is then seeded but may be stochastic)."""
    knobs = [a for a in _NOISE_ATTRS if hasattr(sampler, a)]
    if not knobs:
        return sampler
    out = copy.copy(sampler)
    for a in knobs:
        setattr(out, a, 0.0)
    return out


def evaluate_policy(trainer, epoch: int) -> dict[str, float]:
    """Sample, save the grid of and score the eval prompts; the record entries (empty off the main process)."""
    from diffrl.rewards.base import call_reward  # noqa: PLC0415

    tr, cfg = trainer, trainer.config
    if not tr.accelerator.is_main_process and not tr.parallel.partitioned:  # (FSDP, ZeRO-3: all ranks sample)
        return {}
    prompts, meta = list(tr.eval_prompts), tr.eval_metadata
    sampler = deterministic_sampler(tr.sampler)
    images, conditions = [], []
    per_call = max(1, cfg.sample_batch_size)
    for s in range(0, len(prompts), per_call):
        chunk = prompts[s:s + per_call]
        gens = [tr._generator(0, EVAL_PURPOSE, s + j) for j in range(len(chunk))]
        with torch.no_grad(), tr.accelerator.autocast():
            r = sampler.sample(chunk, num_images_per_prompt=1, num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution,
                               generator=gens)
        images.append(r.images.float())
        conditions.append(getattr(r, "condition_images", None))  # (an editing family's input images)
    if not tr.accelerator.is_main_process:
        return {}
    images = torch.cat(images)
    condition_images = None if any(c is None for c in conditions) else torch.cat(conditions)
    tr.save_grid(epoch, images=images)
    with torch.no_grad():
        out = call_reward(tr.reward_fn, images, prompts, metadata=meta, condition_images=condition_images)
    if not isinstance(out, dict) or "reward" not in out:
        raise TypeError("a reward must return a dict with a 'reward' entry")
    return {"eval/reward" if k == "reward" else f"eval/{k}": float(v.detach().float().mean())
            for k, v in out.items() if isinstance(v, torch.Tensor)}

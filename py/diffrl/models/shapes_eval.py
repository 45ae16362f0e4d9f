"""Held-out evaluation of shapes models: the fixed prompt split, sampling with fixed seeds, scoring.

Shared by ``scripts/train_shapes_base.py`` (pre-training), ``diffrl demo`` (before / after RL) and
``bench/bench_shapes_grpo.py`` (trainer comparison), so that every number is measured the same way:

- held-out prompt ``i`` is ``random_prompt(random.Random(EVAL_SEED + i))``; training prompts never
  share a scene key (:attr:`Scene.key`: "A left of B" and "B right of A" are the same scene) with the
  first :data:`HELDOUT_RESERVED` (200) held-out prompts, so accuracy is measured on scenes never
  trained on (the packaged base model was pre-trained with the same exclusion);
- image ``i`` of an evaluation starts from the noise of ``torch.Generator().manual_seed(i)``, so it
  does not depend on the batch size or the device's generator; with several images per prompt, seed
  set ``k`` uses seeds ``i + 10_000 k``. One image per prompt is a noisy measure: 16 seed sets of the
  base model score 0.33-0.43 (mean 0.39, standard deviation 0.03; set 0: 0.34), so a difference of a
  few points on one seed set is chance;
- sampling is the pipeline's own deterministic Euler sampler (``pipe(...)``), ``steps`` steps, CFG ``cfg``.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from diffrl.models.shapes import parse_prompt, random_prompt

EVAL_SEED = 1_000_000
#: held-out prompts reserved from training (evaluations use the first N <= this many)
HELDOUT_RESERVED = 200
#: seed set k of an evaluation with several images per prompt seeds image i with i + SEED_SET_STRIDE * k
SEED_SET_STRIDE = 10_000

__all__ = ["EVAL_SEED", "HELDOUT_RESERVED", "SEED_SET_STRIDE", "heldout_prompts", "training_prompts", "evaluate",
           "paired_bootstrap", "save_grid"]


def heldout_prompts(n: int) -> list[str]:
    """The first ``n`` held-out prompts (fixed for every run)."""
    if n > HELDOUT_RESERVED:
        raise ValueError(f"at most {HELDOUT_RESERVED} held-out prompts are reserved from training, asked for {n}")
    return [random_prompt(random.Random(EVAL_SEED + i)) for i in range(n)]


def training_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts drawn from the grammar, none of them a held-out scene (seeded, may repeat)."""
    banned = {parse_prompt(p).key for p in heldout_prompts(HELDOUT_RESERVED)}
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        p = random_prompt(rng)
        if parse_prompt(p).key not in banned:
            out.append(p)
    return out


@torch.no_grad()
def evaluate(pipe, prompts, reward, *, images_per_prompt: int = 1, steps: int = 20, cfg: float = 4.0,
             batch: int = 50):
    """Samples ``images_per_prompt`` images per prompt and scores them -> ``(metrics, images [K * N, 3, H, W]
    on the CPU)``, seed set by seed set: image ``i`` of seed set ``k`` starts from the noise of
    ``torch.Generator().manual_seed(i + SEED_SET_STRIDE * k)`` (set 0 is the one-image evaluation).

    ``metrics``: the mean over every image of every reward head ("reward", "correct", "count",
    "colour", "shape", "relation"), ``accuracy`` (= "correct": the fraction of images exactly right),
    ``relation_on_relation_prompts`` (the relation head on the prompts that have one) and
    ``accuracy_per_seed_set`` (a list of K accuracies: how much one image per prompt moves by chance) and
    ``accuracy_per_prompt`` (N accuracies, each over the K seed sets: what :func:`paired_bootstrap` resamples)."""
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be a positive int, got {images_per_prompt!r}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    scores = {h: [] for h in reward.heads}
    images = []
    for k in range(images_per_prompt):
        for s in range(0, len(prompts), batch):
            chunk = list(prompts[s:s + batch])
            gens = [torch.Generator().manual_seed(SEED_SET_STRIDE * k + s + j) for j in range(len(chunk))]
            imgs = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gens).images.float().cpu()
            out = reward(imgs, chunk)
            for h in reward.heads:
                scores[h].append(out[h].float().cpu())
            images.append(imgs)
    per_image = {h: torch.cat(v) for h, v in scores.items()}
    res = {h: v.mean().item() for h, v in per_image.items()}
    rel = [k * len(prompts) + i for k in range(images_per_prompt)
           for i, p in enumerate(prompts) if parse_prompt(p).relation is not None]
    if rel:
        res["relation_on_relation_prompts"] = per_image["relation"][rel].mean().item()
    res["accuracy"] = res["correct"]
    correct = per_image["correct"].view(images_per_prompt, len(prompts))
    res["accuracy_per_seed_set"] = correct.mean(1).tolist()
    res["accuracy_per_prompt"] = correct.mean(0).tolist()
    return res, torch.cat(images)


def paired_bootstrap(before, after, *, resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Confidence interval of a change in mean accuracy, by the bootstrap over prompts.

    ``before`` / ``after``: per-prompt accuracies of the same prompts (``accuracy_per_prompt`` of two
    :func:`evaluate` results with the same prompts and seed sets). The prompts are resampled with
    replacement ``resamples`` times, keeping each prompt's before and after together (the pairing
    removes the prompts' own difficulty from the noise) -> ``{"change", "ci_low", "ci_high", "level",
    "resamples", "significant"}``: the change of the mean, the percentile interval at ``level``, and
    whether the interval excludes 0."""
    b = torch.as_tensor(before, dtype=torch.float64)
    a = torch.as_tensor(after, dtype=torch.float64)
    if b.dim() != 1 or b.shape != a.shape or b.numel() < 2:
        raise ValueError(f"before and after must be per-prompt accuracies of the same (>= 2) prompts, got shapes "
                         f"{tuple(b.shape)} and {tuple(a.shape)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")
    d = a - b
    g = torch.Generator().manual_seed(seed)
    means = torch.empty(resamples, dtype=torch.float64)
    for s in range(0, resamples, 1000):  # 1000 resamples at a time keeps the index matrix small
        n = min(1000, resamples - s)
        idx = torch.randint(len(d), (n, len(d)), generator=g)
        means[s:s + n] = d[idx].mean(1)
    alpha = (1.0 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return {"change": d.mean().item(), "ci_low": lo, "ci_high": hi, "level": level, "resamples": resamples,
            "significant": bool(lo > 0.0 or hi < 0.0)}


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 1, scale: int = 2) -> None:
    """A PNG grid of [N, 3, H, W] images in [0, 1], upscaled ``scale`` x (nearest) for viewing."""
    from PIL import Image  # noqa: PLC0415

    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), 0.5)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    arr = (grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)

"""The reward interface, its input checks, and MultiReward.

A reward is a callable ``reward(images, prompts, group_ids=None) -> dict[str, Tensor[B]]``:
``images`` float [B, 3, H, W] in [0, 1] (what a pipeline decodes), ``prompts`` a list of B
strings, ``group_ids`` optional ints [B] (which images share a prompt's group). The key
``"reward"`` holds the score a trainer optimises; other keys are heads worth logging. Values are
float32 [B] on the images' device.

Editing (FLUX.1-Kontext): a reward whose call signature has a ``condition_images`` parameter (or
``**kwargs``) is also given the input image of each sample, ``condition_images`` float [B, 3, h, w]
in [0, 1] as the model saw it (``Rollout.condition_images``); other rewards are called as above.
Video families decode to ``[B, 3, F, H, W]``: score them with ``FrameWise(image_reward)``.

Per-prompt metadata (optional): ``reward(images, prompts, metadata=[dict | None] * B)``, e.g. the
GenEval-style targets of a ``.jsonl`` prompts file. Every :class:`Reward` takes the keyword (and
ignores it unless the subclass sets ``uses_metadata``); :func:`call_reward` passes it only to
callables that accept it, so a plain ``(images, prompts)`` function keeps working.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import torch


class Reward:
    """Base class: ``__call__`` checks the inputs and hands them to ``score``.

    Subclasses implement ``score(images, prompts, group_ids)`` on checked inputs: ``images`` a
    float tensor [B, 3, H, W] clamped to [0, 1], ``prompts`` a list of B str, ``group_ids`` None
    or an int64 tensor [B] on the images' device. ``heads`` lists the keys the result has.
    ``range_slack``: values up to this far outside [0, 1] (a decoder's rounding) are accepted
    and clamped; anything further is an error (images in [-1, 1] or [0, 255] are a common slip).
    """

    heads: tuple[str, ...] = ("reward",)
    range_slack: float = 1e-3
    #: whether ``score`` is a torch function of the images whose gradient is wanted (reward backprop):
    #: then the checked images keep their autograd graph; otherwise they are detached
    differentiable: bool = False
    uses_metadata: bool = False  # True: score(images, prompts, group_ids, metadata) gets the per-prompt metadata

    def __call__(self, images, prompts, group_ids=None, metadata=None) -> dict[str, torch.Tensor]:
        name = type(self).__name__
        images, prompts, group_ids = check_inputs(images, prompts, group_ids, range_slack=self.range_slack,
                                                  name=name, keep_grad=self.differentiable)
        metadata = check_metadata(metadata, len(prompts), name=name)
        if self.uses_metadata:
            return self.score(images, prompts, group_ids, metadata)
        return self.score(images, prompts, group_ids)

    def score(self, images: torch.Tensor, prompts: list[str],
              group_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _takes_keyword(fn, name: str) -> bool:
    """Whether the callable ``fn`` takes the keyword ``name`` (named, or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without an inspectable signature
        return False
    return any((p.name == name and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD for p in params)


def accepts_condition_images(reward) -> bool:
    """Whether ``reward`` takes the ``condition_images`` keyword (named, or through ``**kwargs``)."""
    return _takes_keyword(reward, "condition_images")


def check_inputs(images, prompts, group_ids=None, *, range_slack: float = 1e-3, name: str = "reward",
                 keep_grad: bool = False):
    """(images, prompts, group_ids) checked and normalised, or a clear TypeError/ValueError. The images come
    back detached unless ``keep_grad``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{name}: images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        hint = " (videos [B, 3, F, H, W]: wrap the reward in diffrl.rewards.FrameWise)" if images.dim() == 5 else ""
        raise ValueError(f"{name}: images must be [B, 3, H, W], got shape {tuple(images.shape)}{hint}")
    B = images.shape[0]
    if B == 0:
        raise ValueError(f"{name}: empty batch (images has shape {tuple(images.shape)})")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name}: images have no pixels (shape {tuple(images.shape)})")
    if not keep_grad:
        images = images.detach()
    lo, hi = torch.stack(torch.aminmax(images.detach())).float().tolist()  # one device-to-host copy
    # NaN fails both comparisons
    if not (lo >= -range_slack and hi <= 1.0 + range_slack):
        raise ValueError(f"{name}: images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(from [-1, 1] use images / 2 + 0.5; from uint8 use images / 255)")
    images = images.clamp(0.0, 1.0)

    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name}: prompts must be a list of str (one per image), got {type(prompts).__name__}")
    prompts = list(prompts)
    if any(not isinstance(p, str) for p in prompts):
        bad = next(p for p in prompts if not isinstance(p, str))
        raise TypeError(f"{name}: prompts must be str, got an element of type {type(bad).__name__}")
    if len(prompts) != B:
        raise ValueError(f"{name}: {len(prompts)} prompts for {B} images (one prompt per image)")

    if group_ids is not None:
        if not isinstance(group_ids, torch.Tensor):
            group_ids = torch.as_tensor(group_ids)
        if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
            raise TypeError(f"{name}: group_ids must be integers, got {group_ids.dtype}")
        if group_ids.shape != (B,):
            raise ValueError(f"{name}: group_ids must have shape [{B}], got {tuple(group_ids.shape)}")
        group_ids = group_ids.to(device=images.device, dtype=torch.int64)
    return images, prompts, group_ids


def check_metadata(metadata, n: int, *, name: str = "reward"):
    """None, or a list of ``n`` entries each a dict (or None: no metadata for that prompt)."""
    if metadata is None:
        return None
    if isinstance(metadata, (str, Mapping)) or not isinstance(metadata, Sequence):
        raise TypeError(f"{name}: metadata must be a list of dicts (one per image), got {type(metadata).__name__}")
    metadata = list(metadata)
    if len(metadata) != n:
        raise ValueError(f"{name}: {len(metadata)} metadata entries for {n} images (one per image)")
    for i, m in enumerate(metadata):
        if m is not None and not isinstance(m, Mapping):
            raise TypeError(f"{name}: metadata[{i}] must be a dict or None, got {type(m).__name__}")
    return metadata


def accepts_metadata(fn) -> bool:
    """Whether the reward callable ``fn`` takes a ``metadata`` keyword (a :class:`Reward` always does)."""
    return isinstance(fn, Reward) or _takes_keyword(fn, "metadata")


def call_reward(fn, images, prompts, group_ids=None, *, metadata=None, condition_images=None):
    """``fn(images, prompts[, group_ids][, metadata=...][, condition_images=...])``: each optional argument
    only when given and (the keywords) only when ``fn`` accepts it, so a plain ``(images, prompts)``
    callable works unchanged."""
    args = (images, prompts) if group_ids is None else (images, prompts, group_ids)
    kw = {}
    if metadata is not None and accepts_metadata(fn):
        kw["metadata"] = metadata
    if condition_images is not None and accepts_condition_images(fn):
        kw["condition_images"] = condition_images
    return fn(*args, **kw)


class MultiReward(Reward):
    """Named rewards combined with weights: ``reward = sum_name weight[name] * rewards[name]["reward"]``.

    Every head of every reward is kept for logging as ``"<name>/<head>"`` (so ``"pick/reward"``,
    ``"jpeg/jpeg_kb"``, ...), next to the combined ``"reward"``. Weights default to 1.
    Inputs are checked once here; each reward checks them again (cheap). Metadata is passed on to the
    rewards that accept it.
    """

    uses_metadata = True

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float] | None = None):
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("MultiReward: rewards must be a non-empty mapping name -> reward")
        for n, r in rewards.items():
            if not isinstance(n, str) or not n or "/" in n:
                raise ValueError(f"MultiReward: reward names must be non-empty str without '/', got {n!r}")
            if not callable(r):
                raise TypeError(f"MultiReward: reward {n!r} is not callable")
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(f"MultiReward: weights for unknown rewards {sorted(unknown)}")
        for n, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"MultiReward: weight of {n!r} must be a finite number, got {w!r}")
        self.rewards = dict(rewards)
        self.weights = {n: float(weights.get(n, 1.0)) for n in self.rewards}
        self.heads = ("reward",) + tuple(f"{n}/{h}" for n, r in self.rewards.items()
                                         for h in getattr(r, "heads", ("reward",)))
        self.range_slack = min(getattr(r, "range_slack", Reward.range_slack) for r in self.rewards.values())

    def score(self, images, prompts, group_ids, metadata=None):
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for n, r in self.rewards.items():
            res = r(images, prompts, group_ids) if metadata is None or not accepts_metadata(r) else \
                r(images, prompts, group_ids, metadata=metadata)
            if "reward" not in res:
                raise ValueError(f"MultiReward: reward {n!r} returned no 'reward' key (got {sorted(res)})")
            for h, val in res.items():
                out[f"{n}/{h}"] = val
            total = total + self.weights[n] * res["reward"].to(device=images.device, dtype=torch.float32)
        out["reward"] = total
        return out

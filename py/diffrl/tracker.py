"""Per-prompt reward statistics across batches: DDPO's ``PerPromptStatTracker``, checkpointable."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Sequence

import numpy as np
import torch

_STDS = ("group", "global")


class PerPromptStatTracker:
    """Normalises each sample's reward with the recent rewards of its prompt (DDPO's per-prompt stat
    tracking; with ``buffer_size=None, min_count=0`` and ``clear()`` every epoch, Flow-GRPO's).

    ``update(prompts, rewards)``, for a batch of B samples:

    1. each reward is appended to its prompt's history, in batch order; a history keeps the
       ``buffer_size`` most recent rewards (``None``: all of them);
    2. a prompt whose history holds at least ``min_count`` rewards is normalised with the history's
       mean and population std; below that, with the mean and std of the whole current batch
       (all prompts), the fall-back DDPO uses while a prompt is new;
    3. ``A = (r - mean) / (std + eps)``; ``std="global"`` uses the current batch's std for every
       prompt (the mean still per prompt's history, Flow-GRPO's ``global_std``). A set of equal
       rewards has exactly its value as mean and std 0, so a reward equal to it gets exactly 0;
       a zero denominator (``eps=0``) gives 0, never NaN or inf. ``clip`` clamps to [-clip, clip].

    Returns float32 [B] on the rewards' device (CPU for lists or arrays). Statistics are float64 on
    the host, like the research code's numpy trackers: the history lives on the host anyway (one
    device-to-host copy of the rewards per update). Prompts are any hashable keys (strings, ints);
    a tensor of ids is taken as ints. ``state_dict()``/``load_state_dict()`` put the histories into
    checkpoints (keys must then be picklable: strings or ints).
    """

    def __init__(self, buffer_size: int | None = 16, min_count: int = 16, *, eps: float = 1e-6, std: str = "group",
                 clip: float | None = None):
        if buffer_size is not None and (isinstance(buffer_size, bool) or not isinstance(buffer_size, int)
                                        or buffer_size < 1):
            raise ValueError(f"PerPromptStatTracker: buffer_size must be None or an int >= 1, got {buffer_size!r}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise ValueError(f"PerPromptStatTracker: min_count must be an int >= 0, got {min_count!r}")
        if buffer_size is not None and min_count > buffer_size:
            raise ValueError(f"PerPromptStatTracker: min_count ({min_count}) > buffer_size ({buffer_size}): "
                             "no history could ever be used")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"PerPromptStatTracker: eps must be a finite float >= 0, got {eps!r}")
        if std not in _STDS:
            raise ValueError(f"PerPromptStatTracker: std must be one of {_STDS}, got {std!r}")
        if clip is not None and (not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip <= 0):
            raise ValueError(f"PerPromptStatTracker: clip must be None or a finite float > 0, got {clip!r}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = float(eps)
        self.std = std
        self.clip = None if clip is None else float(clip)
        self._history: dict[Hashable, deque] = {}

    # ------------------------------------------------------------------------------------------
    def update(self, prompts: Sequence[Hashable] | torch.Tensor, rewards) -> torch.Tensor:
        """Add a batch to the histories and return its advantages (float32 [B])."""
        device = rewards.device if isinstance(rewards, torch.Tensor) else torch.device("cpu")
        r = _host_float64(rewards)
        keys = prompts.tolist() if isinstance(prompts, torch.Tensor) else list(prompts)
        if len(keys) != r.shape[0]:
            raise ValueError(f"PerPromptStatTracker.update: {len(keys)} prompts for {r.shape[0]} rewards")
        if r.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32, device=device)
        index: dict[Hashable, int] = {}
        inv = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(keys))
        U = len(index)
        order = np.argsort(inv, kind="stable")
        per_prompt = np.split(r[order], np.cumsum(np.bincount(inv, minlength=U))[:-1])
        batch = _stats(r)
        mean = np.empty(U)
        sd = np.empty(U)
        for u, key in enumerate(index):
            hist = self._history.get(key)
            if hist is None:
                hist = self._history[key] = deque(maxlen=self.buffer_size)
            hist.extend(per_prompt[u].tolist())
            if len(hist) >= self.min_count:
                mean[u], sd[u] = _stats(np.fromiter(hist, dtype=np.float64, count=len(hist)))
            else:
                mean[u], sd[u] = batch
        if self.std == "global":
            sd[:] = batch[1]
        centred = r - mean[inv]
        denom = sd[inv] + self.eps
        adv = np.where(denom > 0, centred / np.where(denom > 0, denom, 1.0), 0.0)
        if self.clip is not None:
            adv = np.clip(adv, -self.clip, self.clip)
        return torch.from_numpy(adv.astype(np.float32)).to(device)

    def get_stats(self) -> dict[Hashable, dict[str, float]]:
        """Per prompt: mean, std (population) and count of its history."""
        out = {}
        for k, h in self._history.items():
            m, s = _stats(np.fromiter(h, dtype=np.float64, count=len(h)))
            out[k] = {"mean": m, "std": s, "count": len(h)}
        return out

    def clear(self) -> None:
        """Forget every history (Flow-GRPO clears its tracker once per epoch)."""
        self._history.clear()

    def __len__(self) -> int:
        return len(self._history)

    def __contains__(self, key) -> bool:
        return key in self._history

    def history(self, key) -> list[float]:
        """The rewards kept for a prompt, oldest first."""
        return list(self._history.get(key, ()))

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The histories (and, for reference, the settings); plain Python objects."""
        return {
            "version": 1,
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "eps": self.eps,
            "std": self.std,
            "clip": self.clip,
            "history": {k: list(h) for k, h in self._history.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the histories (trimmed to this tracker's buffer_size); settings stay this tracker's."""
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError("PerPromptStatTracker.load_state_dict: not a tracker state (no 'history')")
        history = {}
        for k, vals in state["history"].items():
            arr = np.asarray(list(vals), dtype=np.float64)
            if arr.ndim != 1 or not np.isfinite(arr).all():
                raise ValueError(f"PerPromptStatTracker.load_state_dict: the history of {k!r} is not finite floats")
            history[k] = deque(arr.tolist(), maxlen=self.buffer_size)
        self._history = history


def _host_float64(rewards) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        if not rewards.is_floating_point():
            rewards = rewards.double()
        r = rewards.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"PerPromptStatTracker.update: rewards must be [B], got shape {r.shape}")
    if not np.isfinite(r).all():
        raise ValueError(f"PerPromptStatTracker.update: rewards must be finite; row {int(np.argmin(np.isfinite(r)))} "
                         f"is {r[np.argmin(np.isfinite(r))]}")
    return r


def _stats(vals: np.ndarray) -> tuple[float, float]:
    """(mean, population std); equal values give exactly (value, 0)."""
    if vals.min() == vals.max():
        return float(vals[0]), 0.0
    return float(vals.mean()), float(vals.std())

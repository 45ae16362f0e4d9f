"""Group-normalised advantages (GRPO family) and Pref-GRPO's win rate:
``diffrl.ops.group_advantages`` and ``diffrl.ops.win_rate``.

How the fast backends (cpp, triton, cuda) work, with no host synchronisation:

1. In PyTorch, a stable ``argsort`` of the group ids (win_rate: of the scores, then stably of the
   ids, so that each group's scores ascend) and a gather of the sorted ids. That is all the
   preparation; ``std="global"`` adds one reduction for the batch std.
2. One kernel launch over the B sorted rows (the number of groups is never needed on the host).
   A row whose id differs from the previous row's starts a segment; its worker (a CPU thread, a
   CUDA block, a Triton program) scans to the segment's end and reduces it in a fixed order in
   float64: sum, min and max, then the squared deviations from the mean; then it writes the
   segment's rows. Other workers return at once. Work is O(B * C) for C statistic columns, the
   same for any group sizes: one huge group is reduced by one block of threads in parallel, and
   all-singleton batches are B tiny segments. win_rate: one worker per row, binary searches in the
   sorted ids and scores, O(B log B).
3. No float atomics: the result is bitwise reproducible run to run, whatever the thread count or
   scheduling. The CPU kernel sums in exactly the reference's order.

Input checks that need values (non-finite rewards, negative ids, non-finite weights) cost one
device-to-host copy of a few flags per call; ``validate=False`` skips them (inside
``torch.compile(fullgraph=True)``, or in a hot loop whose inputs are known good).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffrl import interop
from diffrl.ops import _dispatch
from diffrl.ops._library import LIB
from diffrl.ops.reference import (
    _weighted_sum,
    global_std,
    group_advantages_reference,
    win_rate_reference,
)

IMPLEMENTED = _dispatch.implementing("group_advantages")
WIN_RATE_IMPLEMENTED = _dispatch.implementing("win_rate")
STD_MODES = {"none": 0, "group": 1, "global": 2}
COMBINES = ("sum", "normalize_each")
MAX_HEADS = 1024  # normalize_each keeps two float64 per head in CUDA shared memory
MODE_SINGLE, MODE_EACH, MODE_DENSE = 0, 1, 2  # csrc/advantages.h: adv::Mode
_KERNEL_DTYPES = (torch.float32, torch.float64)


@interop.accepts_arrays
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    combine: str = "sum",
    num_steps: int | None = None,
    step_weights: torch.Tensor | Sequence[float] | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """GRPO advantages: rewards normalised within the group of samples that share a prompt.

    ``rewards``: [B] (one reward per sample), [B, K] (K reward heads, with ``reward_weights`` [K])
    or [B, T] with ``num_steps=T`` and no weights (dense per-step rewards: each step is normalised
    within its group, DenseGRPO). ``group_ids``: [B] integers >= 0, one per prompt, unsorted, any
    group sizes. Returns float32 [B], or [B, T] when ``num_steps`` is given: the advantage
    broadcast over the T steps and multiplied by ``step_weights`` [T] if given.

    Per group g and statistic column, with ``mean_g`` the group mean::

        std="group":  A = (r - mean_g) / (std_g + eps)     std_g: population std (ddof 0) of the group
        std="global": A = (r - mean_g) / (std_B + eps)     std_B: population std (ddof 0) of the whole batch
        std="none":   A =  r - mean_g

    Flow-GRPO's global-std path divides by torch's *unbiased* std (ddof 1) of the batch; for a
    batch of B samples that std is ``sqrt(B / (B - 1))`` times ours, so its advantages are slightly
    smaller (by ~1/(2B)). Its per-prompt tracker uses numpy's population std, like ``std="group"``.

    ``eps`` is added to the standard deviation (as DDPO's and Flow-GRPO's trackers do), not to the
    variance. A group whose rewards are all equal (a group of one included) gives exactly 0, never
    NaN or inf; so does a zero denominator (only possible with ``eps=0``).

    Several heads: ``combine="sum"`` normalises ``sum_k w_k r_k``; ``combine="normalize_each"``
    normalises each head within its groups and returns ``sum_k w_k A_k`` (independent estimators,
    as MARBLE and PaCo-GRPO argue; at most 1024 heads). ``clip`` then clamps the advantage to
    ``[-clip, clip]`` (for dense rewards, each step's), before the step weights.

    Arithmetic is float64 in every backend, rounded once to float32; the fast backends are
    deterministic (see the module docstring). Not differentiable: advantages are constants in RL.
    """
    plan = _plan(rewards, group_ids, std, eps, clip, reward_weights, combine, num_steps, step_weights)
    if validate:
        _check_values("group_advantages", rewards, group_ids, reward_weights=plan["w"], step_weights=plan["sw"])
    name = _dispatch.resolve("group_advantages", IMPLEMENTED, backend, rewards.device)
    if name == "torch":
        return group_advantages_reference(
            rewards, group_ids, std=std, eps=float(eps), clip=None if clip is None else float(clip),
            reward_weights=plan["w"], combine=combine, num_steps=num_steps, step_weights=plan["sw"])

    vals = rewards if rewards.dtype in _KERNEL_DTYPES else rewards.float()
    vals = vals.contiguous()
    ids = group_ids.to(torch.int64)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    gstd = None
    if std == "global":
        if plan["mode"] == MODE_SINGLE:
            cols = vals[:, None] if vals.dim() == 1 else _weighted_sum(vals.to(torch.float64), plan["w"])[:, None]
        else:
            cols = vals
        gstd = global_std(cols)
    return torch.ops.diffrl.group_advantages(
        vals, order, sorted_ids, plan["w"], gstd, plan["sw"], plan["mode"], STD_MODES[std], float(eps),
        -1.0 if clip is None else float(clip), plan["T"], num_steps is None, name)


@interop.accepts_arrays
def win_rate(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Pref-GRPO's win rate: for each sample, the fraction of the *other* members of its group whose
    score it beats, a tie counting one half; a sample alone in its group gets 0.5.

    ``scores`` [B] (any float dtype), ``group_ids`` [B] integers >= 0. Returns float32 [B] in
    [0, 1]: ``(below + (equal - 1) / 2) / (n - 1)``, exact counts and one rounding, so every
    backend gives bitwise the same result. Feed it to :func:`group_advantages` as the reward.
    """
    if not isinstance(scores, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise TypeError("win_rate: scores and group_ids must be torch.Tensors")
    if scores.dim() != 1:
        raise ValueError(f"win_rate: scores must be [B], got shape {tuple(scores.shape)}")
    _check_ids("win_rate", group_ids, scores)
    if not scores.is_floating_point():
        raise TypeError(f"win_rate: scores must be a floating-point tensor, got {scores.dtype}")
    if validate:
        _check_values("win_rate", scores, group_ids)
    name = _dispatch.resolve("win_rate", WIN_RATE_IMPLEMENTED, backend, scores.device)
    if name == "torch":
        return win_rate_reference(scores, group_ids)
    vals = (scores if scores.dtype in _KERNEL_DTYPES else scores.float()).contiguous()
    ids = group_ids.to(torch.int64)
    perm = torch.argsort(vals, stable=True)
    order = perm[torch.argsort(ids[perm], stable=True)]
    sorted_ids = ids[order]
    return torch.ops.diffrl.win_rate(vals, order, sorted_ids, name)


# ----------------------------------------------------------------------------------------------
# validation: shapes, types and options here (no device work); values in _check_values (one sync)


def _check_ids(op, group_ids, rewards):
    if group_ids.dim() != 1:
        raise ValueError(f"{op}: group_ids must be [B], got shape {tuple(group_ids.shape)}")
    if group_ids.dtype == torch.bool or group_ids.is_floating_point() or group_ids.is_complex():
        raise TypeError(f"{op}: group_ids must be an integer tensor (one id per prompt), got {group_ids.dtype}")
    if group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"{op}: {group_ids.shape[0]} group ids for a batch of {rewards.shape[0]} "
                         f"(the first dimensions must match)")
    if group_ids.device != rewards.device:
        raise ValueError(f"{op}: group_ids are on {group_ids.device} but the rewards are on {rewards.device}")
    if rewards.shape[0] == 0:
        raise ValueError(f"{op}: the batch is empty")


def _as_weights(op, name, value, n, device):
    """A float64 [n] tensor on ``device`` from a tensor or a sequence; shape checked here."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, Sequence) and not isinstance(value, str):
        vals = list(value)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise TypeError(f"{op}: {name} must be a tensor or a sequence of floats")
        if not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{op}: {name} must be finite, got {vals}")
        t = torch.tensor(vals, dtype=torch.float64)
    else:
        raise TypeError(f"{op}: {name} must be a tensor or a sequence of floats, got {type(value).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must have shape [{n}], got {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
    return t.to(device=device, dtype=torch.float64).contiguous()


def _plan(rewards, group_ids, std, eps, clip, reward_weights, combine, num_steps, step_weights):
    op = "group_advantages"
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"{op}: rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"{op}: group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if not rewards.is_floating_point():
        raise TypeError(f"{op}: rewards must be a floating-point tensor, got {rewards.dtype}")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"{op}: rewards must be [B], [B, K] (reward heads) or [B, T] (dense per-step), "
                         f"got shape {tuple(rewards.shape)}")
    _check_ids(op, group_ids, rewards)
    if std not in STD_MODES:
        raise ValueError(f"{op}: std must be one of {tuple(STD_MODES)}, got {std!r}")
    if combine not in COMBINES:
        raise ValueError(f"{op}: combine must be one of {COMBINES}, got {combine!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not math.isfinite(clip) or clip <= 0):
        raise ValueError(f"{op}: clip must be None or a finite float > 0, got {clip!r}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"{op}: num_steps must be None or an int >= 1, got {num_steps!r}")
    B = rewards.shape[0]
    dev = rewards.device
    if rewards.dim() == 1:
        if reward_weights is not None:
            raise ValueError(f"{op}: reward_weights need rewards [B, K] (one column per reward head), "
                             f"got rewards of shape {tuple(rewards.shape)}")
        mode, K, w = MODE_SINGLE, 1, None
    elif reward_weights is not None:
        K = rewards.shape[1]
        if K == 0:
            raise ValueError(f"{op}: rewards [B, K] with K = 0 heads")
        w = _as_weights(op, "reward_weights", reward_weights, K, dev)
        mode = MODE_SINGLE if combine == "sum" else MODE_EACH
        if mode == MODE_EACH and K > MAX_HEADS:
            raise ValueError(f"{op}: combine='normalize_each' takes at most {MAX_HEADS} reward heads, got {K}")
    else:
        if num_steps is None:
            raise ValueError(f"{op}: 2-D rewards need reward_weights (rewards [B, K]: K reward heads) or "
                             f"num_steps (rewards [B, T]: dense per-step rewards), got shape {tuple(rewards.shape)}")
        if rewards.shape[1] != num_steps:
            raise ValueError(f"{op}: dense rewards [B, T] need num_steps == T, got shape {tuple(rewards.shape)} "
                             f"and num_steps={num_steps}")
        mode, K, w = MODE_DENSE, num_steps, None
    if step_weights is not None and num_steps is None:
        raise ValueError(f"{op}: step_weights need num_steps (the output is [B, T])")
    sw = _as_weights(op, "step_weights", step_weights, num_steps, dev) if step_weights is not None else None
    T = num_steps if num_steps is not None else 1
    return {"mode": mode, "K": K, "w": w, "sw": sw, "T": T, "B": B}


def _check_values(op, rewards, group_ids, **weights):
    """Non-finite rewards or weights and negative ids raise; one device-to-host copy in all."""
    names = ["rewards", "group_ids"]
    flags = [~torch.isfinite(rewards).all(), (group_ids < 0).any()]
    for n, t in weights.items():
        if t is not None:
            names.append(n)
            flags.append(~torch.isfinite(t).all())
    bad = torch.stack(flags).tolist()
    if bad[0]:
        i = int((~torch.isfinite(rewards)).nonzero()[0, 0])
        raise ValueError(f"{op}: rewards must be finite; row {i} holds {rewards[i].tolist()}")
    if bad[1]:
        i = int((group_ids < 0).nonzero()[0, 0])
        raise ValueError(f"{op}: group ids must be >= 0; row {i} has id {int(group_ids[i])}")
    for n, b in zip(names[2:], bad[2:]):
        if b:
            raise ValueError(f"{op}: {n} must be finite")


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations)

LIB.define(
    "group_advantages(Tensor vals, Tensor order, Tensor sorted_ids, Tensor? weights, Tensor? gstd, "
    "Tensor? step_weights, int mode, int std_mode, float eps, float clip, int T, bool squeeze, str backend) -> Tensor"
)
LIB.define("win_rate(Tensor scores, Tensor order, Tensor sorted_ids, str backend) -> Tensor")


def _group_advantages_impl(vals, order, sorted_ids, weights, gstd, step_weights, mode, std_mode, eps, clip, T,
                           squeeze, backend):
    return _dispatch.launcher(backend, "group_advantages")(vals, order, sorted_ids, weights, gstd, step_weights, mode,
                                                           std_mode, eps, clip, T, squeeze)


def _win_rate_impl(scores, order, sorted_ids, backend):
    return _dispatch.launcher(backend, "win_rate")(scores, order, sorted_ids)


for _key in ("CPU", "CUDA"):
    LIB.impl("group_advantages", _group_advantages_impl, _key)
    LIB.impl("win_rate", _win_rate_impl, _key)


@torch.library.register_fake("diffrl::group_advantages")
def _group_advantages_fake(vals, order, sorted_ids, weights, gstd, step_weights, mode, std_mode, eps, clip, T,
                           squeeze, backend):
    B = vals.shape[0]
    return vals.new_empty((B,) if squeeze else (B, T), dtype=torch.float32)


@torch.library.register_fake("diffrl::win_rate")
def _win_rate_fake(scores, order, sorted_ids, backend):
    return scores.new_empty(scores.shape[0], dtype=torch.float32)

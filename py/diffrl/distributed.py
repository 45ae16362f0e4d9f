"""Advantages across processes: groups may span ranks.

Research code often normalises rewards per GPU, which is wrong when the G samples of a prompt are
spread over several ranks. Here every rank gathers the rewards and group ids of the whole process
group, computes the statistics of the whole batch (the kernels are deterministic, so every rank
gets bitwise the same result) and keeps its own rows.

Group ids must mean the same prompt on every rank: a global prompt index, or
:func:`prompt_group_ids` (a hash of the prompt text that is the same in every process, unlike
Python's salted ``hash``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

from diffrl.ops.advantages import group_advantages, win_rate


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_rewards(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    group=None,
    sizes: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """All ranks' rewards and group ids, concatenated in rank order; returns
    ``(rewards, group_ids, start, stop)`` where ``[start, stop)`` are this rank's rows.

    Ranks may hold different batch sizes: they are exchanged first (one small all_gather and a
    host synchronisation), unless ``sizes`` (every rank's batch size, in rank order) is given.
    Rewards travel as float32 (float64 stays float64), ids as int64. Without an initialised
    process group (or with one rank) the inputs come back unchanged.
    """
    if not isinstance(rewards, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise TypeError("gather_rewards: rewards and group_ids must be torch.Tensors")
    B = rewards.shape[0] if rewards.dim() > 0 else 0
    if group_ids.dim() != 1 or group_ids.shape[0] != B:
        raise ValueError(f"gather_rewards: group_ids must be [B] with B = {B}, got shape {tuple(group_ids.shape)}")
    world, rank = _world(group)
    if world == 1:
        return rewards, group_ids, 0, B
    if sizes is None:
        n = torch.tensor([B], dtype=torch.int64, device=rewards.device)
        all_n = [torch.empty_like(n) for _ in range(world)]
        dist.all_gather(all_n, n, group=group)
        sizes = [int(t) for t in torch.cat(all_n).tolist()]
    else:
        sizes = [int(s) for s in sizes]
        if len(sizes) != world or sizes[rank] != B:
            raise ValueError(f"gather_rewards: sizes {sizes} do not fit {world} ranks with {B} rows on rank {rank}")
    vals = rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()
    ids = group_ids.to(torch.int64)
    m = max(sizes)

    def gather(t):
        padded = t.new_zeros((m,) + tuple(t.shape[1:]))
        padded[:B] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    start = sum(sizes[:rank])
    return gather(vals), gather(ids), start, start + B


def distributed_group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    group=None,
    sizes: Sequence[int] | None = None,
    **kwargs,
) -> torch.Tensor:
    """:func:`diffrl.ops.group_advantages` over the rewards of every rank of ``group`` (the default
    process group if None), so that a group split across ranks is normalised as one; returns this
    rank's rows. ``std="global"`` then means the std of the whole global batch. ``kwargs`` are
    group_advantages' options."""
    all_r, all_ids, start, stop = gather_rewards(rewards, group_ids, group=group, sizes=sizes)
    return group_advantages(all_r, all_ids, **kwargs)[start:stop]


def distributed_win_rate(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    group=None,
    sizes: Sequence[int] | None = None,
    **kwargs,
) -> torch.Tensor:
    """:func:`diffrl.ops.win_rate` within groups that may span ranks; returns this rank's rows."""
    all_s, all_ids, start, stop = gather_rewards(scores, group_ids, group=group, sizes=sizes)
    return win_rate(all_s, all_ids, **kwargs)[start:stop]


def prompt_group_ids(prompts: Sequence[str], device=None) -> torch.Tensor:
    """int64 group ids from prompt strings, equal for equal prompts in every process and on every
    machine (BLAKE2b, 63 bits: collisions are negligible)."""
    if isinstance(prompts, str):
        raise TypeError("prompt_group_ids: pass a sequence of prompts, not one string")
    ids = [int.from_bytes(hashlib.blake2b(str(p).encode("utf-8"), digest_size=8).digest(), "little") >> 1
           for p in prompts]
    return torch.tensor(ids, dtype=torch.int64, device=device)

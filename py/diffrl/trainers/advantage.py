"""The GRPO family's advantages from an epoch's rewards, as the config asks (GRPOConfig / NFTConfig):

``advantage: group``      the reward normalised within its prompt's group (GRPO, Flow-GRPO);
``advantage: win_rate``   Pref-GRPO: each image's win rate against the rest of its group (the fraction it
                          beats, ties one half; from the scalar reward through ``diffrl.ops.win_rate``, or
                          from a pairwise reward ``P(a preferred to b)``), then normalised within the group;
``advantage: dense``      DenseGRPO: a reward per recorded step, ``R(after) - R(before)``, where ``R(p)`` scores
                          the deterministic (ODE) completion of the trajectory from position ``p`` (the final
                          image's reward at the end); each step's gains are normalised within the group on
                          their own (``diffrl.ops.group_advantages`` with ``num_steps``): advantages ``[B, S]``;
``reward_aggregation: sum``         the weighted sum of the rewards is normalised (one statistic);
``reward_aggregation: per_reward``  each reward is normalised within the group on its own, and the
                          advantage is the weighted sum of those (MARBLE / PaCo-RL / GDPO: a reward of
                          large scale or spread no longer drowns the others).

Every rank computes the statistics of the whole batch (``diffrl.distributed``); a pairwise reward is
called within each group, which never spans ranks.
"""

from __future__ import annotations

import torch

from diffrl.trainers.config import ADVANTAGES, AGGREGATIONS  # noqa: F401  (the accepted values)

__all__ = ["ADVANTAGES", "AGGREGATIONS", "reward_columns", "pairwise_win_rate", "dense_step_rewards",
           "grpo_advantages"]


def reward_columns(heads: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, K] rewards, [K] weights)`` of the named rewards (the ``<name>/reward`` heads of a MultiReward;
    a single reward's ``reward``)."""
    names = list(weights)
    if len(names) == 1 and f"{names[0]}/reward" not in heads:
        cols = [heads["reward"]]
    else:
        missing = [n for n in names if f"{n}/reward" not in heads]
        if missing:
            raise ValueError(f"reward_aggregation: per_reward needs each reward's own head '<name>/reward' (a "
                             f"MultiReward of the config's rewards); missing {missing}, the reward returned "
                             f"{sorted(heads)}")
        cols = [heads[f"{n}/reward"] for n in names]
    w = torch.tensor([float(weights[n]) for n in names], dtype=torch.float64)
    return torch.stack([c.float() for c in cols], 1), w


def pairwise_win_rate(pairwise, images: torch.Tensor, prompts: list[str], group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` float64 win rates from a pairwise reward ``pairwise(images_a, images_b, prompts) -> [N]``, the
    probability that each image of ``images_a`` is preferred to its partner in ``images_b`` (for its
    prompt). Each unordered pair of a group is scored once (``P(b > a) = 1 - P(a > b)``) in one call;
    win rate = the mean of an image's preference over the others of its group (0.5 alone)."""
    ids = group_ids.long().cpu()
    B = len(ids)
    pairs = [(i, j) for i in range(B) for j in range(i + 1, B) if ids[i] == ids[j]]
    wins = torch.zeros(B, dtype=torch.float64)
    n = torch.zeros(B, dtype=torch.float64)
    if pairs:
        a = torch.tensor([i for i, _ in pairs])
        b = torch.tensor([j for _, j in pairs])
        with torch.no_grad():
            p = pairwise(images[a.to(images.device)], images[b.to(images.device)], [prompts[i] for i in a.tolist()])
        p = torch.as_tensor(p).detach().double().cpu().reshape(-1)
        if p.numel() != len(pairs):
            raise ValueError(f"pairwise reward returned {p.numel()} preferences for {len(pairs)} pairs")
        if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise ValueError("pairwise reward must return probabilities in [0, 1] (P(first image preferred)), got "
                             f"values in [{float(p.min()):.3g}, {float(p.max()):.3g}]")
        wins.index_add_(0, a, p).index_add_(0, b, 1 - p)
        n.index_add_(0, a, torch.ones_like(p)).index_add_(0, b, torch.ones_like(p))
    return torch.where(n > 0, wins / n.clamp_min(1), torch.full_like(wins, 0.5))


def dense_step_rewards(sampler, reward_fn, rollout, final_rewards: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` float32: each recorded step's reward gain ``R(i + 1) - R(i)``, with ``R(p)`` the reward of the
    ODE completion from trajectory position ``p`` (``final_rewards`` at ``T``: already measured). One
    completion and one reward call per distinct position (S + 1 for a window of S consecutive steps)."""
    T = int(rollout.info["num_inference_steps"])
    steps = rollout.step_indices.tolist()
    scores: dict[int, torch.Tensor] = {T: final_rewards.float()}
    for p in sorted({p for i in steps for p in (i, i + 1)} - {T}):
        with torch.no_grad():
            out = reward_fn(sampler.complete(rollout, p), rollout.prompts)
        scores[p] = out["reward"].detach().float().reshape(len(rollout), -1).mean(1).to(final_rewards.device)
    return torch.stack([scores[i + 1] - scores[i] for i in steps], 1)


def grpo_advantages(cfg, rewards: torch.Tensor, group_ids: torch.Tensor, heads: dict | None = None,
                    rollout=None, pairwise=None, dense=None) -> torch.Tensor:
    """This rank's float32 advantages: [B], or [B, S] with ``advantage: dense`` (``dense``: the step rewards of
    :func:`dense_step_rewards`). See the module docstring."""
    from diffrl.distributed import distributed_group_advantages, distributed_win_rate  # noqa: PLC0415

    clip = cfg.adv_clip if cfg.adv_clip > 0 else None
    gids = group_ids.long()
    if cfg.advantage == "dense":
        if dense is None:
            raise ValueError("advantage: dense needs the per-step rewards (dense_step_rewards)")
        return distributed_group_advantages(dense.float().contiguous(), gids, std=cfg.adv_std, clip=clip,
                                            num_steps=dense.shape[1]).to(torch.float32)
    if cfg.reward_aggregation == "per_reward":
        cols, weights = reward_columns(heads if heads is not None else {"reward": rewards}, cfg.reward)
        cols = cols.to(rewards.device)
    else:
        cols, weights = rewards.float()[:, None], None
    if cfg.advantage == "win_rate":
        if pairwise is not None:
            if cols.shape[1] > 1:
                raise ValueError("advantage: win_rate with a pairwise reward takes reward_aggregation: sum")
            cols = pairwise_win_rate(pairwise, rollout.images, rollout.prompts, gids)[:, None].to(rewards.device)
        else:  # from the scalar rewards: the fraction of the group each image beats
            cols = torch.stack([distributed_win_rate(cols[:, k].contiguous(), gids) for k in range(cols.shape[1])], 1)
    if weights is None:
        values, kw = cols[:, 0], {}
    else:
        values, kw = cols, {"reward_weights": weights.to(cols.device), "combine": "normalize_each"}
    return distributed_group_advantages(values.contiguous(), gids, std=cfg.adv_std, clip=clip, **kw).to(torch.float32)

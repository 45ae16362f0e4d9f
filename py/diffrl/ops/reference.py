"""Plain-PyTorch references: the spec of every diffrl op.

Readable, float64-capable and differentiable by autograd. Every fast backend computes the same
function (tests/ compare them on random inputs), so change an op here first.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def sde_step_reference(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    *,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    ref_output: torch.Tensor | None = None,
    ref_uncond_output: torch.Tensor | None = None,
    reduce: str = "mean",
    return_mean: bool = True,
):
    """One affine Gaussian step with its log-probability; returns (prev_sample, mean, log_prob, kl).

    ``a, c, s`` are float32 tensors of shape ``[B]``. Arithmetic is float32 (float64 for float64
    inputs). Exactly one of ``noise`` (sampling) and ``prev_sample`` (scoring) is given.

        v    = uncond + w (cond - uncond)                 (when uncond_output is given)
        mean = a x + c v
        x'   = mean + s eps, rounded to the input dtype   (sampling)   |   x' = prev_sample (scoring)
        logp = -sum_j (x'_j - mean_j)^2 / (2 s^2) - D (log s + log sqrt(2 pi)),  divided by D for "mean"
        kl   =  sum_j (c (v_j - v_ref_j))^2 / (2 s^2),                            divided by D for "mean"

    The KL is the closed form between the two Gaussians N(mean, s^2) and N(mean_ref, s^2); writing
    mean - mean_ref as c (v - v_ref) avoids the cancellation of a x. ``mean`` is None when
    ``return_mean`` is False, ``kl`` None without ``ref_output``; in scoring mode the returned
    prev_sample is the given one.
    """
    ct = torch.float64 if sample.dtype == torch.float64 else torch.float32
    B = sample.shape[0]
    D = sample[0].numel()
    bshape = (B,) + (1,) * (sample.dim() - 1)
    a_, c_, s_ = (t.to(ct).reshape(bshape) for t in (a, c, s))

    def guide(cond, uncond):
        v = cond.to(ct)
        if uncond is not None:
            vu = uncond.to(ct)
            v = vu + guidance_scale * (v - vu)
        return v

    v = guide(model_output, uncond_output)
    mean = a_ * sample.to(ct) + c_ * v
    if noise is not None:
        prev = (mean + s_ * noise.to(ct)).to(sample.dtype)
    else:
        prev = prev_sample
    diff = prev.to(ct) - mean
    sq = (diff * diff).reshape(B, D).sum(dim=1)
    s1 = s.to(ct)
    f = 1.0 if reduce == "sum" else 1.0 / D
    norm = (torch.log(s1) + LOG_SQRT_2PI) * (D if reduce == "sum" else 1.0)
    log_prob = (-sq / (2.0 * s1 * s1) * f - norm).to(torch.float32 if ct == torch.float32 else ct)
    kl = None
    if ref_output is not None:
        dk = c_ * (v - guide(ref_output, ref_uncond_output))
        kl = ((dk * dk).reshape(B, D).sum(dim=1) / (2.0 * s1 * s1) * f).to(log_prob.dtype)
    return prev, (mean.to(sample.dtype) if return_mean else None), log_prob, kl


# ----------------------------------------------------------------------------------------------
# group advantages, win rate, GRPO/PPO loss


def global_std(cols: torch.Tensor) -> torch.Tensor:
    """Population standard deviation (ddof = 0) of each column of ``cols`` [B, C] over the batch, float64 [C].

    Shared by the reference and the fast backends' ``std="global"`` pre-pass, so that both use
    the same number."""
    return cols.to(torch.float64).var(dim=0, unbiased=False).sqrt()


def _weighted_sum(cols: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # sum_k cols[:, k] * w_k in the order k = 0, 1, ... starting from 0.0: the kernels' order
    acc = torch.zeros(cols.shape[0], dtype=cols.dtype, device=cols.device)
    for k in range(cols.shape[1]):
        acc = acc + cols[:, k] * weights[k]
    return acc


def group_advantages_reference(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: str = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    reward_weights: torch.Tensor | None = None,
    combine: str = "sum",
    num_steps: int | None = None,
    step_weights: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Group-normalised advantages (GRPO); the spec of ``diffrl.ops.group_advantages`` (inputs already validated).

    All arithmetic is float64; the result is rounded once to ``out_dtype``.

    1. Statistic columns ``x`` [B, C]: rewards [B] give one column; rewards [B, K] with
       ``reward_weights`` w [K] give one column ``sum_k w_k r_k`` (combine="sum") or K columns
       (combine="normalize_each"); rewards [B, T] without weights (``num_steps=T``) give T columns
       (dense per-step rewards, DenseGRPO).
    2. Per group g (rows with equal id) and column: ``mean_g``, and
       ``A = (x - mean_g) / (sigma + eps)`` where sigma is the population std (ddof = 0) of the
       group (std="group"), of the whole batch's column (std="global", Flow-GRPO's option: the
       mean stays per group), or ``A = x - mean_g`` (std="none"). A group whose values in a column
       are all equal (a group of one included) gives exactly 0 there, and so does a zero
       denominator (possible only with eps = 0): never NaN or inf.
    3. combine="normalize_each": ``A = sum_k w_k A_k``.
    4. ``clip``: ``A = clamp(A, -clip, clip)`` (each column for dense rewards).
    5. ``num_steps=T``: [B, T] — a single column broadcast over the steps — times ``step_weights`` [T].
    """
    x = rewards.to(torch.float64)
    B = x.shape[0]
    post = None
    if x.dim() == 1:
        cols = x[:, None]
    elif reward_weights is not None:
        w = reward_weights.to(device=x.device, dtype=torch.float64)
        if combine == "sum":
            cols = _weighted_sum(x, w)[:, None]
        else:
            cols, post = x, w
    else:  # dense per-step rewards
        cols = x
    C = cols.shape[1]

    uniq, inv = torch.unique(group_ids.to(torch.int64), return_inverse=True)
    G = uniq.numel()
    count = torch.bincount(inv, minlength=G).to(torch.float64)[:, None]
    mean = torch.zeros(G, C, dtype=torch.float64, device=x.device).index_add_(0, inv, cols) / count
    idx = inv[:, None].expand(B, C)
    lo = torch.full((G, C), math.inf, dtype=torch.float64, device=x.device).scatter_reduce(0, idx, cols, "amin")
    hi = torch.full((G, C), -math.inf, dtype=torch.float64, device=x.device).scatter_reduce(0, idx, cols, "amax")
    tie = (lo == hi)[inv]
    centred = cols - mean[inv]
    if std == "group":
        var = torch.zeros(G, C, dtype=torch.float64, device=x.device).index_add_(0, inv, centred * centred) / count
        denom = var.sqrt()[inv] + eps
    elif std == "global":
        denom = (global_std(cols) + eps)[None, :].expand(B, C)
    else:
        denom = torch.ones(B, C, dtype=torch.float64, device=x.device)
    adv = torch.where(tie | ~(denom > 0), torch.zeros((), dtype=torch.float64, device=x.device), centred / denom)
    if post is not None:
        adv = _weighted_sum(adv, post)[:, None]
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    if num_steps is None:
        return adv[:, 0].to(out_dtype)
    adv = adv.expand(B, num_steps)
    if step_weights is not None:
        adv = adv * step_weights.to(device=x.device, dtype=torch.float64)[None, :]
    return adv.to(out_dtype).contiguous()


def win_rate_reference(scores: torch.Tensor, group_ids: torch.Tensor, *, out_dtype: torch.dtype = torch.float32):
    """Pref-GRPO's win rate, the spec of ``diffrl.ops.win_rate``: for each sample, the fraction of the
    *other* members of its group that it beats, a tie counting one half; a sample alone in its
    group gets 0.5. Pairwise by definition (computed in blocks of rows to bound the memory)."""
    s = scores.to(torch.float64)
    ids = group_ids.to(torch.int64)
    out = torch.empty(s.shape[0], dtype=torch.float64, device=s.device)
    for i0 in range(0, s.shape[0], 1024):
        si, gi = s[i0:i0 + 1024, None], ids[i0:i0 + 1024, None]
        same = gi == ids[None, :]
        beats = ((si > s[None, :]) & same).sum(1).to(torch.float64)
        ties = ((si == s[None, :]) & same).sum(1).to(torch.float64) - 1.0  # minus itself
        n = same.sum(1).to(torch.float64)
        out[i0:i0 + 1024] = torch.where(n > 1, (beats + 0.5 * ties) / (n - 1).clamp_min(1), 0.5)
    return out.to(out_dtype)


def grpo_loss_reference(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
):
    """The clipped PPO/GRPO surrogate, the spec of ``diffrl.ops.grpo_loss``; returns (loss, stats).

        ratio = exp(log_prob - old_log_prob)
        loss  = mean( max(-A ratio, -A clamp(ratio, 1 - eps_low, 1 + eps_high)) ) + kl_coef * mean(kl)

    averaged over all samples and steps ([B] or [B, T]; advantages [B] broadcast over T).
    ``old_log_prob`` and ``advantages`` are constants. Stats (0-d, no gradient): policy_loss, kl
    (its mean, 0 without kl), clip_fraction (ratio outside [1 - eps_low, 1 + eps_high]), approx_kl
    (0.5 mean (log_prob - old_log_prob)^2, as DDPO and Flow-GRPO log it), ratio_mean/min/max.
    """
    lo, hi = (clip_range, clip_range) if not isinstance(clip_range, (tuple, list)) else clip_range
    adv = advantages.detach()
    if adv.dim() < log_prob.dim():
        adv = adv[:, None]
    diff = log_prob - old_log_prob.detach()
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - lo, 1.0 + hi)
    policy = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    loss = policy + kl_coef * kl_mean
    with torch.no_grad():
        r = ratio.detach()
        stats = {
            "policy_loss": policy.detach(),
            "kl": kl_mean.detach(),
            "clip_fraction": ((r < 1.0 - lo) | (r > 1.0 + hi)).to(log_prob.dtype).mean(),
            "approx_kl": 0.5 * (diff.detach() * diff.detach()).mean(),
            "ratio_mean": r.mean(),
            "ratio_min": r.min(),
            "ratio_max": r.max(),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------
# batched reward attention


def reward_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_lens: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head attention over padded sequences, the spec of ``diffrl.ops.reward_attention``.

    ``q`` [N, H, Lq, D], ``k``/``v`` [M, H, Lk, D]; query sequence n reads key/value sequence
    ``j = kv_index[n]`` (default n, with M == N). Query row i of sequence n (i < q_lens[n]) attends
    the keys t < kv_lens[j], and with ``causal`` only those with t <= i (positions counted from the
    start of each sequence, the way a text tower's causal mask is):

        out[n, h, i] = sum_t softmax_t(scale * q[n, h, i] . k[j, h, t]) v[j, h, t]

    Rows i >= q_lens[n] (padding) and rows with no key to attend are exactly zero. Whatever the
    padding of q, k and v holds (NaN included) never reaches the result. Arithmetic is float32
    (float64 for float64 inputs); the result has the input dtype. Explicit masked softmax: memory
    is O(N H Lq Lk) and k/v are gathered by ``kv_index`` (a copy) — a spec, not a fast path.
    """
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    N, _, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    if scale is None:
        scale = D ** -0.5
    idx = torch.arange(N, device=dev) if kv_index is None else kv_index.to(device=dev, dtype=torch.int64)
    ql = torch.full((N,), Lq, device=dev) if q_lens is None else q_lens.to(device=dev, dtype=torch.int64)
    kl = torch.full((N,), Lk, device=dev) if kv_lens is None else kv_lens.to(device=dev, dtype=torch.int64)[idx]
    q_valid = torch.arange(Lq, device=dev)[None, :] < ql[:, None]  # [N, Lq]
    k_valid = torch.arange(Lk, device=dev)[None, :] < kl[:, None]  # [N, Lk]
    zero = torch.zeros((), dtype=ct, device=dev)
    # zero the padding first: torch.where does not propagate NaN from the branch it does not take
    qq = torch.where(q_valid[:, None, :, None], q.to(ct), zero)
    kk = torch.where(k_valid[:, None, :, None], k[idx].to(ct), zero)
    vv = torch.where(k_valid[:, None, :, None], v[idx].to(ct), zero)

    scores = torch.matmul(qq, kk.transpose(-1, -2)) * scale  # [N, H, Lq, Lk]
    allowed = k_valid[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(Lk, device=dev)[None, :] <= torch.arange(Lq, device=dev)[:, None])
    scores = scores.masked_fill(~allowed, -math.inf)
    # softmax written out so that a row without any allowed key gives 0 instead of NaN
    # (the row maximum is a constant shift: detached, its gradient would cancel anyway)
    row_max = scores.detach().amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, zero)
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e, vv) / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.where(q_valid[:, None, :, None], out, zero)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Diffusion-DPO loss


def dpo_sample_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the non-batch dims: ``[B, ...] -> [B]``."""
    d = pred - target
    return (d * d).reshape(d.shape[0], -1).mean(dim=1)


def diffusion_dpo_loss_reference(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
):
    """The Diffusion-DPO loss (Wallace et al. 2023), the spec of ``diffrl.ops.diffusion_dpo_loss``;
    returns (loss, stats).

    Per pair i (all tensors [B, ...]; e = mean over the non-batch dims of the squared error):

        z_i  = -beta / 2 * ((e(policy_w) - e(ref_w)) - (e(policy_l) - e(ref_l)))
        loss = mean_i( weights_i * -log sigmoid(z_i) )              (weights default to 1)

    ``e(policy_w) - e(ref_w)`` is computed as ``mean((policy_w - ref_w) * (policy_w + ref_w - 2 target_w))``,
    the same number written without the cancellation of two nearly equal errors (beta is ~5000, so
    that cancellation would be amplified into the loss). Only ``policy_w`` and ``policy_l`` are
    differentiated; the reference predictions, targets and weights are constants. Arithmetic is
    float32 (float64 for float64 inputs). Stats (0-d, no gradient): accuracy (fraction of pairs with
    z > 0: the policy prefers w to l more than the reference does), margin (mean z, the implicit
    reward margin), policy_err_w / policy_err_l / ref_err_w / ref_err_l (mean per-sample errors).
    """
    ct = torch.float64 if policy_w.dtype == torch.float64 else torch.float32
    pw, pl = policy_w.to(ct), policy_l.to(ct)
    rw, rl = ref_w.detach().to(ct), ref_l.detach().to(ct)
    tw, tl = target_w.detach().to(ct), target_l.detach().to(ct)
    B = pw.shape[0]

    def gap(p, r, t):  # e(p) - e(r) per sample
        return ((p - r) * (p + r - 2.0 * t)).reshape(B, -1).mean(dim=1)

    z = -0.5 * beta * (gap(pw, rw, tw) - gap(pl, rl, tl))
    per_pair = torch.nn.functional.softplus(-z)  # -log sigmoid(z), without overflow
    if weights is not None:
        per_pair = per_pair * weights.detach().to(ct)
    loss = per_pair.mean()
    with torch.no_grad():
        zd = z.detach()
        stats = {
            "accuracy": (zd > 0).to(ct).mean(),
            "margin": zd.mean(),
            "policy_err_w": dpo_sample_errors(pw.detach(), tw).mean(),
            "policy_err_l": dpo_sample_errors(pl.detach(), tl).mean(),
            "ref_err_w": dpo_sample_errors(rw, tw).mean(),
            "ref_err_l": dpo_sample_errors(rl, tl).mean(),
        }
    return loss, stats

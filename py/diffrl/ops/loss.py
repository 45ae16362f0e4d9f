"""The clipped GRPO/PPO surrogate loss, fused: ``diffrl.ops.grpo_loss``."""

from __future__ import annotations

import math

import numpy as np
import torch

from diffrl import interop
from diffrl.ops import _dispatch
from diffrl.ops._library import LIB
from diffrl.ops.reference import grpo_loss_reference

IMPLEMENTED = _dispatch.implementing("grpo_loss")
STAT_NAMES = ("policy_loss", "kl", "clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")


@interop.accepts_arrays
def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float | tuple[float, float],
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped PPO/GRPO objective in one fused pass; returns ``(loss, stats)``.

    ::

        ratio = exp(log_prob - old_log_prob)
        loss  = mean( max(-A * ratio, -A * clamp(ratio, 1 - eps_low, 1 + eps_high)) ) + kl_coef * mean(kl)

    ``log_prob``, ``old_log_prob`` (and ``kl``): [B] or [B, T] (samples x trained steps, e.g. the
    log-probs and KLs of ``diffrl.sde_step`` stacked over steps); ``advantages``: the same shape, or
    [B] broadcast over the T steps. The mean runs over all samples and steps. ``clip_range`` is eps,
    or ``(eps_low, eps_high)`` for an asymmetric clip (DAPO's "clip higher").

    Differentiable in ``log_prob`` and ``kl``; ``old_log_prob`` and ``advantages`` are constants
    (detached), as PPO treats them. The backward is one fused element-wise pass that recomputes the
    ratio. ``stats`` are 0-d float32 tensors without gradient, computed in the same pass with no
    host synchronisation: ``policy_loss``, ``kl`` (mean, 0 without ``kl``), ``clip_fraction`` (the
    fraction of ratios outside [1 - eps_low, 1 + eps_high], as DDPO and Flow-GRPO log it),
    ``approx_kl`` (0.5 * mean((log_prob - old_log_prob)^2)), ``ratio_mean``, ``ratio_min``,
    ``ratio_max``.

    Element arithmetic is float32 (float16/bfloat16 inputs are upcast), sums are float64 in a
    fixed order (deterministic). float64 inputs run on the ``torch`` reference.
    """
    lo_eps, hi_eps = _validate(log_prob, old_log_prob, advantages, clip_range, kl, kl_coef)
    name = _dispatch.resolve("grpo_loss", IMPLEMENTED, backend, log_prob.device)
    if log_prob.dtype == torch.float64 and name != "torch":
        if backend != "auto":
            raise TypeError(f"grpo_loss: backend {name!r} takes float32, float16 or bfloat16 log-probs, got float64; "
                            "use backend='torch' (or 'auto') for float64")
        name = "torch"
    if name == "torch":
        return grpo_loss_reference(log_prob, old_log_prob, advantages, clip_range=(lo_eps, hi_eps), kl=kl,
                                   kl_coef=float(kl_coef))
    lp = log_prob.float().contiguous()
    old = old_log_prob.detach().float().contiguous()
    adv = advantages.detach().float().contiguous()
    klt = None if kl is None else kl.float().contiguous()
    lo = float(np.float32(1.0 - lo_eps))  # the bounds as torch.clamp sees them on a float32 tensor
    hi = float(np.float32(1.0 + hi_eps))
    loss, stats = _GRPOLossFunction.apply(lp, old, adv, klt, lo, hi, float(kl_coef), name)
    return loss, {k: stats[i] for i, k in enumerate(STAT_NAMES)}


def _validate(log_prob, old_log_prob, advantages, clip_range, kl, kl_coef):
    op = "grpo_loss"
    named = {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages, "kl": kl}
    for n, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {n} must be a floating-point tensor, got {t.dtype}")
    if log_prob.dim() not in (1, 2):
        raise ValueError(f"{op}: log_prob must be [B] or [B, T], got shape {tuple(log_prob.shape)}")
    if log_prob.numel() == 0:
        raise ValueError(f"{op}: log_prob is empty (shape {tuple(log_prob.shape)})")
    if old_log_prob.shape != log_prob.shape:
        raise ValueError(f"{op}: old_log_prob has shape {tuple(old_log_prob.shape)} but log_prob has "
                         f"{tuple(log_prob.shape)}")
    if kl is not None and kl.shape != log_prob.shape:
        raise ValueError(f"{op}: kl has shape {tuple(kl.shape)} but log_prob has {tuple(log_prob.shape)}")
    if advantages.shape != log_prob.shape and not (log_prob.dim() == 2 and advantages.shape == log_prob.shape[:1]):
        raise ValueError(f"{op}: advantages must have the shape of log_prob {tuple(log_prob.shape)}"
                         f"{' or [B]' if log_prob.dim() == 2 else ''}, got {tuple(advantages.shape)}")
    for n, t in named.items():
        if t is not None and t.device != log_prob.device:
            raise ValueError(f"{op}: {n} is on {t.device} but log_prob is on {log_prob.device}")
    if isinstance(clip_range, (tuple, list)):
        if len(clip_range) != 2:
            raise ValueError(f"{op}: clip_range must be eps or (eps_low, eps_high), got {clip_range!r}")
        lo_eps, hi_eps = clip_range
    else:
        lo_eps = hi_eps = clip_range
    for v in (lo_eps, hi_eps):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{op}: clip_range must be finite and > 0, got {clip_range!r}")
    if lo_eps >= 1:
        raise ValueError(f"{op}: the lower clip eps must be < 1 (the ratio's lower bound is 1 - eps), got {lo_eps}")
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not math.isfinite(kl_coef):
        raise ValueError(f"{op}: kl_coef must be a finite float, got {kl_coef!r}")
    if kl_coef != 0 and kl is None:
        raise ValueError(f"{op}: kl_coef = {kl_coef} needs kl (the per-sample KL to the reference policy)")
    return float(lo_eps), float(hi_eps)


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations) and autograd

LIB.define(
    "grpo_loss_fwd(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor? kl, float lo, float hi, "
    "float kl_coef, str backend) -> (Tensor, Tensor)"
)
LIB.define(
    "grpo_loss_bwd(Tensor g_loss, Tensor log_prob, Tensor old_log_prob, Tensor advantages, float lo, float hi, "
    "str backend) -> Tensor"
)


def _grpo_loss_fwd(lp, old, adv, kl, lo, hi, kl_coef, backend):
    return _dispatch.launcher(backend, "grpo_loss_forward")(lp, old, adv, kl, lo, hi, kl_coef)


def _grpo_loss_bwd(g_loss, lp, old, adv, lo, hi, backend):
    return _dispatch.launcher(backend, "grpo_loss_backward")(g_loss, lp, old, adv, lo, hi)


for _key in ("CPU", "CUDA"):
    LIB.impl("grpo_loss_fwd", _grpo_loss_fwd, _key)
    LIB.impl("grpo_loss_bwd", _grpo_loss_bwd, _key)


@torch.library.register_fake("diffrl::grpo_loss_fwd")
def _grpo_loss_fwd_fake(lp, old, adv, kl, lo, hi, kl_coef, backend):
    return lp.new_empty((), dtype=torch.float32), lp.new_empty(len(STAT_NAMES), dtype=torch.float32)


@torch.library.register_fake("diffrl::grpo_loss_bwd")
def _grpo_loss_bwd_fake(g_loss, lp, old, adv, lo, hi, backend):
    return torch.empty_like(lp)


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, adv, kl, lo, hi, kl_coef, backend):
        loss, stats = torch.ops.diffrl.grpo_loss_fwd(lp, old, adv, kl, lo, hi, kl_coef, backend)
        ctx.save_for_backward(lp, old, adv)
        ctx.lo, ctx.hi, ctx.kl_coef, ctx.backend = lo, hi, kl_coef, backend
        ctx.kl_shape = None if kl is None else kl.shape
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, g_stats):
        lp, old, adv = ctx.saved_tensors
        g_lp = g_kl = None
        g = g_loss.contiguous().float()
        if ctx.needs_input_grad[0]:
            g_lp = torch.ops.diffrl.grpo_loss_bwd(g, lp, old, adv, ctx.lo, ctx.hi, ctx.backend)
        if ctx.needs_input_grad[3]:
            g_kl = (g * ctx.kl_coef / lp.numel()).expand(ctx.kl_shape)
        return g_lp, None, None, g_kl, None, None, None, None

"""The Diffusion-DPO loss, fused: ``diffrl.ops.diffusion_dpo_loss``."""

from __future__ import annotations

import math

import torch

from diffrl import interop
from diffrl.ops import _dispatch
from diffrl.ops._library import LIB
from diffrl.ops.reference import diffusion_dpo_loss_reference

IMPLEMENTED = _dispatch.implementing("diffusion_dpo_loss")
STAT_NAMES = ("accuracy", "margin", "policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INPUTS = ("policy_w", "policy_l", "ref_w", "ref_l", "target_w", "target_l")


@interop.accepts_arrays
def diffusion_dpo_loss(
    policy_w: torch.Tensor,
    policy_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    target_w: torch.Tensor,
    target_l: torch.Tensor,
    *,
    beta: float,
    weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Diffusion-DPO loss (Wallace et al. 2023) in one fused pass; returns ``(loss, stats)``.

    ``policy_w`` / ``policy_l``: the trained model's predictions on the noised preferred (w) and
    rejected (l) latents; ``ref_w`` / ``ref_l``: the frozen reference model's on the same inputs;
    ``target_w`` / ``target_l``: what a perfect prediction would be (the noise for epsilon
    prediction, ``alpha eps - sigma x0`` for v prediction, ``eps - x0`` for flow matching: the caller
    computes it). All six: the same shape ``[B, ...]`` and dtype, one row per pair. With
    ``e(p, t)`` the mean over the non-batch dims of ``(p - t)^2``::

        z_i  = -beta / 2 * ((e(policy_w) - e(ref_w)) - (e(policy_l) - e(ref_l)))
        loss = mean_i( weights_i * -log sigmoid(z_i) )

    ``beta`` is the official implementation's ``beta_dpo`` (the paper's ``beta T omega(lambda_t)``
    folded into one constant, with per-element *mean* errors); the released SD1.5 and SDXL
    launchers use 5000 (docs/dpo.md). ``weights`` [B] (optional) multiply each pair's term.

    Differentiable in ``policy_w`` and ``policy_l`` only: the reference predictions, targets and
    weights are constants (detached). The backward is one element-wise pass from a per-sample factor
    saved by the forward. ``stats`` (0-d float32, no gradient, same pass): ``accuracy`` (fraction of
    pairs with z > 0, the implicit accuracy), ``margin`` (mean z, the implicit reward margin),
    ``policy_err_w``, ``policy_err_l``, ``ref_err_w``, ``ref_err_l`` (mean per-sample errors).

    Element arithmetic is float32 (float16/bfloat16 inputs are upcast), per-sample sums float64 in
    a fixed order; float64 inputs run on the ``torch`` reference.
    """
    tensors = (policy_w, policy_l, ref_w, ref_l, target_w, target_l)
    _validate(tensors, beta, weights)
    name = _dispatch.resolve("diffusion_dpo_loss", IMPLEMENTED, backend, policy_w.device)
    if name != "torch" and policy_w.dtype not in _KERNEL_DTYPES:
        if backend != "auto":
            raise TypeError(f"diffusion_dpo_loss: backend {name!r} takes float32, float16 or bfloat16 tensors, got "
                            f"{policy_w.dtype}; use backend='torch' (or 'auto') for float64")
        name = "torch"
    if name == "torch":
        return diffusion_dpo_loss_reference(*tensors, beta=float(beta), weights=weights)
    pw, pl = policy_w.contiguous(), policy_l.contiguous()
    rw, rl, tw, tl = (t.detach().contiguous() for t in (ref_w, ref_l, target_w, target_l))
    wt = None if weights is None else weights.detach().float().contiguous()
    loss, stats = _DPOLossFunction.apply(pw, pl, rw, rl, tw, tl, wt, float(beta), name)
    return loss, {k: stats[i] for i, k in enumerate(STAT_NAMES)}


def _validate(tensors, beta, weights):
    op = "diffusion_dpo_loss"
    for n, t in zip(_INPUTS, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {n} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {n} must be a floating-point tensor, got {t.dtype}")
    first = tensors[0]
    if first.dim() < 1 or first.shape[0] == 0 or first.numel() == 0:
        raise ValueError(f"{op}: policy_w must be [B, ...] with B >= 1 and at least one element per sample, "
                         f"got shape {tuple(first.shape)}")
    for n, t in zip(_INPUTS[1:], tensors[1:]):
        if t.dim() < 1 or t.shape[0] != first.shape[0]:
            raise ValueError(f"{op}: {n} has {t.shape[0] if t.dim() else 'no'} rows (shape {tuple(t.shape)}) but "
                             f"policy_w has B = {first.shape[0]}: every input is [B, ...] with one row per pair")
        if t.shape != first.shape:
            raise ValueError(f"{op}: {n} has shape {tuple(t.shape)} but policy_w has {tuple(first.shape)}; "
                             "all six inputs must have the same shape")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {n} is {t.dtype} but policy_w is {first.dtype}; cast the inputs to one dtype")
        if t.device != first.device:
            raise ValueError(f"{op}: {n} is on {t.device} but policy_w is on {first.device}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"{op}: beta must be a finite number > 0, got {beta!r}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
            raise TypeError(f"{op}: weights must be a floating-point torch.Tensor [B], got "
                            f"{type(weights).__name__ if not isinstance(weights, torch.Tensor) else weights.dtype}")
        if weights.shape != first.shape[:1]:
            raise ValueError(f"{op}: weights must have shape [B] = ({first.shape[0]},), got {tuple(weights.shape)}")
        if weights.device != first.device:
            raise ValueError(f"{op}: weights are on {weights.device} but policy_w is on {first.device}")


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations) and autograd

LIB.define(
    "dpo_loss_fwd(Tensor policy_w, Tensor policy_l, Tensor ref_w, Tensor ref_l, Tensor target_w, Tensor target_l, "
    "Tensor? weights, float beta, str backend) -> (Tensor, Tensor, Tensor)"
)
LIB.define(
    "dpo_loss_bwd(Tensor g_loss, Tensor coef, Tensor policy_w, Tensor policy_l, Tensor target_w, Tensor target_l, "
    "bool want_w, bool want_l, str backend) -> (Tensor, Tensor)"
)


def _dpo_loss_fwd(pw, pl, rw, rl, tw, tl, weights, beta, backend):
    return _dispatch.launcher(backend, "dpo_loss_forward")(pw, pl, rw, rl, tw, tl, weights, beta)


def _dpo_loss_bwd(g_loss, coef, pw, pl, tw, tl, want_w, want_l, backend):
    gw, gl = _dispatch.launcher(backend, "dpo_loss_backward")(g_loss, coef, pw, pl, tw, tl, want_w, want_l)
    return (pw.new_empty(0) if gw is None else gw), (pl.new_empty(0) if gl is None else gl)


for _key in ("CPU", "CUDA"):
    LIB.impl("dpo_loss_fwd", _dpo_loss_fwd, _key)
    LIB.impl("dpo_loss_bwd", _dpo_loss_bwd, _key)


@torch.library.register_fake("diffrl::dpo_loss_fwd")
def _dpo_loss_fwd_fake(pw, pl, rw, rl, tw, tl, weights, beta, backend):
    return (pw.new_empty((), dtype=torch.float32), pw.new_empty(len(STAT_NAMES), dtype=torch.float32),
            pw.new_empty(pw.shape[0], dtype=torch.float32))


@torch.library.register_fake("diffrl::dpo_loss_bwd")
def _dpo_loss_bwd_fake(g_loss, coef, pw, pl, tw, tl, want_w, want_l, backend):
    return (torch.empty_like(pw) if want_w else pw.new_empty(0)), (torch.empty_like(pl) if want_l else pl.new_empty(0))


class _DPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pw, pl, rw, rl, tw, tl, weights, beta, backend):
        loss, stats, coef = torch.ops.diffrl.dpo_loss_fwd(pw, pl, rw, rl, tw, tl, weights, beta, backend)
        ctx.save_for_backward(coef, pw, pl, tw, tl)
        ctx.backend = backend
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, g_stats):
        coef, pw, pl, tw, tl = ctx.saved_tensors
        want_w, want_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (want_w or want_l):
            return (None,) * 9
        g = g_loss.contiguous().float().reshape(1)
        gw, gl = torch.ops.diffrl.dpo_loss_bwd(g, coef, pw, pl, tw, tl, want_w, want_l, ctx.backend)
        return (gw if want_w else None), (gl if want_l else None), None, None, None, None, None, None, None

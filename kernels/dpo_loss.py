"""diffusion_dpo_loss in Triton: per-(sample, chunk) partial sums, a one-program finalize, and the
element-wise backward. Same signatures as the other backends' launchers (diffrl/ops/_native_backend.py),
the same maths as csrc/dpo_loss.h.

The per-sample reduction runs over long rows (D = C H W up to ~1M) with few rows (B pairs), so each row
is split over programs: one program per (sample, chunk of BLOCK elements) writes five float64 partial
sums (tl.sum, a fixed tree for a given BLOCK), and the finalize program adds each sample's chunks in
order. Deterministic, no atomics, and a sample's result does not depend on the rest of the batch.
Element arithmetic is float32 (inputs upcast on load) with fp fusion off, as in the C++ and CUDA kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffrl.ops import _alloc

BLOCK = 4096  # elements per program: the chunk of a partial sum (kDpoChunk in csrc/dpo_loss.h)
PARTS = 5  # gap, err(p_w), err(p_l), err(r_w), err(r_l)
NUM_STATS = 6


@triton.jit
def _dpo_partial_kernel(pw_ptr, pl_ptr, rw_ptr, rl_ptr, tw_ptr, tl_ptr, part_ptr, D, nch, BLOCK: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)
    b = task // nch
    ch = task % nch
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    j = b * D + offs
    pw = tl.load(pw_ptr + j, mask=m, other=0.0).to(tl.float32)
    pl = tl.load(pl_ptr + j, mask=m, other=0.0).to(tl.float32)
    rw = tl.load(rw_ptr + j, mask=m, other=0.0).to(tl.float32)
    rl = tl.load(rl_ptr + j, mask=m, other=0.0).to(tl.float32)
    tw = tl.load(tw_ptr + j, mask=m, other=0.0).to(tl.float32)
    tt = tl.load(tl_ptr + j, mask=m, other=0.0).to(tl.float32)
    # (masked lanes are all zeros: every term below is 0 there)
    gap = (pw - rw) * (pw + rw - 2.0 * tw) - (pl - rl) * (pl + rl - 2.0 * tt)
    a = pw - tw
    c = pl - tt
    d = rw - tw
    e = rl - tt
    base = part_ptr + task * 5
    tl.store(base + 0, tl.sum(gap.to(tl.float64), axis=0))
    tl.store(base + 1, tl.sum((a * a).to(tl.float64), axis=0))
    tl.store(base + 2, tl.sum((c * c).to(tl.float64), axis=0))
    tl.store(base + 3, tl.sum((d * d).to(tl.float64), axis=0))
    tl.store(base + 4, tl.sum((e * e).to(tl.float64), axis=0))


@triton.jit
def _dpo_finalize_kernel(part_ptr, w_ptr, prm_ptr, loss_ptr, stats_ptr, coef_ptr, B, nch,
                         HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.arange(0, BLOCK_C)
    beta = tl.load(prm_ptr)  # float64
    n = tl.load(prm_ptr + 1)  # float64(D)
    nb = tl.load(prm_ptr + 2)  # float64(B)
    zero = tl.sum(tl.zeros([BLOCK_C], dtype=tl.float64), axis=0)
    acc_loss = zero
    acc_hit = zero
    acc_z = zero
    acc_e1 = zero
    acc_e2 = zero
    acc_e3 = zero
    acc_e4 = zero
    for b in range(0, B):
        s0 = tl.zeros([BLOCK_C], dtype=tl.float64)
        s1 = tl.zeros([BLOCK_C], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_C], dtype=tl.float64)
        s3 = tl.zeros([BLOCK_C], dtype=tl.float64)
        s4 = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, nch, BLOCK_C):
            c = start + i
            m = c < nch
            q = part_ptr + (b * nch + c) * 5
            s0 += tl.load(q + 0, mask=m, other=0.0)
            s1 += tl.load(q + 1, mask=m, other=0.0)
            s2 += tl.load(q + 2, mask=m, other=0.0)
            s3 += tl.load(q + 3, mask=m, other=0.0)
            s4 += tl.load(q + 4, mask=m, other=0.0)
        z = -0.5 * beta * (tl.sum(s0, axis=0) / n)
        zf = z.to(tl.float32)
        # -log sigmoid(z) = max(-z, 0) + log(1 + exp(-|z|)); sigmoid(-z) = 1 / (1 + exp(z)): no overflow
        nls = tl.maximum(-zf, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(zf)))
        sig = 1.0 / (1.0 + tl.exp(zf))
        if HAS_W:
            w = tl.load(w_ptr + b).to(tl.float64)
        else:
            w = 1.0
        acc_loss += w * nls.to(tl.float64)
        acc_hit += tl.where(z > 0.0, 1.0, 0.0).to(tl.float64)
        acc_z += z
        acc_e1 += tl.sum(s1, axis=0) / n
        acc_e2 += tl.sum(s2, axis=0) / n
        acc_e3 += tl.sum(s3, axis=0) / n
        acc_e4 += tl.sum(s4, axis=0) / n
        tl.store(coef_ptr + b, (w * sig.to(tl.float64) * beta / (nb * n)).to(tl.float32))
    tl.store(loss_ptr, (acc_loss / nb).to(tl.float32))
    tl.store(stats_ptr + 0, (acc_hit / nb).to(tl.float32))
    tl.store(stats_ptr + 1, (acc_z / nb).to(tl.float32))
    tl.store(stats_ptr + 2, (acc_e1 / nb).to(tl.float32))
    tl.store(stats_ptr + 3, (acc_e2 / nb).to(tl.float32))
    tl.store(stats_ptr + 4, (acc_e3 / nb).to(tl.float32))
    tl.store(stats_ptr + 5, (acc_e4 / nb).to(tl.float32))


@triton.jit
def _dpo_backward_kernel(pw_ptr, pl_ptr, tw_ptr, tl_ptr, coef_ptr, g_ptr, gw_ptr, gl_ptr, D, nch,
                         W_GW: tl.constexpr, W_GL: tl.constexpr, BLOCK: tl.constexpr):
    task = tl.program_id(0).to(tl.int64)
    b = task // nch
    ch = task % nch
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    j = b * D + offs
    c = tl.load(g_ptr) * tl.load(coef_ptr + b)
    if W_GW:
        pw = tl.load(pw_ptr + j, mask=m, other=0.0).to(tl.float32)
        tw = tl.load(tw_ptr + j, mask=m, other=0.0).to(tl.float32)
        tl.store(gw_ptr + j, (c * (pw - tw)).to(gw_ptr.dtype.element_ty), mask=m)
    if W_GL:
        pl = tl.load(pl_ptr + j, mask=m, other=0.0).to(tl.float32)
        tt = tl.load(tl_ptr + j, mask=m, other=0.0).to(tl.float32)
        tl.store(gl_ptr + j, (-c * (pl - tt)).to(gl_ptr.dtype.element_ty), mask=m)


def dpo_loss_forward(policy_w, policy_l, ref_w, ref_l, target_w, target_l, weights, beta):
    """(loss [0-d], stats [6], coef [B]) float32 from six contiguous [B, ...] tensors of one dtype."""
    B = policy_w.shape[0]
    D = policy_w.numel() // B
    nch = triton.cdiv(D, BLOCK)
    dev = policy_w.device
    part = _alloc.empty(PARTS * B * nch, dtype=torch.float64, device=dev)
    loss = _alloc.empty((), dtype=torch.float32, device=dev)
    stats = _alloc.empty(NUM_STATS, dtype=torch.float32, device=dev)
    coef = _alloc.empty(B, dtype=torch.float32, device=dev)
    _dpo_partial_kernel[(B * nch,)](policy_w, policy_l, ref_w, ref_l, target_w, target_l, part, D, nch, BLOCK=BLOCK,
                                    num_warps=8, enable_fp_fusion=False)
    # float64 scalars through memory: Triton would pass Python floats as float32
    prm = torch.tensor([float(beta), float(D), float(B)], dtype=torch.float64).to(dev)
    _dpo_finalize_kernel[(1,)](part, weights if weights is not None else coef, prm, loss, stats, coef, B, nch,
                               HAS_W=weights is not None, BLOCK_C=min(1024, max(16, triton.next_power_of_2(nch))),
                               num_warps=4, enable_fp_fusion=False)
    return loss, stats, coef


def dpo_loss_backward(g_loss, coef, policy_w, policy_l, target_w, target_l, want_w, want_l):
    """(d loss / d policy_w, d loss / d policy_l) in the inputs' dtype; None where not wanted."""
    B = policy_w.shape[0]
    D = policy_w.numel() // B
    nb = 1024
    nch = triton.cdiv(D, nb)
    gw = _alloc.empty_like(policy_w) if want_w else None
    gl = _alloc.empty_like(policy_l) if want_l else None
    _dpo_backward_kernel[(B * nch,)](policy_w, policy_l, target_w, target_l, coef, g_loss,
                                     gw if gw is not None else policy_w, gl if gl is not None else policy_l, D, nch,
                                     W_GW=bool(want_w), W_GL=bool(want_l), BLOCK=nb, num_warps=4,
                                     enable_fp_fusion=False)
    return gw, gl

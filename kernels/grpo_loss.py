"""grpo_loss in Triton: per-chunk partial sums, a one-program finalize, and the element-wise backward.
Same signatures as the other backends' launchers (diffrl/ops/_native_backend.py).

Element arithmetic is float32 (with fp fusion off, as in the C++ and CUDA kernels); the partial
sums are float64, reduced by tl.sum in a fixed tree and over chunks in order: deterministic.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from diffrl.ops import _alloc

BLOCK = 4096  # elements per program: the chunk of a partial sum
PARTS = 7  # term, clipped, diff^2, ratio, kl, ratio min, ratio max
NUM_STATS = 7


@triton.jit
def _loss_partial_kernel(lp_ptr, old_ptr, adv_ptr, kl_ptr, part_ptr, N, adv_div, lo, hi,
                         HAS_KL: tl.constexpr, BLOCK: tl.constexpr):
    ch = tl.program_id(0).to(tl.int64)
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    lp = tl.load(lp_ptr + offs, mask=m, other=0.0)
    old = tl.load(old_ptr + offs, mask=m, other=0.0)
    a = tl.load(adv_ptr + offs // adv_div, mask=m, other=0.0)
    d = lp - old
    r = tl.exp(d)
    rc = tl.minimum(tl.maximum(r, lo), hi)
    term = tl.maximum(-a * r, -a * rc)
    clipped = (r < lo) | (r > hi)
    base = part_ptr + ch * 7
    tl.store(base + 0, tl.sum(tl.where(m, term, 0.0).to(tl.float64), axis=0))
    tl.store(base + 1, tl.sum(tl.where(m & clipped, 1.0, 0.0).to(tl.float64), axis=0))
    dd = tl.where(m, d, 0.0).to(tl.float64)
    tl.store(base + 2, tl.sum(dd * dd, axis=0))
    tl.store(base + 3, tl.sum(tl.where(m, r, 0.0).to(tl.float64), axis=0))
    if HAS_KL:
        kl = tl.load(kl_ptr + offs, mask=m, other=0.0)
        tl.store(base + 4, tl.sum(kl.to(tl.float64), axis=0))
    else:
        tl.store(base + 4, tl.sum(tl.zeros([BLOCK], dtype=tl.float64), axis=0))
    tl.store(base + 5, tl.min(tl.where(m, r, float("inf")), axis=0).to(tl.float64))
    tl.store(base + 6, tl.max(tl.where(m, r, float("-inf")), axis=0).to(tl.float64))


@triton.jit
def _loss_finalize_kernel(part_ptr, prm_ptr, loss_ptr, stats_ptr, nch, BLOCK_P: tl.constexpr):
    i = tl.arange(0, BLOCK_P)
    st = tl.zeros([BLOCK_P], dtype=tl.float64)
    sc = tl.zeros([BLOCK_P], dtype=tl.float64)
    sd = tl.zeros([BLOCK_P], dtype=tl.float64)
    sr = tl.zeros([BLOCK_P], dtype=tl.float64)
    sk = tl.zeros([BLOCK_P], dtype=tl.float64)
    mn = tl.full([BLOCK_P], float("inf"), tl.float64)
    mx = tl.full([BLOCK_P], float("-inf"), tl.float64)
    for start in range(0, nch, BLOCK_P):
        c = start + i
        m = c < nch
        q = part_ptr + c * 7
        st += tl.load(q + 0, mask=m, other=0.0)
        sc += tl.load(q + 1, mask=m, other=0.0)
        sd += tl.load(q + 2, mask=m, other=0.0)
        sr += tl.load(q + 3, mask=m, other=0.0)
        sk += tl.load(q + 4, mask=m, other=0.0)
        mn = tl.minimum(mn, tl.load(q + 5, mask=m, other=float("inf")))
        mx = tl.maximum(mx, tl.load(q + 6, mask=m, other=float("-inf")))
    n = tl.load(prm_ptr)
    kl_coef = tl.load(prm_ptr + 1)
    policy = tl.sum(st, axis=0) / n
    klm = tl.sum(sk, axis=0) / n
    tl.store(loss_ptr, (policy + kl_coef * klm).to(tl.float32))
    tl.store(stats_ptr + 0, policy.to(tl.float32))
    tl.store(stats_ptr + 1, klm.to(tl.float32))
    tl.store(stats_ptr + 2, (tl.sum(sc, axis=0) / n).to(tl.float32))
    tl.store(stats_ptr + 3, (0.5 * tl.sum(sd, axis=0) / n).to(tl.float32))
    tl.store(stats_ptr + 4, (tl.sum(sr, axis=0) / n).to(tl.float32))
    tl.store(stats_ptr + 5, tl.min(mn, axis=0).to(tl.float32))
    tl.store(stats_ptr + 6, tl.max(mx, axis=0).to(tl.float32))


@triton.jit
def _loss_backward_kernel(lp_ptr, old_ptr, adv_ptr, g_ptr, out_ptr, N, n_f32, adv_div, lo, hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    lp = tl.load(lp_ptr + offs, mask=m, other=0.0)
    old = tl.load(old_ptr + offs, mask=m, other=0.0)
    a = tl.load(adv_ptr + offs // adv_div, mask=m, other=0.0)
    gs = tl.load(g_ptr) / n_f32  # float32(N), as the other backends
    r = tl.exp(lp - old)
    flat = ((a > 0.0) & (r > hi)) | ((a < 0.0) & (r < lo))
    g = tl.where(flat, 0.0, (-a * r) * gs)
    tl.store(out_ptr + offs, g, mask=m)


def grpo_loss_forward(log_prob, old_log_prob, advantages, kl, lo, hi, kl_coef):
    """(loss [0-d], stats [7]) float32, from float32 contiguous inputs."""
    N = log_prob.numel()
    adv_div = N // advantages.numel()
    nch = triton.cdiv(N, BLOCK)
    dev = log_prob.device
    part = _alloc.empty(PARTS * nch, dtype=torch.float64, device=dev)
    loss = _alloc.empty((), dtype=torch.float32, device=dev)
    stats = _alloc.empty(NUM_STATS, dtype=torch.float32, device=dev)
    _loss_partial_kernel[(nch,)](log_prob, old_log_prob, advantages, kl if kl is not None else log_prob, part, N,
                                 adv_div, lo, hi, HAS_KL=kl is not None, BLOCK=BLOCK, num_warps=8,
                                 enable_fp_fusion=False)
    prm = torch.empty(2, dtype=torch.float64, device=dev)
    prm[0] = float(N)
    prm[1] = float(np.float32(kl_coef))  # the float32 coefficient, as the other backends
    _loss_finalize_kernel[(1,)](part, prm, loss, stats, nch, BLOCK_P=min(1024, max(16, triton.next_power_of_2(nch))),
                                num_warps=4, enable_fp_fusion=False)
    return loss, stats


def grpo_loss_backward(g_loss, log_prob, old_log_prob, advantages, lo, hi):
    """d loss / d log_prob, float32 like log_prob."""
    N = log_prob.numel()
    out = _alloc.empty_like(log_prob)
    _loss_backward_kernel[(triton.cdiv(N, 1024),)](log_prob, old_log_prob, advantages, g_loss, out, N, float(N),
                                                   N // advantages.numel(), lo, hi, BLOCK=1024, num_warps=4,
                                                   enable_fp_fusion=False)
    return out

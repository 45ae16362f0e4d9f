"""sde_step in Triton: the forward with per-chunk partial sums, a per-sample finalize, and the
element-wise backward. Same signatures as the other backends' launchers (diffrl/ops/_native_backend.py).

One program per (sample, chunk of BLOCK elements); partial sums are reduced by tl.sum (a fixed
tree for a given BLOCK) and summed over chunks in order by the finalize kernel, so results do not
depend on the batch. Kernels run with fp fusion off, so that a product feeding a sum is rounded the
same way in sampling and scoring mode (bitwise-identical log-probs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diffrl.ops import _alloc

BLOCK = 4096  # elements per program; also the reduction chunk
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@triton.jit
def _sde_step_fwd_kernel(
    x_ptr, v_ptr, vu_ptr, w, eps_ptr, xin_ptr, vr_ptr, vru_ptr,
    a_ptr, c_ptr, s_ptr, xout_ptr, mout_ptr, part_ptr,
    D, nch, tasks,
    GUID: tl.constexpr, SAMPLE: tl.constexpr, KL: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    b = task // nch
    ch = task % nch
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    j = b * D + offs
    a = tl.load(a_ptr + b)
    c = tl.load(c_ptr + b)
    s = tl.load(s_ptr + b)
    v = tl.load(v_ptr + j, mask=mask, other=0.0).to(tl.float32)
    if GUID:
        vu = tl.load(vu_ptr + j, mask=mask, other=0.0).to(tl.float32)
        v = vu + w * (v - vu)
    x = tl.load(x_ptr + j, mask=mask, other=0.0).to(tl.float32)
    mu = a * x + c * v
    if SAMPLE:
        eps = tl.load(eps_ptr + j, mask=mask, other=0.0).to(tl.float32)
        stored = (mu + s * eps).to(xout_ptr.dtype.element_ty)
        tl.store(xout_ptr + j, stored, mask=mask)
        xp = stored.to(tl.float32)
    else:
        xp = tl.load(xin_ptr + j, mask=mask, other=0.0).to(tl.float32)
    if MEAN:
        tl.store(mout_ptr + j, mu.to(mout_ptr.dtype.element_ty), mask=mask)
    d = tl.where(mask, xp - mu, 0.0)
    tl.store(part_ptr + task, tl.sum(d * d, axis=0))
    if KL:
        vr = tl.load(vr_ptr + j, mask=mask, other=0.0).to(tl.float32)
        if GUID:
            vru = tl.load(vru_ptr + j, mask=mask, other=0.0).to(tl.float32)
            vr = vru + w * (vr - vru)
        dk = tl.where(mask, c * (v - vr), 0.0)
        tl.store(part_ptr + tasks + task, tl.sum(dk * dk, axis=0))


@triton.jit
def _sde_step_finalize_kernel(
    part_ptr, s_ptr, logp_ptr, kl_ptr, nch, tasks, f, nscale,
    KL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    m = offs < nch
    s = tl.load(s_ptr + b)
    inv2s2 = 1.0 / (2.0 * s * s)
    sq = tl.sum(tl.load(part_ptr + b * nch + offs, mask=m, other=0.0), axis=0)
    tl.store(logp_ptr + b, -sq * inv2s2 * f - (tl.log(s) + 0.9189385332046727) * nscale)
    if KL:
        dk = tl.sum(tl.load(part_ptr + tasks + b * nch + offs, mask=m, other=0.0), axis=0)
        tl.store(kl_ptr + b, dk * inv2s2 * f)


@triton.jit
def _sde_step_bwd_kernel(
    x_ptr, v_ptr, vu_ptr, w, xp_ptr, vr_ptr, vru_ptr, a_ptr, c_ptr, s_ptr,
    glp_ptr, gkl_ptr, gprev_ptr, gmean_ptr,
    gx_ptr, gv_ptr, gvu_ptr, gxp_ptr, gvr_ptr, gvru_ptr,
    D, nch, f,
    GUID: tl.constexpr, SAMPLE: tl.constexpr, KL: tl.constexpr,
    HAS_GLP: tl.constexpr, HAS_GKL: tl.constexpr, HAS_GPREV: tl.constexpr, HAS_GMEAN: tl.constexpr,
    W_GX: tl.constexpr, W_GV: tl.constexpr, W_GVU: tl.constexpr, W_GXP: tl.constexpr,
    W_GVR: tl.constexpr, W_GVRU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    task = tl.program_id(0).to(tl.int64)
    b = task // nch
    ch = task % nch
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    j = b * D + offs
    a = tl.load(a_ptr + b)
    c = tl.load(c_ptr + b)
    s = tl.load(s_ptr + b)
    inv_s2 = 1.0 / (s * s)
    wc = w if GUID else 1.0
    wu = 1.0 - w
    v = tl.load(v_ptr + j, mask=mask, other=0.0).to(tl.float32)
    if GUID:
        vu = tl.load(vu_ptr + j, mask=mask, other=0.0).to(tl.float32)
        v = vu + w * (v - vu)
    g_mu = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GMEAN:
        g_mu += tl.load(gmean_ptr + j, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE and HAS_GPREV:
        g_mu += tl.load(gprev_ptr + j, mask=mask, other=0.0).to(tl.float32)
    gl = 0.0
    r = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GLP and not SAMPLE:  # the log-prob term vanishes in sampling mode
        gl = tl.load(glp_ptr + b) * f
        x = tl.load(x_ptr + j, mask=mask, other=0.0).to(tl.float32)
        mu = a * x + c * v
        r = (tl.load(xp_ptr + j, mask=mask, other=0.0).to(tl.float32) - mu) * inv_s2
        g_mu += gl * r
    g_mur = tl.zeros([BLOCK], dtype=tl.float32)
    if KL and HAS_GKL:
        gk = tl.load(gkl_ptr + b) * f
        vr = tl.load(vr_ptr + j, mask=mask, other=0.0).to(tl.float32)
        if GUID:
            vru = tl.load(vru_ptr + j, mask=mask, other=0.0).to(tl.float32)
            vr = vru + w * (vr - vru)
        q = c * (v - vr) * inv_s2
        g_mu += gk * q
        g_mur = -gk * q
    if W_GX:
        tl.store(gx_ptr + j, (a * (g_mu + g_mur)).to(gx_ptr.dtype.element_ty), mask=mask)
    if W_GV:
        tl.store(gv_ptr + j, (c * g_mu * wc).to(gv_ptr.dtype.element_ty), mask=mask)
    if W_GVU:
        tl.store(gvu_ptr + j, (c * g_mu * wu).to(gvu_ptr.dtype.element_ty), mask=mask)
    if W_GXP:
        tl.store(gxp_ptr + j, (-gl * r).to(gxp_ptr.dtype.element_ty), mask=mask)
    if W_GVR:
        tl.store(gvr_ptr + j, (c * g_mur * wc).to(gvr_ptr.dtype.element_ty), mask=mask)
    if W_GVRU:
        tl.store(gvru_ptr + j, (c * g_mur * wu).to(gvru_ptr.dtype.element_ty), mask=mask)


def _or(t, dummy):
    return dummy if t is None else t


def sde_step_forward(x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum, return_mean):
    """Launch the forward on [B, ...] tensors; returns (prev_out, mean, log_prob, kl) like the other backends."""
    B = x.shape[0]
    D = x.numel() // B
    nch = triton.cdiv(D, BLOCK)
    tasks = B * nch
    sampling = noise is not None
    prev_out = _alloc.empty_like(x) if sampling else x.new_empty(0)
    mean = _alloc.empty_like(x) if return_mean else x.new_empty(0)
    has_kl = vr is not None
    part = _alloc.empty(2 * tasks if has_kl else tasks, dtype=torch.float32, device=x.device)
    log_prob = _alloc.empty(B, dtype=torch.float32, device=x.device)
    kl = _alloc.empty(B, dtype=torch.float32, device=x.device) if has_kl else x.new_empty(0, dtype=torch.float32)
    _sde_step_fwd_kernel[(tasks,)](
        x, v, _or(vu, x), float(w), _or(noise, x), _or(prev_in, x), _or(vr, x), _or(vru, x),
        a, c, s, prev_out if sampling else x, mean if return_mean else x, part,
        D, nch, tasks,
        GUID=vu is not None, SAMPLE=sampling, KL=has_kl, MEAN=bool(return_mean), BLOCK=BLOCK,
        num_warps=8, enable_fp_fusion=False,
    )
    f = 1.0 if reduce_sum else 1.0 / D
    _sde_step_finalize_kernel[(B,)](
        part, s, log_prob, kl if has_kl else log_prob, nch, tasks, f, float(D) if reduce_sum else 1.0,
        KL=has_kl, BLOCK_N=max(16, triton.next_power_of_2(nch)), num_warps=1, enable_fp_fusion=False,
    )
    return prev_out, mean, log_prob, kl


def sde_step_backward(x, v, vu, w, prev, vr, vru, a, c, s, g_log_prob, g_kl, g_prev, g_mean,
                      sampling, reduce_sum, needs):
    """Launch the backward; ``needs`` = which of (x, v, vu, prev, vr, vru) want a gradient."""
    B = x.shape[0]
    D = x.numel() // B
    nch = triton.cdiv(D, BLOCK)
    want = [bool(n) and t is not None for n, t in zip(needs, (x, v, vu, None if sampling else prev, vr, vru))]
    outs = [_alloc.empty_like(x) if wnt else x.new_empty(0) for wnt in want]
    _sde_step_bwd_kernel[(B * nch,)](
        x, v, _or(vu, x), float(w), _or(prev, x), _or(vr, x), _or(vru, x), a, c, s,
        _or(g_log_prob, a), _or(g_kl, a), _or(g_prev, x), _or(g_mean, x),
        *[o if wnt else x for o, wnt in zip(outs, want)],
        D, nch, 1.0 if reduce_sum else 1.0 / D,
        GUID=vu is not None, SAMPLE=bool(sampling), KL=vr is not None,
        HAS_GLP=g_log_prob is not None, HAS_GKL=g_kl is not None,
        HAS_GPREV=g_prev is not None, HAS_GMEAN=g_mean is not None,
        W_GX=want[0], W_GV=want[1], W_GVU=want[2], W_GXP=want[3], W_GVR=want[4], W_GVRU=want[5],
        BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False,
    )
    return tuple(outs)

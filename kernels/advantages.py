"""group_advantages and win_rate in Triton. Same signatures as the other backends' launchers
(diffrl/ops/_native_backend.py); see diffrl/ops/advantages.py's docstring for the design.

group_advantages: one program per sorted row. A row that starts a segment (its id differs from
the previous row's) scans for the segment's end, reduces the segment in float64 tiles of BLOCK_G
rows (lane-wise accumulators, then tl.sum: a fixed order) and writes its rows; other programs do
nothing. win_rate: BLOCK rows per program, vectorised binary searches.

eps and clip travel in a float64 tensor: a Python float kernel argument would be rounded to float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffrl.ops import _alloc

BLOCK_S = 64  # ids scanned per step when looking for a segment's end
TILE = 4096  # elements per tile (BLOCK_G rows x columns)
WIN_BLOCK = 128


@triton.jit
def _segment_end(sid_ptr, p, B, BLOCK_S: tl.constexpr):
    """The end of the segment that starts at sorted row p, or p itself when row p starts none."""
    my = tl.load(sid_ptr + p)
    prev = tl.load(sid_ptr + tl.maximum(p - 1, 0))
    is_start = (p == 0) | (prev != my)
    end = p * 0 + B
    base = tl.where(is_start, p + 1, end)
    while base < end:
        offs = base + tl.arange(0, BLOCK_S)
        s = tl.load(sid_ptr + offs, mask=offs < B, other=my)
        end = tl.minimum(end, tl.min(tl.where(s != my, offs, B), axis=0))
        base += BLOCK_S
    return tl.where(is_start, end, p)


@triton.jit
def _single_value(vals_ptr, w_ptr, rows, jm, K, HAS_W: tl.constexpr, BLOCK_G: tl.constexpr):
    """The statistic of each row: its reward, or sum_k w_k r_k in the order k = 0, 1, ..."""
    if HAS_W:
        x = tl.zeros([BLOCK_G], dtype=tl.float64)
        for k in range(0, K):
            r = tl.load(vals_ptr + rows * K + k, mask=jm, other=0.0).to(tl.float64)
            x = x + r * tl.load(w_ptr + k)
    else:
        x = tl.load(vals_ptr + rows, mask=jm, other=0.0).to(tl.float64)
    return x


@triton.jit
def _group_single_kernel(
    vals_ptr, w_ptr, order_ptr, sid_ptr, gstd_ptr, sw_ptr, prm_ptr, out_ptr,
    B, K, T,
    HAS_W: tl.constexpr, STD: tl.constexpr, CLIP: tl.constexpr, HAS_SW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64)
    hi = _segment_end(sid_ptr, p, B, BLOCK_S)
    eps = tl.load(prm_ptr)
    clip = tl.load(prm_ptr + 1)
    lane = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_G], dtype=tl.float64)
    mn = tl.full([BLOCK_G], float("inf"), tl.float64)
    mx = tl.full([BLOCK_G], float("-inf"), tl.float64)
    for start in range(p, hi, BLOCK_G):
        j = start + lane
        jm = j < hi
        rows = tl.load(order_ptr + j, mask=jm, other=0)
        x = _single_value(vals_ptr, w_ptr, rows, jm, K, HAS_W, BLOCK_G)
        acc += tl.where(jm, x, 0.0)
        mn = tl.minimum(mn, tl.where(jm, x, float("inf")))
        mx = tl.maximum(mx, tl.where(jm, x, float("-inf")))
    nf = tl.maximum(hi - p, 1).to(tl.float64)
    mean = tl.sum(acc, axis=0) / nf
    all_equal = tl.min(mn, axis=0) == tl.max(mx, axis=0)
    if STD == 1:
        sq = tl.zeros([BLOCK_G], dtype=tl.float64)
        for start in range(p, hi, BLOCK_G):
            j = start + lane
            jm = j < hi
            rows = tl.load(order_ptr + j, mask=jm, other=0)
            d = tl.where(jm, _single_value(vals_ptr, w_ptr, rows, jm, K, HAS_W, BLOCK_G) - mean, 0.0)
            sq += d * d
        denom = tl.sqrt(tl.sum(sq, axis=0) / nf) + eps
    elif STD == 2:
        denom = tl.load(gstd_ptr) + eps
    else:
        denom = eps * 0.0 + 1.0
    zero = all_equal | (denom != denom) | (denom <= 0.0)
    denom = tl.where(zero, 1.0, denom)
    t = tl.arange(0, BLOCK_T)
    tm = t < T
    if HAS_SW:
        swv = tl.load(sw_ptr + t, mask=tm, other=0.0)
    else:
        swv = tl.full([BLOCK_T], 1.0, tl.float64)
    for start in range(p, hi, BLOCK_G):
        j = start + lane
        jm = j < hi
        rows = tl.load(order_ptr + j, mask=jm, other=0)
        x = _single_value(vals_ptr, w_ptr, rows, jm, K, HAS_W, BLOCK_G)
        a = tl.where(zero, 0.0, (x - mean) / denom)
        if CLIP:
            a = tl.minimum(tl.maximum(a, -clip), clip)
        o = a[:, None] * swv[None, :]
        tl.store(out_ptr + rows[:, None] * T + t[None, :], o.to(tl.float32), mask=jm[:, None] & tm[None, :])


@triton.jit
def _group_cols_kernel(
    vals_ptr, w_ptr, order_ptr, sid_ptr, gstd_ptr, sw_ptr, prm_ptr, out_ptr,
    B, K, T,
    DENSE: tl.constexpr, STD: tl.constexpr, CLIP: tl.constexpr, HAS_SW: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """K statistic columns: normalize_each (sum_k w_k A_k, broadcast to T) or dense (T == K)."""
    p = tl.program_id(0).to(tl.int64)
    hi = _segment_end(sid_ptr, p, B, BLOCK_S)
    eps = tl.load(prm_ptr)
    clip = tl.load(prm_ptr + 1)
    lane = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_C)
    cm = cols < K
    acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float64)
    mn = tl.full([BLOCK_G, BLOCK_C], float("inf"), tl.float64)
    mx = tl.full([BLOCK_G, BLOCK_C], float("-inf"), tl.float64)
    for start in range(p, hi, BLOCK_G):
        j = start + lane
        jm = j < hi
        rows = tl.load(order_ptr + j, mask=jm, other=0)
        m2 = jm[:, None] & cm[None, :]
        x = tl.load(vals_ptr + rows[:, None] * K + cols[None, :], mask=m2, other=0.0).to(tl.float64)
        acc += tl.where(m2, x, 0.0)
        mn = tl.minimum(mn, tl.where(m2, x, float("inf")))
        mx = tl.maximum(mx, tl.where(m2, x, float("-inf")))
    nf = tl.maximum(hi - p, 1).to(tl.float64)
    mean = tl.sum(acc, axis=0) / nf
    all_equal = tl.min(mn, axis=0) == tl.max(mx, axis=0)
    if STD == 1:
        sq = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float64)
        for start in range(p, hi, BLOCK_G):
            j = start + lane
            jm = j < hi
            rows = tl.load(order_ptr + j, mask=jm, other=0)
            m2 = jm[:, None] & cm[None, :]
            x = tl.load(vals_ptr + rows[:, None] * K + cols[None, :], mask=m2, other=0.0).to(tl.float64)
            d = tl.where(m2, x - mean[None, :], 0.0)
            sq += d * d
        denom = tl.sqrt(tl.sum(sq, axis=0) / nf) + eps
    elif STD == 2:
        denom = tl.load(gstd_ptr + cols, mask=cm, other=1.0) + eps
    else:
        denom = tl.full([BLOCK_C], 1.0, tl.float64)
    zero = all_equal | (denom != denom) | (denom <= 0.0)
    denom = tl.where(zero, 1.0, denom)
    if DENSE:
        if HAS_SW:
            swc = tl.load(sw_ptr + cols, mask=cm, other=0.0)
        else:
            swc = tl.full([BLOCK_C], 1.0, tl.float64)
    else:
        wv = tl.load(w_ptr + cols, mask=cm, other=0.0)
        t = tl.arange(0, BLOCK_T)
        tm = t < T
        if HAS_SW:
            swv = tl.load(sw_ptr + t, mask=tm, other=0.0)
        else:
            swv = tl.full([BLOCK_T], 1.0, tl.float64)
    for start in range(p, hi, BLOCK_G):
        j = start + lane
        jm = j < hi
        rows = tl.load(order_ptr + j, mask=jm, other=0)
        m2 = jm[:, None] & cm[None, :]
        x = tl.load(vals_ptr + rows[:, None] * K + cols[None, :], mask=m2, other=0.0).to(tl.float64)
        a = tl.where(zero[None, :], 0.0, (x - mean[None, :]) / denom[None, :])
        if DENSE:
            if CLIP:
                a = tl.minimum(tl.maximum(a, -clip), clip)
            o = a * swc[None, :]
            tl.store(out_ptr + rows[:, None] * K + cols[None, :], o.to(tl.float32), mask=m2)
        else:
            s = tl.sum(a * wv[None, :], axis=1)
            if CLIP:
                s = tl.minimum(tl.maximum(s, -clip), clip)
            o = s[:, None] * swv[None, :]
            tl.store(out_ptr + rows[:, None] * T + t[None, :], o.to(tl.float32), mask=jm[:, None] & tm[None, :])


@triton.jit
def _win_rate_kernel(vals_ptr, order_ptr, sid_ptr, out_ptr, B, NITER: tl.constexpr, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    jm = j < B
    my = tl.load(sid_ptr + j, mask=jm, other=0)
    # the group [lo, hi): first index in [0, j] with id >= my, first in [j + 1, B) with id > my
    a = j * 0
    b = tl.where(jm, j, 0)
    for _ in range(NITER):
        act = a < b
        m = a + (b - a) // 2
        v = tl.load(sid_ptr + m, mask=act, other=0)
        a = tl.where(act & (v < my), m + 1, a)
        b = tl.where(act & (v >= my), m, b)
    lo = a
    a = tl.where(jm, j + 1, 0)
    b = tl.where(jm, j * 0 + B, 0)
    for _ in range(NITER):
        act = a < b
        m = a + (b - a) // 2
        v = tl.load(sid_ptr + m, mask=act, other=0)
        a = tl.where(act & (v <= my), m + 1, a)
        b = tl.where(act & (v > my), m, b)
    hi = a
    row = tl.load(order_ptr + j, mask=jm, other=0)
    x = tl.load(vals_ptr + row, mask=jm, other=0.0)
    # the scores ascend within the group: members below x in [lo, j), above x in [j + 1, hi)
    a = lo
    b = tl.where(jm, j, lo)
    for _ in range(NITER):
        act = a < b
        m = a + (b - a) // 2
        v = tl.load(vals_ptr + tl.load(order_ptr + m, mask=act, other=0), mask=act, other=0.0)
        a = tl.where(act & (v < x), m + 1, a)
        b = tl.where(act & (v >= x), m, b)
    below = a - lo
    a = tl.where(jm, j + 1, hi)
    b = hi
    for _ in range(NITER):
        act = a < b
        m = a + (b - a) // 2
        v = tl.load(vals_ptr + tl.load(order_ptr + m, mask=act, other=0), mask=act, other=0.0)
        a = tl.where(act & (v <= x), m + 1, a)
        b = tl.where(act & (v > x), m, b)
    equal = a - lo - below
    n = hi - lo
    num = (2 * below + equal - 1).to(tl.float64)
    den = (2 * tl.maximum(n - 1, 1)).to(tl.float64)
    w = tl.where(n > 1, num / den, 0.5)
    tl.store(out_ptr + row, w.to(tl.float32), mask=jm)


def _params(device, *values):
    """A float64 tensor of scalars, filled on the device (no host-to-device copy)."""
    t = torch.empty(len(values), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        t[i] = v
    return t


def _pow2(n):
    return max(1, triton.next_power_of_2(int(n)))


def group_advantages(vals, order, sorted_ids, weights, gstd, step_weights, mode, std_mode, eps, clip, T, squeeze):
    """Launch group_advantages on prepared inputs (see diffrl/ops/advantages.py); returns float32 [B] or [B, T]."""
    B = vals.shape[0]
    K = vals.shape[1] if vals.dim() == 2 else 1
    out = _alloc.empty((B,) if squeeze else (B, T), dtype=torch.float32, device=vals.device)
    prm = _params(vals.device, float(eps), float(clip))
    dummy = prm
    common = dict(STD=int(std_mode), CLIP=bool(clip > 0), HAS_SW=step_weights is not None, BLOCK_S=BLOCK_S,
                  num_warps=4, enable_fp_fusion=False)
    ptrs = (vals, weights if weights is not None else dummy, order, sorted_ids, gstd if gstd is not None else dummy,
            step_weights if step_weights is not None else dummy, prm, out)
    if mode == 0:
        BLOCK_T = _pow2(T)
        BLOCK_G = max(1, min(128, TILE // BLOCK_T))
        _group_single_kernel[(B,)](*ptrs, B, K, T, HAS_W=weights is not None, BLOCK_G=BLOCK_G, BLOCK_T=BLOCK_T,
                                   **common)
    else:
        dense = mode == 2
        BLOCK_C = _pow2(K)
        BLOCK_T = BLOCK_C if dense else _pow2(T)
        BLOCK_G = max(1, min(128, TILE // max(BLOCK_C, BLOCK_T)))
        _group_cols_kernel[(B,)](*ptrs, B, K, T, DENSE=dense, BLOCK_G=BLOCK_G, BLOCK_C=BLOCK_C, BLOCK_T=BLOCK_T,
                                 **common)
    return out


def win_rate(vals, order, sorted_ids):
    """Launch win_rate on scores and the (group id, score) order; returns float32 [B]."""
    B = vals.shape[0]
    out = _alloc.empty(B, dtype=torch.float32, device=vals.device)
    _win_rate_kernel[(triton.cdiv(B, WIN_BLOCK),)](vals, order, sorted_ids, out, B, NITER=max(1, int(B).bit_length()),
                                                   BLOCK=WIN_BLOCK, num_warps=4)
    return out

"""reward_attention in Triton: a flash-style forward over padded sequences with lengths and an
index from each query sequence to the key/value sequence it reads.

One program per (block of BLOCK_M query rows, query sequence n, head h). It reads its lengths and
``kv_index[n]`` first, then loops over key blocks only up to the key sequence's real length (and,
with ``causal``, only up to the block's last query row): padded tiles are never loaded or
multiplied, so the work follows the real tokens. A query block entirely in the padding runs no
iteration and writes zeros. Softmax is online (running max and sum, rescaled per block) in float32
with exp2; both matmuls accumulate in float32 (``tl.dot``), the probabilities entering the second
one in the input dtype as every flash kernel does. Loads of padded rows are masked to zero, so
NaN or garbage in the padding never reaches the result.

Any strides with a unit stride on the head dimension: transformers hands q/k/v over as
[B, H, L, D] views of [B, L, H, D] projections, and the output is written straight into a
[N, Lq, H, D] buffer (returned as its [N, H, Lq, D] view), so neither side needs a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffrl.ops import _alloc

LOG2E = 1.4426950408889634


@triton.jit
def _reward_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, qlens_ptr, kvlens_ptr, idx_ptr,
    s_qn, s_qh, s_ql, s_kn, s_kh, s_kl, s_vn, s_vh, s_vl, s_on, s_oh, s_ol,
    H, Lq, Lk, D, qk_scale,
    HAS_QLENS: tl.constexpr, HAS_KVLENS: tl.constexpr, HAS_IDX: tl.constexpr, CAUSAL: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    mblk = tl.program_id(0)
    nh = tl.program_id(1).to(tl.int64)
    n = nh // H
    h = nh % H

    # lengths are clamped to the tensor bounds so that even unvalidated values never read out of bounds
    q_len = Lq
    if HAS_QLENS:
        q_len = tl.minimum(tl.maximum(tl.load(qlens_ptr + n).to(tl.int32), 0), Lq)
    kv = n
    if HAS_IDX:
        kv = tl.load(idx_ptr + n).to(tl.int64)
    k_len = Lk
    if HAS_KVLENS:
        k_len = tl.minimum(tl.maximum(tl.load(kvlens_ptr + kv).to(tl.int32), 0), Lk)

    m_start = mblk * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D  # head dims that are not a power of two run in a padded block
    row_ok = offs_m < q_len

    q = tl.load(q_ptr + n * s_qn + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + kv * s_kn + h * s_kh
    v_base = v_ptr + kv * s_vn + h * s_vh

    # keys this block can see: the real ones, up to the last query row under causal; none for a padded block
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, m_start + BLOCK_M)
    hi = tl.where(m_start < q_len, hi, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ok = offs_n < k_len
        kt = tl.load(k_base + offs_n[None, :] * s_kl + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale  # log2 units: exp2 below
        allowed = k_ok[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row that has seen no allowed key yet keeps max -inf: shift by 0 so that exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
        else:
            pv = tl.dot(p.to(vb.dtype), vb)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = tl.where(row_ok[:, None], out, 0.0)  # padded query rows are exactly zero
    tl.store(o_ptr + n * s_on + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(offs_m < Lq)[:, None] & d_ok[None, :])


def _block(length: int) -> int:
    # short (text) sequences waste less on padding with 32-row tiles; long (image) ones want 64
    return 32 if length <= 128 else 64


def reward_attention_forward(q, k, v, q_lens, kv_lens, kv_index, causal, scale):
    """Launch on validated inputs (last dim unit-stride); returns [N, H, Lq, D], a view of a
    [N, Lq, H, D] buffer."""
    N, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = _alloc.empty((N, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    block_m, block_n = _block(Lq), _block(Lk)
    block_d = max(16, triton.next_power_of_2(D))
    dummy = q  # never read: the HAS_* flags switch the loads off
    grid = (triton.cdiv(Lq, block_m), N * H)
    _reward_attention_fwd_kernel[grid](
        q, k, v, out,
        q_lens if q_lens is not None else dummy,
        kv_lens if kv_lens is not None else dummy,
        kv_index if kv_index is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, D, float(scale) * LOG2E,
        HAS_QLENS=q_lens is not None, HAS_KVLENS=kv_lens is not None, HAS_IDX=kv_index is not None,
        CAUSAL=bool(causal), IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out


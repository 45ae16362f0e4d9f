"""The ``flash_attn`` backend's launcher: reward_attention through the flash-attn package's varlen
kernel (CUDA tensors, float16/bfloat16). Same signature as the triton launcher
``diffrl.kernels.reward_attention.reward_attention_forward``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reward_attention_forward(q, k, v, q_lens, kv_lens, kv_index, causal, scale):
    """flash-attn's varlen API on the real tokens only (packed), scattered back into zeros."""
    from flash_attn import flash_attn_varlen_func  # noqa: PLC0415

    N, H, Lq, D = q.shape
    Lk = k.shape[2]
    dev = q.device
    idx = torch.arange(N, device=dev) if kv_index is None else kv_index.long()
    ql = torch.full((N,), Lq, device=dev, dtype=torch.int32) if q_lens is None else q_lens.int()
    kl = torch.full((N,), Lk, device=dev, dtype=torch.int32) if kv_lens is None else kv_lens.int()[idx]
    ql, kl = ql.clamp(0, Lq), kl.clamp(0, Lk)
    max_q, max_k, mismatch = torch.stack([ql.max(), kl.max(), (ql != kl).any().int()]).tolist()
    if causal and mismatch:
        raise ValueError("reward_attention: backend 'flash_attn' with causal=True needs q_lens == kv_lens[kv_index] "
                         "(flash-attn aligns the causal mask to the end of the keys); use backend='triton'")
    q_rows = torch.arange(Lq, device=dev)[None, :] < ql[:, None]  # [N, Lq]
    k_rows = torch.arange(Lk, device=dev)[None, :] < kl[:, None]  # [N, Lk]
    qp = q.transpose(1, 2)[q_rows]  # [total_q, H, D]
    kp = k.transpose(1, 2)[idx][k_rows]  # flash-attn has no indirection: the shared keys are gathered
    vp = v.transpose(1, 2)[idx][k_rows]
    cu_q = F.pad(ql.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(kl.cumsum(0, dtype=torch.int32), (1, 0))
    packed = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, max(int(max_q), 1), max(int(max_k), 1), dropout_p=0.0,
                                    softmax_scale=scale, causal=causal)
    out = torch.zeros((N, Lq, H, D), dtype=q.dtype, device=dev)
    out[q_rows] = packed.to(q.dtype)
    return out.transpose(1, 2)

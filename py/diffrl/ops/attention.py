"""Batched reward attention: ``diffrl.ops.reward_attention`` (the fused kernel: kernels/reward_attention.py)."""

from __future__ import annotations

import math

import torch

from diffrl.ops import _dispatch
from diffrl.ops._library import LIB
from diffrl.ops.reference import reward_attention_reference

IMPLEMENTED = _dispatch.implementing("reward_attention")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # a backend's record may narrow them
_INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def reward_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_lens: torch.Tensor | None = None,
    kv_lens: torch.Tensor | None = None,
    kv_index: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Multi-head attention over a batch of padded sequences, with lengths and shared keys/values.

    ``q`` [N, H, Lq, D]; ``k``, ``v`` [M, H, Lk, D] (padded; any strides with a unit stride on D).
    Returns [N, H, Lq, D] in the input dtype:

        out[n, h, i] = sum_t softmax_t(scale * q[n, h, i] . k[j, h, t]) v[j, h, t],   j = kv_index[n]

    over the keys t < kv_lens[j] (and t <= i with ``causal``, positions counted from the start of
    each sequence, as a text tower's causal mask does).

    * ``kv_index`` [N] (int32/int64, default the identity with M == N): the key/value sequence each
      query sequence reads, so that one prompt's keys/values serve the G images of its group
      without being copied.
    * ``q_lens`` [N], ``kv_lens`` [M] (int32/int64, default full): real lengths. The fused
      backends skip padded tiles entirely (work proportional to the real tokens); padded query
      rows come out as exact zeros, and so does a row with no key to attend (a zero length).
      Whatever the padding holds, NaN included, never reaches the result.
    * ``scale``: default ``D ** -0.5``.
    * ``validate=False`` skips the checks of the length and index *values* (one device-to-host
      copy per call); shapes, dtypes and devices are always checked. The fused kernels clamp
      lengths to the tensor sizes, but an out-of-range ``kv_index`` is then undefined behaviour.

    Backends: ``torch`` (the reference: explicit masked softmax, float64-capable), ``triton``
    (flash-style: online softmax, float32 accumulation; float32/float16/bfloat16; CUDA tensors, or
    CPU tensors under TRITON_INTERPRET=1; float32 matmuls in full IEEE precision, not TF32) and
    ``flash_attn`` (flash-attn's varlen kernel where that package is installed; float16/bfloat16;
    it has no index indirection, so shared keys/values are gathered per query sequence first, and
    with ``causal`` each query length must equal its key length, since flash-attn aligns the causal
    mask to the end of the keys). ``auto`` picks triton for CUDA tensors and the reference
    otherwise (and the reference for float64); flash_attn only when asked for.

    Gradients: the kernels are forward only (what reward scoring needs). When autograd is on and
    ``q``, ``k`` or ``v`` requires grad, the call runs the reference whatever the backend, so
    gradients are exact but cost the reference's memory.

    The result of a fused backend is a [N, H, Lq, D] view of a [N, Lq, H, D] buffer: ``out.transpose(1, 2)``
    is contiguous, which is the layout transformers' attention functions return.
    """
    _validate(q, k, v, q_lens, kv_lens, kv_index, causal, scale)
    if validate and not torch.compiler.is_compiling():
        _validate_values(q, k, q_lens, kv_lens, kv_index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = _dispatch.resolve("reward_attention", IMPLEMENTED, backend, q.device)
    dtypes = _dispatch.kernel_dtypes(name, "reward_attention", _KERNEL_DTYPES)
    if name != "torch" and q.dtype not in dtypes:
        if backend != "auto":
            kinds = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"reward_attention: backend {name!r} takes {kinds} tensors, got {q.dtype}; "
                            "use backend='torch' for this dtype")
        name = "torch"  # auto: float64 goes to the reference
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if name == "torch" or needs_grad:
        return reward_attention_reference(q, k, v, q_lens=q_lens, kv_lens=kv_lens, kv_index=kv_index,
                                          causal=causal, scale=scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _call_fwd(q, k, v, q_lens, kv_lens, kv_index, bool(causal), scale, name)


# ----------------------------------------------------------------------------------------------
# validation: every bad call raises here, before any kernel runs


def _validate(q, k, v, q_lens, kv_lens, kv_index, causal, scale):
    for n, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"reward_attention: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"reward_attention: {n} must be 4-D [batch, heads, length, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"reward_attention: {n} must be a floating-point tensor, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"reward_attention: {n} is empty (shape {tuple(t.shape)})")
    for n, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"reward_attention: {n} has dtype {t.dtype} but q has {q.dtype} (cast them to one dtype)")
        if t.device != q.device:
            raise ValueError(f"reward_attention: {n} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"reward_attention: k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    N, H, _, D = q.shape
    M = k.shape[0]
    if k.shape[1] != H:
        raise ValueError(f"reward_attention: q has {H} heads but k has {k.shape[1]}")
    if k.shape[3] != D:
        raise ValueError(f"reward_attention: q has head dim {D} but k has {k.shape[3]}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"reward_attention: head dim {D} is over the supported {MAX_HEAD_DIM}")
    for n, t, size in (("q_lens", q_lens, N), ("kv_lens", kv_lens, M), ("kv_index", kv_index, N)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"reward_attention: {n} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"reward_attention: {n} must be int32 or int64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(f"reward_attention: {n} must have shape [{size}], got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"reward_attention: {n} is on {t.device} but q is on {q.device}")
    if kv_index is None and M != N:
        raise ValueError(f"reward_attention: q has {N} sequences and k has {M}: give kv_index to map them")
    if not isinstance(causal, bool):
        raise TypeError(f"reward_attention: causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"reward_attention: scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"reward_attention: scale must be finite and positive, got {scale}")


def _validate_values(q, k, q_lens, kv_lens, kv_index):
    # one device-to-host copy for all the checks
    checks = []
    if q_lens is not None:
        checks.append(((q_lens < 0) | (q_lens > q.shape[2])).any())
    if kv_lens is not None:
        checks.append(((kv_lens < 0) | (kv_lens > k.shape[2])).any())
    if kv_index is not None:
        checks.append(((kv_index < 0) | (kv_index >= k.shape[0])).any())
    if not checks:
        return
    bad = torch.stack(checks).tolist()
    names = [n for n, t in (("q_lens", q_lens), ("kv_lens", kv_lens), ("kv_index", kv_index)) if t is not None]
    limits = {"q_lens": f"[0, {q.shape[2]}]", "kv_lens": f"[0, {k.shape[2]}]", "kv_index": f"[0, {k.shape[0] - 1}]"}
    for n, b in zip(names, bad):
        if b:
            raise ValueError(f"reward_attention: {n} has values outside {limits[n]}")


# ----------------------------------------------------------------------------------------------
# torch.library op (opaque to torch.compile, with a fake implementation); forward only

LIB.define(
    "reward_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? q_lens, Tensor? kv_lens, Tensor? kv_index, "
    "bool causal, float scale, str backend) -> Tensor"
)


def _reward_attention_fwd(q, k, v, q_lens, kv_lens, kv_index, causal, scale, backend):
    return _dispatch.launcher(backend, "reward_attention_forward")(q, k, v, q_lens, kv_lens, kv_index, causal, scale)


for _key in ("CPU", "CUDA"):
    LIB.impl("reward_attention_fwd", _reward_attention_fwd, _key)


@torch.library.register_fake("diffrl::reward_attention_fwd")
def _reward_attention_fwd_fake(q, k, v, q_lens, kv_lens, kv_index, causal, scale, backend):
    N, H, Lq, D = q.shape
    # the same layout as the kernels' result: a [N, H, Lq, D] view of a [N, Lq, H, D] buffer
    return q.new_empty((N, Lq, H, D)).transpose(1, 2)


def _call_fwd(*args):
    # eager calls skip the dispatcher (~30 us per call); torch.compile sees the registered op
    if torch.compiler.is_compiling():
        return torch.ops.diffrl.reward_attention_fwd(*args)
    return _reward_attention_fwd(*args)


__all__ = ["reward_attention"]

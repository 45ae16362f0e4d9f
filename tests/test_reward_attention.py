"""reward_attention: every backend against the float64 reference (the spec), the reference against a
per-sequence loop, lengths / kv_index / causal, padding, gradients, compile, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.ops import reward_attention
from diffrl.ops.reference import reward_attention_reference

from conftest import HAS_GPU, available

BACKENDS = ["torch"] + (["triton"] if available("triton") else []) + (["triton-gpu"] if HAS_GPU else []) + \
    (["flash_attn"] if available("flash_attn", "cuda") else [])
FUSED = [b for b in BACKENDS if b != "torch"]
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2),
       torch.float64: (1e-12, 1e-12)}


def device_of(backend):
    return "cuda" if backend in ("triton-gpu", "flash_attn") else "cpu"


def name_of(backend):
    return "triton" if backend == "triton-gpu" else backend


def dtypes_for(backend):
    if backend == "flash_attn":
        return [torch.float16, torch.bfloat16]
    if backend == "triton":  # the interpreter: no bf16 dot
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def make(N, M, H, Lq, Lk, D, dtype=torch.float32, *, lens=True, index=True, poison=True, equal_lens=False):
    """Random inputs; padding filled with NaN (it must never reach the result); lengths include 0,
    1 and full; kv_index maps N query sequences to M key/value sequences, groups of any size."""
    q = torch.randn(N, H, Lq, D).to(dtype)
    k = torch.randn(M, H, Lk, D).to(dtype)
    v = torch.randn(M, H, Lk, D).to(dtype)
    kv_index = torch.randint(0, M, (N,)) if index else None
    q_lens = kv_lens = None
    if lens:
        kv_lens = torch.randint(1, Lk + 1, (M,))
        kv_lens[0] = Lk
        if equal_lens:  # self-attention: each query sequence as long as its keys
            q_lens = kv_lens[kv_index] if index else kv_lens.clone()
        else:
            q_lens = torch.randint(0, Lq + 1, (N,))
            q_lens[0] = Lq
            if N > 2:
                q_lens[1], q_lens[2] = 1, 0
        if poison:
            for n in range(N):
                q[n, :, int(q_lens[n]):] = float("nan")
            for m in range(M):
                k[m, :, int(kv_lens[m]):] = float("nan")
                v[m, :, int(kv_lens[m]):] = float("nan")
    return dict(q=q, k=k, v=v, q_lens=q_lens, kv_lens=kv_lens, kv_index=kv_index)


def to(inp, device, dtype=None):
    out = {}
    for n, t in inp.items():
        if t is None:
            out[n] = None
        elif t.is_floating_point():
            out[n] = t.to(device=device, dtype=dtype or t.dtype)
        else:
            out[n] = t.to(device)
    return out


def reference64(inp, causal, scale=None):
    return reward_attention_reference(**to(inp, "cpu", torch.float64), causal=causal, scale=scale)


def naive(q, k, v, q_lens, kv_lens, kv_index, causal, scale=None):
    """The spec written the long way: one sequence and head at a time, real tokens only, torch.softmax."""
    N, H, Lq, D = q.shape
    out = torch.zeros(N, H, Lq, D, dtype=torch.float64)
    scale = D ** -0.5 if scale is None else scale
    for n in range(N):
        j = n if kv_index is None else int(kv_index[n])
        ql = Lq if q_lens is None else int(q_lens[n])
        kl = k.shape[2] if kv_lens is None else int(kv_lens[j])
        if ql == 0 or kl == 0:
            continue
        for h in range(H):
            s = q[n, h, :ql].double() @ k[j, h, :kl].double().T * scale
            if causal:
                s = s.masked_fill(torch.ones(ql, kl, dtype=torch.bool).triu(1), -math.inf)
            out[n, h, :ql] = torch.softmax(s, dim=-1) @ v[j, h, :kl].double()
    return out


def check(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# the reference is the spec: check it against the loop


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_index", [False, True])
def test_reference_matches_a_per_sequence_loop(causal, with_index):
    inp = make(6, 6 if not with_index else 3, 2, 9, 9 if causal else 13, 8, torch.float64, index=with_index)
    got = reward_attention_reference(**inp, causal=causal)
    want = naive(**inp, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # padded query rows are exact zeros
    for n in range(6):
        assert torch.equal(got[n, :, int(inp["q_lens"][n]):], torch.zeros_like(got[n, :, int(inp["q_lens"][n]):]))


def test_reference_float32_is_close_to_float64():
    inp = make(4, 2, 3, 17, 20, 16, torch.float32)
    got = reward_attention_reference(**inp, causal=False)
    want = reference64(inp, causal=False)
    assert got.dtype == torch.float32
    check(got, want, torch.float32)


def test_row_without_keys_is_zero_not_nan():
    q, k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4)
    kv_lens = torch.tensor([0, 5])
    for backend in BACKENDS:
        if device_of(backend) != "cpu":
            continue
        out = reward_attention(q, k, v, kv_lens=kv_lens, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# every backend against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_reference(backend, head_dim, causal):
    """Odd lengths over more than one block (Lq 37 = 32 + 5, Lk 77), kv_index groups, NaN in the padding."""
    dev = device_of(backend)
    for dtype in dtypes_for(backend):
        if causal:  # text-tower self-attention: equal lengths
            inp = make(5, 3, 2, 37, 37, head_dim, equal_lens=True)
        else:
            inp = make(5, 3, 2, 37, 77, head_dim)
        x = to(inp, dev, dtype)
        out = reward_attention(**x, causal=causal, backend=name_of(backend))
        assert out.shape == x["q"].shape and out.dtype == dtype and out.device.type == dev
        check(out, reference64(to(inp, "cpu", dtype), causal), dtype)
        # padded query rows: exact zeros
        for n in range(5):
            tail = out[n, :, int(inp["q_lens"][n]):]
            assert torch.equal(tail, torch.zeros_like(tail))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 32), (2, 3, 65, 200, 64), (3, 1, 16, 129, 96)],
                         ids=["single-token", "image-like", "long-keys"])
def test_backend_without_lengths_or_index(backend, shape):
    N, H, Lq, Lk, D = shape
    dev = device_of(backend)
    dtype = torch.float16 if backend == "flash_attn" else torch.float32
    inp = make(N, N, H, Lq, Lk, D, lens=False, index=False)
    out = reward_attention(**to(inp, dev, dtype), backend=name_of(backend))
    check(out, reference64(to(inp, "cpu", dtype), False), dtype)


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "flash_attn"])
def test_causal_with_fewer_queries_than_keys_and_scale(backend):
    """Causal positions count from the start of both sequences (top-left aligned)."""
    inp = make(3, 2, 2, 20, 45, 32)
    dev = device_of(backend)
    out = reward_attention(**to(inp, dev), causal=True, scale=0.3, backend=name_of(backend))
    check(out, reference64(inp, True, scale=0.3), torch.float32)
    torch.testing.assert_close(out.double().cpu(), naive(**to(inp, "cpu", torch.float64), causal=True, scale=0.3),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic_and_strided_inputs(backend):
    """Two calls agree bitwise; q/k/v as transformers hands them over ([B, H, L, D] views of
    [B, L, H, D]) give the same result as contiguous copies; the result's transpose is contiguous."""
    dev = device_of(backend)
    dtype = torch.float16 if backend == "flash_attn" else torch.float32
    B, L, H, D = 4, 21, 2, 32
    qkv = torch.randn(3, B, L, H, D).to(device=dev, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv)
    lens = torch.tensor([21, 5, 13, 1], device=dev)
    a = reward_attention(q, k, v, q_lens=lens, kv_lens=lens, causal=True, backend=name_of(backend))
    b = reward_attention(q, k, v, q_lens=lens, kv_lens=lens, causal=True, backend=name_of(backend))
    c = reward_attention(q.contiguous(), k.contiguous(), v.contiguous(), q_lens=lens, kv_lens=lens, causal=True,
                         backend=name_of(backend))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.transpose(1, 2).is_contiguous()


def test_auto_picks_the_reference_on_cpu_and_float64():
    inp = make(3, 2, 2, 7, 9, 16, torch.float64)
    out = reward_attention(**inp)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reward_attention_reference(**inp), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# gradients go through the reference


def test_gradcheck_float64():
    inp = make(3, 2, 1, 4, 5, 3, torch.float64, poison=False)
    q, k, v = (inp[n].clone().requires_grad_() for n in ("q", "k", "v"))
    kw = {n: inp[n] for n in ("q_lens", "kv_lens", "kv_index")}
    assert torch.autograd.gradcheck(lambda q, k, v: reward_attention(q, k, v, causal=True, **kw), (q, k, v))


@pytest.mark.parametrize("backend", [b for b in FUSED if device_of(b) == "cpu"])
def test_requires_grad_routes_through_the_reference(backend):
    inp = make(3, 2, 2, 9, 11, 32, poison=False)
    leaves = [inp[n].clone().requires_grad_() for n in ("q", "k", "v")]
    kw = {n: inp[n] for n in ("q_lens", "kv_lens", "kv_index")}
    out = reward_attention(*leaves, **kw, backend=name_of(backend))
    out.square().sum().backward()
    ref_leaves = [inp[n].clone().requires_grad_() for n in ("q", "k", "v")]
    reward_attention_reference(*ref_leaves, **kw).square().sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# ----------------------------------------------------------------------------------------------
# torch.compile and torch.library


@pytest.mark.skipif(not available("triton"), reason="needs triton (interpreter)")
def test_compiles_with_fullgraph():
    inp = make(3, 2, 2, 9, 11, 32, poison=False)

    def fn(q, k, v, q_lens, kv_lens, kv_index):
        out = reward_attention(q, k, v, q_lens=q_lens, kv_lens=kv_lens, kv_index=kv_index, backend="triton")
        return out * 2.0

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**inp), fn(**inp), rtol=0, atol=0)


@pytest.mark.skipif(not available("triton"), reason="needs triton (interpreter)")
def test_torch_library_opcheck():
    inp = make(2, 2, 2, 5, 7, 32, poison=False, index=False)
    torch.library.opcheck(torch.ops.diffrl.reward_attention_fwd.default,
                          (inp["q"], inp["k"], inp["v"], inp["q_lens"], inp["kv_lens"], None, True, 0.2, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# bad input


def _bad_calls():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    ok = dict(q=q, k=k, v=v)
    yield "q must be a torch.Tensor", TypeError, {**ok, "q": q.numpy()}
    yield "q must be 4-D", ValueError, {**ok, "q": q[0]}
    yield "k must be a floating", TypeError, {**ok, "k": k.long()}
    yield "v has dtype", TypeError, {**ok, "v": v.double()}
    yield "k and v must have the same shape", ValueError, {**ok, "v": v[:, :, :5]}
    yield "q has 2 heads but k has 1", ValueError, {**ok, "k": k[:, :1], "v": v[:, :1]}
    yield "q has head dim 8 but k has 4", ValueError, {**ok, "k": k[..., :4], "v": v[..., :4]}
    yield "q is empty", ValueError, {**ok, "q": q[:, :, :0]}
    yield "head dim 300", ValueError, dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
                                           v=torch.randn(1, 1, 2, 300))
    yield "q has 2 sequences and k has 3", ValueError, {**ok, "k": torch.randn(3, 2, 6, 8),
                                                        "v": torch.randn(3, 2, 6, 8)}
    yield "q_lens must be int32 or int64", TypeError, {**ok, "q_lens": torch.tensor([1.0, 2.0])}
    yield r"q_lens must have shape \[2\]", ValueError, {**ok, "q_lens": torch.tensor([1, 2, 3])}
    yield r"kv_lens has values outside \[0, 6\]", ValueError, {**ok, "kv_lens": torch.tensor([7, 2])}
    yield r"q_lens has values outside \[0, 5\]", ValueError, {**ok, "q_lens": torch.tensor([-1, 2])}
    yield r"kv_index has values outside \[0, 1\]", ValueError, {**ok, "kv_index": torch.tensor([0, 2])}
    yield r"kv_index must have shape \[2\]", ValueError, {**ok, "kv_index": torch.tensor([0])}
    yield "kv_lens must be a torch.Tensor", TypeError, {**ok, "kv_lens": [1, 2]}
    yield "causal must be a bool", TypeError, {**ok, "causal": 1}
    yield "scale must be finite and positive", ValueError, {**ok, "scale": float("nan")}
    yield "scale must be a float", TypeError, {**ok, "scale": "0.5"}
    yield "unknown backend", ValueError, {**ok, "backend": "nope"}
    yield "backend must be a string", TypeError, {**ok, "backend": None}
    yield "does not implement this op", ValueError, {**ok, "backend": "cpp"}
    if not HAS_GPU:
        yield "backend 'flash_attn' is not available", ValueError, {**ok, "backend": "flash_attn"}
    if available("triton"):
        yield "backend 'triton' takes float32, float16, bfloat16", TypeError, dict(
            q=q.double(), k=k.double(), v=v.double(), backend="triton")


@pytest.mark.parametrize("match,exc,kwargs", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_clear_error(match, exc, kwargs):
    kwargs = dict(kwargs)
    args = (kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"))
    with pytest.raises(exc, match=match):
        reward_attention(*args, **kwargs)


def test_validate_false_skips_only_the_value_checks():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    lens = torch.tensor([3, 6])
    assert torch.equal(reward_attention(q, k, v, kv_lens=lens, validate=False), reward_attention(q, k, v, kv_lens=lens))
    with pytest.raises(ValueError, match="q has head dim"):
        reward_attention(q, k[..., :4], v[..., :4], validate=False)

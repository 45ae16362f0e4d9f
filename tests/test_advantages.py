"""group_advantages and win_rate: every backend against the reference (the spec) and against a plain
numpy per-group loop like the research code's, on odd batches; exact zeros for ties; determinism;
bad input; torch.compile."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import diffrl
from diffrl.ops.reference import group_advantages_reference, win_rate_reference

from conftest import HAS_GPU, available

CPU_BACKENDS = ["torch"] + [b for b in ("cpp", "triton") if available(b)]
GPU_BACKENDS = ["cuda", "triton-gpu"] if HAS_GPU else []
ALL = CPU_BACKENDS + GPU_BACKENDS
RTOL, ATOL = 1e-5, 1e-6


def device_of(backend):
    return "cuda" if backend in ("cuda", "triton-gpu") else "cpu"


def name_of(backend):
    return "triton" if backend == "triton-gpu" else backend


def backend_param(b):
    return pytest.param(b, marks=pytest.mark.gpu) if b in ("cuda", "triton-gpu") else b


BACKENDS = [backend_param(b) for b in ALL]


# ----------------------------------------------------------------------------------------------
# inputs


def make_ids(B, layout):
    """Unsorted, sparse (non-contiguous) group ids."""
    if layout == "random":
        ids = torch.randint(0, max(1, B // 4), (B,))
    elif layout == "one":  # one huge group
        ids = torch.zeros(B, dtype=torch.long)
    elif layout == "singletons":
        ids = torch.randperm(B)
    elif layout == "grpo":  # P prompts x G samples, shuffled
        G = 4
        ids = torch.arange(-(-B // G)).repeat_interleave(G)[:B][torch.randperm(B)]
    else:
        raise ValueError(layout)
    return ids * 7919 + 3  # large, sparse values


def make_rewards(shape, ids, ties=True):
    r = torch.randn(shape, dtype=torch.float64).float() * 3 + 0.5
    if ties and shape[0] > 2:
        g = ids[0]
        r[ids == g] = 0.1  # a group whose rewards are all equal (0.1 is not exact in binary)
        if shape[0] > 5:
            r[3] = r[4]  # a tie between two samples
    return r


def numpy_advantages(rewards, ids, *, std="group", eps=1e-4, clip=None):
    """The research code's way: a Python loop over groups with numpy statistics (population std),
    plus the spec's rule that a group of equal rewards gives exactly 0. Columns are independent."""
    r = np.asarray(rewards, dtype=np.float64)
    ids = np.asarray(ids)
    out = np.zeros_like(r)
    batch_std = r.std(axis=0)
    for g in np.unique(ids):
        m = ids == g
        x = r[m]
        mean = x.mean(axis=0)
        if std == "group":
            den = x.std(axis=0) + eps
        elif std == "global":
            den = batch_std + eps
        else:
            den = np.ones_like(mean)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = (x - mean) / den
        a[:, np.all(x == x[0], axis=0) | ~(den > 0)] = 0.0  # ties (and singletons), zero denominator
        out[m] = a
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return out


def assert_close(actual, expected, what, rtol=RTOL, atol=ATOL):
    actual = torch.as_tensor(actual).detach().cpu().double()
    expected = torch.as_tensor(expected).detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite output {actual}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} off, max abs err {err.max().item():.3g}"


def call(backend, rewards, ids, **kw):
    dev = device_of(backend)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = diffrl.group_advantages(rewards.to(dev), ids.to(dev), backend=name_of(backend), **kw)
    assert out.dtype == torch.float32 and out.device.type == dev
    return out.cpu()


# ----------------------------------------------------------------------------------------------
# single reward


SIZES_LAYOUTS = [(1, "random"), (2, "random"), (7, "random"), (37, "random"), (37, "grpo"), (130, "grpo"),
                 (61, "one"), (23, "singletons")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,layout", SIZES_LAYOUTS)
def test_single_reward_matches_reference_and_numpy(backend, B, layout):
    ids = make_ids(B, layout)
    r = make_rewards((B,), ids)
    for std, clip, eps in [("group", None, 1e-4), ("global", None, 1e-4), ("none", None, 1e-4),
                           ("group", 0.8, 0.0)]:
        out = call(backend, r, ids, std=std, clip=clip, eps=eps)
        ref = group_advantages_reference(r, ids, std=std, clip=clip, eps=eps)
        assert out.shape == (B,)
        # the kernels reduce in float64 like the reference: equal up to the float32 rounding
        assert_close(out, ref, f"{backend} {std} vs reference")
        assert_close(out, numpy_advantages(r.numpy(), ids.numpy(), std=std, eps=eps, clip=clip),
                     f"{backend} {std} vs numpy", rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sizes_and_group_structures(backend):
    """Sizes and group counts drawn from the test's seed; every option at once."""
    cap = 40 if backend == "triton" else 2000  # the Triton interpreter costs ~1 ms per program
    for _ in range(2 if backend == "triton" else 4):
        B = int(torch.randint(1, cap, ()))
        ids = torch.randint(0, int(torch.randint(1, B + 1, ())), (B,)) * 31
        K = int(torch.randint(1, 4, ()))
        r = make_rewards((B, K), ids)
        w = torch.randn(K, dtype=torch.float64)
        T = int(torch.randint(1, 6, ()))
        sw = torch.rand(T) + 0.5
        for std, combine in itertools.product(["group", "global", "none"], ["sum", "normalize_each"]):
            kw = dict(std=std, reward_weights=w, combine=combine, num_steps=T, step_weights=sw, clip=3.0)
            out = call(backend, r, ids, **kw)
            assert_close(out, group_advantages_reference(r, ids, **kw), f"B={B} K={K} T={T} {std} {combine}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_singletons_give_exact_zeros(backend):
    # groups: 5 equal rewards of 0.1 (not exact in binary: a float mean could be off by an ulp),
    # one singleton, a group of equal large values, and a normal group
    r = torch.tensor([0.1] * 5 + [3.0] + [1e7 + 0.5] * 3 + [1.0, 2.0, 4.0], dtype=torch.float32)
    ids = torch.tensor([5] * 5 + [9] + [2] * 3 + [7] * 3)
    perm = torch.randperm(len(r))
    r, ids = r[perm], ids[perm]
    for std, eps in itertools.product(["group", "global", "none"], [1e-4, 0.0]):
        out = call(backend, r, ids, std=std, eps=eps)
        tied = ids != 7
        assert torch.equal(out[tied], torch.zeros(int(tied.sum()))), f"{std} eps={eps}: {out[tied]}"
        assert torch.isfinite(out).all() and (out[~tied] != 0).all()
    # B = 1, and an all-equal batch with eps = 0 and global std (0 / 0 without the rule)
    assert torch.equal(call(backend, torch.tensor([2.5]), torch.tensor([4])), torch.zeros(1))
    out = call(backend, torch.full((6,), -1.25), torch.tensor([0, 0, 1, 1, 1, 2]), std="global", eps=0.0)
    assert torch.equal(out, torch.zeros(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_std_semantics_population_and_eps_on_the_std(backend):
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 20.0, 40.0])
    ids = torch.tensor([0, 0, 1, 1, 1, 1])
    eps = 0.5
    out = call(backend, r, ids, eps=eps)
    # group 0: mean 2, population std 1 -> (+-1) / 1.5
    assert_close(out[:2], torch.tensor([-1 / 1.5, 1 / 1.5]), "group std")
    m, s = 20.0, float(np.std([10.0, 10.0, 20.0, 40.0]))
    assert_close(out[2:], (torch.tensor([10.0, 10.0, 20.0, 40.0]) - m) / (s + eps), "group std 2")
    out = call(backend, r, ids, std="global", eps=eps)
    g = float(np.std(r.numpy()))
    assert_close(out[:2], torch.tensor([-1.0, 1.0]) / (g + eps), "global std")
    out = call(backend, r, ids, std="none")
    assert_close(out, torch.tensor([-1.0, 1.0, -10.0, -10.0, 0.0, 20.0]), "no std")


# ----------------------------------------------------------------------------------------------
# several reward heads, dense rewards, per-step broadcast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["sum", "normalize_each"])
def test_reward_heads(backend, combine):
    for B, layout, K in [(1, "random", 3), (29, "grpo", 3), (40, "random", 1), (17, "singletons", 2)]:
        ids = make_ids(B, layout)
        r = make_rewards((B, K), ids)
        w = torch.rand(K, dtype=torch.float64) * 2 - 0.5
        for std in ("group", "global"):
            out = call(backend, r, ids, reward_weights=w, combine=combine, std=std, clip=2.0)
            ref = group_advantages_reference(r, ids, reward_weights=w, combine=combine, std=std, clip=2.0)
            assert_close(out, ref, f"{combine} {std}")
            rn, wn = r.double().numpy(), w.numpy()
            if combine == "sum":
                expect = numpy_advantages(rn @ wn, ids.numpy(), std=std, clip=2.0)
            else:
                expect = np.clip(numpy_advantages(rn, ids.numpy(), std=std) @ wn, -2.0, 2.0)
            assert_close(out, expect, f"{combine} {std} vs numpy", atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_per_step_rewards_normalised_per_group_and_step(backend):
    for B, layout, T in [(1, "random", 3), (33, "grpo", 5), (21, "one", 2), (9, "singletons", 4)]:
        ids = make_ids(B, layout)
        r = make_rewards((B, T), ids)
        r[:, 1] = r[0, 1]  # a step whose rewards are all equal
        sw = torch.linspace(0.5, 1.5, T)
        for std in ("group", "global", "none"):
            out = call(backend, r, ids, num_steps=T, step_weights=sw, std=std, clip=1.5)
            ref = group_advantages_reference(r, ids, num_steps=T, step_weights=sw, std=std, clip=1.5)
            assert out.shape == (B, T)
            assert_close(out, ref, f"dense {std}")
            assert_close(out, numpy_advantages(r.numpy(), ids.numpy(), std=std, clip=1.5) * sw.numpy(),
                         f"dense {std} vs numpy", atol=1e-5)
            assert torch.equal(out[:, 1], torch.zeros(B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_over_steps_with_step_weights(backend):
    B, T = 26, 7
    ids = make_ids(B, "grpo")
    r = make_rewards((B,), ids)
    sw = torch.rand(T) + 0.1
    out = call(backend, r, ids, num_steps=T, step_weights=sw)
    base = call(backend, r, ids)
    assert out.shape == (B, T)
    assert_close(out, base.double()[:, None] * sw.double()[None, :], "step weights")
    assert torch.equal(call(backend, r, ids, num_steps=T), base[:, None].expand(B, T))
    # reward heads broadcast too
    rk = make_rewards((B, 2), ids)
    out = call(backend, rk, ids, reward_weights=[1.0, 0.5], num_steps=3)
    assert_close(out, group_advantages_reference(rk, ids, reward_weights=torch.tensor([1.0, 0.5]), num_steps=3),
                 "heads broadcast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtypes(backend):
    B = 24
    ids = make_ids(B, "grpo")
    r = make_rewards((B,), ids)
    expect = group_advantages_reference(r.double(), ids)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        rr = r.to(dtype)
        assert_close(call(backend, rr, ids), group_advantages_reference(rr, ids), f"{dtype}")
    for idt in (torch.int32, torch.int16, torch.uint8):
        assert_close(call(backend, r, (ids % 200).to(idt)), group_advantages_reference(r, ids % 200), f"ids {idt}")
    assert_close(call(backend, r.double(), ids), expect, "float64")


# ----------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_deterministic_and_permutation_equivariant(backend):
    B = 90
    ids = make_ids(B, "random")
    r = make_rewards((B, 3), ids)
    kw = dict(reward_weights=[0.3, 1.0, -0.2], combine="normalize_each")
    first = call(backend, r, ids, **kw)
    assert torch.equal(first, call(backend, r, ids, **kw)), "run-to-run"
    perm = torch.randperm(B)
    permuted = call(backend, r[perm], ids[perm], **kw)
    # another arrival order sums each group in another order: equal up to float64 rounding
    assert_close(permuted, first[perm], "permuted", rtol=1e-6, atol=1e-7)


def test_cpp_is_bitwise_the_reference_on_cpu():
    if not available("cpp"):
        pytest.skip("no cpp backend")
    B = 300
    ids = make_ids(B, "random")
    r = make_rewards((B,), ids)
    for std in ("group", "global", "none"):
        assert torch.equal(diffrl.group_advantages(r, ids, std=std, backend="cpp"),
                           group_advantages_reference(r, ids, std=std)), std


def test_one_huge_group_and_all_singletons_large_batch_cpp():
    if not available("cpp"):
        pytest.skip("no cpp backend")
    B = 16384
    r = torch.randn(B)
    one = diffrl.group_advantages(r, torch.full((B,), 3), backend="cpp")
    assert_close(one, (r.double() - r.double().mean()) / (r.double().std(unbiased=False) + 1e-4), "one group")
    assert torch.equal(diffrl.group_advantages(r, torch.randperm(B), backend="cpp"), torch.zeros(B))


# ----------------------------------------------------------------------------------------------
# win rate


def numpy_win_rate(scores, ids):
    s = np.asarray(scores, dtype=np.float64)
    out = np.empty(len(s))
    for i in range(len(s)):
        others = [j for j in range(len(s)) if ids[j] == ids[i] and j != i]
        if not others:
            out[i] = 0.5
            continue
        out[i] = sum(1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for j in others) / len(others)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_win_rate(backend):
    dev = device_of(backend)
    for B, layout in [(1, "random"), (2, "one"), (37, "grpo"), (64, "random"), (19, "singletons"), (50, "one")]:
        ids = make_ids(B, layout)
        s = torch.randint(0, 5, (B,)).float() * 0.25 + torch.randn(B) * (torch.rand(B) < 0.3)  # many ties
        out = diffrl.win_rate(s.to(dev), ids.to(dev), backend=name_of(backend)).cpu()
        assert out.dtype == torch.float32 and out.shape == (B,)
        # exact counts and one rounding: bitwise the reference in every backend
        assert torch.equal(out, win_rate_reference(s, ids)), f"B={B} {layout}"
        assert_close(out, numpy_win_rate(s.numpy(), ids.numpy()), f"B={B} {layout} numpy", rtol=0, atol=1e-7)
    # a sample alone gets 0.5; a group of equal scores 0.5 each; the best of 4 beats 3 of 3
    out = diffrl.win_rate(torch.tensor([1.0, 2.0, 2.0, 5.0, 0.0, 9.0, 7.0]).to(dev),
                          torch.tensor([0, 1, 1, 2, 2, 2, 2]).to(dev), backend=name_of(backend)).cpu()
    assert torch.equal(out, torch.tensor([0.5, 0.5, 0.5, 1 / 3, 0.0, 1.0, 2 / 3]))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_win_rate_dtypes(backend):
    dev = device_of(backend)
    ids = make_ids(40, "grpo")
    s = torch.randn(40)
    for dtype in (torch.float16, torch.float64):
        got = diffrl.win_rate(s.to(dtype).to(dev), ids.to(dev), backend=name_of(backend)).cpu()
        assert torch.equal(got, win_rate_reference(s.to(dtype), ids))


# ----------------------------------------------------------------------------------------------
# bad input, compile, library registration


def _bad_calls():
    r = torch.randn(6)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    yield "group ids for a batch", ValueError, (r, ids[:5]), {}
    yield "integer tensor", TypeError, (r, ids.float()), {}
    yield "integer tensor", TypeError, (r, ids.bool()), {}
    yield ">= 0", ValueError, (r, ids - 1), {}
    yield "finite", ValueError, (torch.tensor([1.0, float("nan"), 0, 0, 0, 0]), ids), {}
    yield "finite", ValueError, (torch.tensor([1.0, float("inf"), 0, 0, 0, 0]), ids), {}
    yield "floating-point", TypeError, (ids, ids), {}
    yield "torch.Tensor", TypeError, (r.tolist(), ids), {}
    yield "empty", ValueError, (torch.randn(0), torch.zeros(0, dtype=torch.long)), {}
    yield r"\[B\], \[B, K\]", ValueError, (torch.randn(6, 2, 2), ids), {}
    yield "need reward_weights", ValueError, (torch.randn(6, 3), ids), {}
    yield r"shape \[3\]", ValueError, (torch.randn(6, 3), ids), dict(reward_weights=[1.0, 2.0])
    yield r"shape \[3\]", ValueError, (torch.randn(6, 3), ids), dict(reward_weights=torch.ones(3, 1))
    yield "reward_weights need", ValueError, (r, ids), dict(reward_weights=[1.0])
    yield "finite", ValueError, (torch.randn(6, 2), ids), dict(reward_weights=[1.0, float("nan")])
    yield "finite", ValueError, (torch.randn(6, 2), ids), dict(reward_weights=torch.tensor([1.0, float("inf")]))
    yield "num_steps == T", ValueError, (torch.randn(6, 3), ids), dict(num_steps=4)
    yield "step_weights need num_steps", ValueError, (r, ids), dict(step_weights=[1.0, 2.0])
    yield r"shape \[4\]", ValueError, (r, ids), dict(num_steps=4, step_weights=[1.0, 2.0])
    yield "num_steps", ValueError, (r, ids), dict(num_steps=0)
    yield "std must be", ValueError, (r, ids), dict(std="batch")
    yield "combine must be", ValueError, (r, ids), dict(combine="mean")
    yield "eps", ValueError, (r, ids), dict(eps=-1e-4)
    yield "clip", ValueError, (r, ids), dict(clip=0.0)
    yield "at most 1024", ValueError, (torch.randn(6, 1025), ids), dict(reward_weights=torch.ones(1025),
                                                                         combine="normalize_each")
    yield "unknown backend", ValueError, (r, ids), dict(backend="metal")
    yield "does not implement", ValueError, (r, ids), dict(backend="flash_attn")


@pytest.mark.parametrize("match,exc,args,kwargs", list(_bad_calls()),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_clear_error(match, exc, args, kwargs):
    with pytest.raises(exc, match=match):
        diffrl.group_advantages(*args, **kwargs)


def test_win_rate_bad_input():
    s, ids = torch.randn(4), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="finite"):
        diffrl.win_rate(torch.tensor([0.0, float("nan"), 1.0, 2.0]), ids)
    with pytest.raises(ValueError, match=">= 0"):
        diffrl.win_rate(s, ids - 2)
    with pytest.raises(ValueError, match="group ids for a batch"):
        diffrl.win_rate(s, ids[:3])
    with pytest.raises(ValueError, match=r"scores must be \[B\]"):
        diffrl.win_rate(s[:, None], ids)
    with pytest.raises(TypeError, match="integer"):
        diffrl.win_rate(s, ids.double())


def test_validate_false_skips_the_value_checks_only():
    r, ids = torch.randn(4), torch.tensor([0, 0, 1, 1])
    out = diffrl.group_advantages(r, ids, validate=False)
    assert torch.equal(out, diffrl.group_advantages(r, ids))
    with pytest.raises(ValueError, match="group ids for a batch"):
        diffrl.group_advantages(r, ids[:3], validate=False)


def test_compiles_with_fullgraph_and_no_host_sync():
    """validate=False is the hot-loop path: sort + one kernel, no .item() (fullgraph would fail on it)."""
    r = torch.randn(24, 2)
    ids = make_ids(24, "grpo")

    def fn(r, ids):
        a = diffrl.group_advantages(r, ids, reward_weights=torch.tensor([1.0, 0.5]), num_steps=3,
                                    validate=False, backend="cpp" if available("cpp") else "torch")
        w = diffrl.win_rate(r[:, 0], ids, validate=False, backend="cpp" if available("cpp") else "torch")
        return a * 2.0, w

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(r, ids), fn(r, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_torch_library_opcheck():
    if not available("cpp"):
        pytest.skip("no cpp backend")
    r = torch.randn(10, 2)
    ids = torch.tensor([3, 1, 3, 1, 2, 2, 2, 0, 3, 1])
    order = torch.argsort(ids, stable=True)
    sid = ids[order]
    w = torch.tensor([1.0, -0.5], dtype=torch.float64)
    sw = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.diffrl.group_advantages.default,
                          (r, order, sid, w, None, sw, 1, 1, 1e-4, 1.5, 3, False, "cpp"), test_utils=utils)
    torch.library.opcheck(torch.ops.diffrl.group_advantages.default,
                          (r[:, 0].contiguous(), order, sid, None, None, None, 0, 1, 1e-4, -1.0, 1, True, "cpp"),
                          test_utils=utils)
    s = r[:, 0].contiguous()
    perm = torch.argsort(s, stable=True)
    o2 = perm[torch.argsort(ids[perm], stable=True)]
    torch.library.opcheck(torch.ops.diffrl.win_rate.default, (s, o2, ids[o2], "cpp"), test_utils=utils)


# ----------------------------------------------------------------------------------------------
# GPU: large batches on the real kernels


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton-gpu"])
def test_gpu_large_batches(backend):
    if not available(name_of(backend), "cuda"):
        pytest.skip(f"{backend} not available")
    for B, layout in [(16384, "grpo"), (16384, "one"), (16384, "singletons"), (5000, "random")]:
        ids = make_ids(B, layout)
        r = make_rewards((B,), ids)
        for std in ("group", "global"):
            out = call(backend, r, ids, std=std)
            assert_close(out, group_advantages_reference(r, ids, std=std), f"{B} {layout} {std}")
            assert torch.equal(out, call(backend, r, ids, std=std))
        rd = make_rewards((B, 10), ids)
        assert_close(call(backend, rd, ids, num_steps=10), group_advantages_reference(rd, ids, num_steps=10), "dense")
        s = torch.randint(0, 50, (B,)).float()
        assert torch.equal(diffrl.win_rate(s.cuda(), ids.cuda(), backend=name_of(backend)).cpu(),
                           win_rate_reference(s, ids))

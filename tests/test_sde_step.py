"""sde_step: every backend against the reference (the spec), gradients, exactness, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

import diffrl
from diffrl.ops.reference import sde_step_reference
from diffrl.schedules import StepCoeffs

from conftest import HAS_GPU, available

CPU_BACKENDS = [b for b in ("cpp", "triton") if available(b)]
FUSED = CPU_BACKENDS + (["cuda", "triton-gpu"] if HAS_GPU else [])
# rtol, atol per input dtype (arithmetic is float32 in every backend)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}
# B = 1, prime D, non-power-of-two, and D over one 4096-element chunk
SHAPES = [(1, 3, 5, 7), (3, 4, 8, 8), (2, 8193), (5, 2, 3, 11)]


def device_of(backend):
    return "cuda" if backend in ("cuda", "triton-gpu") else "cpu"


def name_of(backend):
    return "triton" if backend == "triton-gpu" else backend


def dtypes_for(backend):
    # the Triton interpreter stores bfloat16 as raw bits and rounds casts differently: fp32/fp16 only there
    if backend == "triton":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, dtype, device, *, guidance, kl, per_sample, mode):
    B = shape[0]
    g = {}
    g["sample"] = torch.randn(shape, dtype=torch.float32).to(dtype)
    g["model_output"] = torch.randn(shape, dtype=torch.float32).to(dtype)
    if guidance:
        g["uncond_output"] = torch.randn(shape, dtype=torch.float32).to(dtype)
    if kl:
        g["ref_output"] = (g["model_output"].float() + 0.3 * torch.randn(shape)).to(dtype)
        if guidance:
            g["ref_uncond_output"] = (g["uncond_output"].float() + 0.3 * torch.randn(shape)).to(dtype)
    if per_sample:
        a = 0.8 + 0.4 * torch.rand(B)
        c = -0.05 - 0.5 * torch.rand(B)
        s = 0.2 + 0.5 * torch.rand(B)
    else:
        a, c, s = (0.8 + 0.4 * torch.rand(()), -0.05 - 0.5 * torch.rand(()), 0.2 + 0.5 * torch.rand(()))
    coeffs = StepCoeffs(a, c, s)
    if mode == "sample":
        g["noise"] = torch.randn(shape, dtype=torch.float32).to(dtype)
    else:
        g["prev_sample"] = torch.randn(shape, dtype=torch.float32).to(dtype)
    g = {k: v.to(device) for k, v in g.items()}
    return g, coeffs.to(device), (4.5 if guidance else None)


def call(backend, g, coeffs, w, reduce="mean", **kw):
    return diffrl.sde_step(
        g["sample"], g["model_output"], coeffs, uncond_output=g.get("uncond_output"), guidance_scale=w,
        noise=g.get("noise"), prev_sample=g.get("prev_sample"), ref_output=g.get("ref_output"),
        ref_uncond_output=g.get("ref_uncond_output"), reduce=reduce, backend=backend, **kw)


def reference(g, coeffs, w, reduce, dtype=torch.float64):
    B = g["sample"].shape[0]
    a, c, s = (t.cpu() for t in coeffs.expand(B))
    h = {k: v.cpu().to(dtype) for k, v in g.items()}
    return sde_step_reference(
        h["sample"], h["model_output"], a, c, s, uncond_output=h.get("uncond_output"), guidance_scale=w,
        noise=h.get("noise"), prev_sample=h.get("prev_sample"), ref_output=h.get("ref_output"),
        ref_uncond_output=h.get("ref_uncond_output"), reduce=reduce)


def assert_close(actual, expected, rtol, atol, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert not torch.isnan(actual).any(), f"{what}: NaN in output ({int(torch.isnan(actual).sum())} elements)"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max abs err "
                           f"{err.max().item():.3g} (at {torch.nonzero(bad)[0].tolist()}), rtol={rtol} atol={atol}")


CASES = list(itertools.product(SHAPES, [False, True], ["sample", "score"], [False, True], ["mean", "sum"]))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape,guidance,mode,kl,reduce", CASES[::3] + [CASES[-1]])
def test_forward_matches_reference(backend, shape, guidance, mode, kl, reduce):
    dev = device_of(backend)
    for dtype in dtypes_for(backend):
        rtol, atol = TOL[dtype]
        g, coeffs, w = make_inputs(shape, dtype, dev, guidance=guidance, kl=kl, per_sample=len(shape) % 2 == 0,
                                   mode=mode)
        out = call(name_of(backend), g, coeffs, w, reduce)
        D = g["sample"][0].numel()
        scale = D if reduce == "sum" else 1
        # sampling mode: x' is rounded to the input dtype, so the spec run in the same dtype (float32
        # arithmetic) is the one to match; scoring mode: the exact float64 result
        exact = reference(g, coeffs, w, reduce)
        same = reference(g, coeffs, w, reduce, dtype=dtype) if mode == "sample" else exact
        assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (shape[0],)
        assert out.prev_sample.dtype == dtype and out.mean.dtype == dtype
        assert_close(out.log_prob, same[2], rtol, atol * scale, f"log_prob {dtype}")
        assert_close(out.mean, exact[1], rtol, atol, f"mean {dtype}")
        if mode == "sample":
            assert_close(out.prev_sample, same[0], rtol, atol, f"prev_sample {dtype}")
        else:
            assert out.prev_sample is g["prev_sample"]
        if kl:
            assert_close(out.kl, exact[3], max(rtol, 1e-4), atol * scale, f"kl {dtype}")
        else:
            assert out.kl is None


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode", ["sample", "score"])
@pytest.mark.parametrize("guidance,kl", [(False, False), (True, True), (False, True)])
def test_backward_matches_reference_autograd(backend, mode, guidance, kl):
    dev = device_of(backend)
    for dtype, shape, reduce in [(torch.float32, (3, 4, 7, 5), "mean"), (torch.float32, (2, 8193), "sum"),
                                 (torch.float16, (2, 3, 11), "mean")]:
        rtol, atol = TOL[dtype]
        g, coeffs, w = make_inputs(shape, dtype, dev, guidance=guidance, kl=kl, per_sample=True, mode=mode)
        diff = [k for k in g if k != "noise"]
        gl = torch.randn(shape[0])
        gk = torch.randn(shape[0])
        gm = torch.randn(shape)
        gp = torch.randn(shape)

        def run(fn_inputs, be):
            out = call(be, fn_inputs, coeffs if be != "torch" else coeffs.to("cpu"), w, reduce)
            loss = (out.log_prob.float().cpu() * gl).sum() + (out.mean.float().cpu() * gm).sum()
            if kl:
                loss = loss + (out.kl.float().cpu() * gk).sum()
            if mode == "sample":
                loss = loss + (out.prev_sample.float().cpu() * gp).sum()
            return loss

        mine = {k: v.clone().requires_grad_(k in diff) for k, v in g.items()}
        run(mine, name_of(backend)).backward()
        # the spec: autograd through the reference, in float64 from the same (rounded) inputs
        ref = {k: v.detach().cpu().double().requires_grad_(k in diff) for k, v in g.items()}
        a, c, s = coeffs.to("cpu").expand(shape[0])
        out = sde_step_reference(ref["sample"], ref["model_output"], a, c, s, uncond_output=ref.get("uncond_output"),
                                 guidance_scale=w, noise=ref.get("noise"), prev_sample=ref.get("prev_sample"),
                                 ref_output=ref.get("ref_output"), ref_uncond_output=ref.get("ref_uncond_output"),
                                 reduce=reduce)
        loss = (out[2] * gl).sum() + (out[1] * gm).sum() + ((out[3] * gk).sum() if kl else 0)
        if mode == "sample":
            loss = loss + (out[0] * gp).sum()
        loss.backward()
        for k in diff:
            exp = ref[k].grad
            scale = float(exp.abs().max()) + 1e-12
            assert mine[k].grad is not None, f"no gradient for {k}"
            assert mine[k].grad.dtype == dtype
            assert_close(mine[k].grad, exp, rtol, atol * scale, f"grad {k} {dtype} {shape}")


def test_reference_gradcheck_float64():
    shape = (2, 3, 5)
    g, coeffs, w = make_inputs(shape, torch.float64, "cpu", guidance=True, kl=True, per_sample=True, mode="score")
    names = ["sample", "model_output", "uncond_output", "prev_sample", "ref_output", "ref_uncond_output"]
    a, c, s = coeffs.expand(2)

    def f(x, v, vu, xp, vr, vru):
        _, mean, lp, kl = sde_step_reference(x, v, a, c, s, uncond_output=vu, guidance_scale=w, prev_sample=xp,
                                             ref_output=vr, ref_uncond_output=vru)
        return lp, kl, mean

    inputs = tuple(g[n].clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_scoring_a_sampled_step_is_bitwise_identical(backend):
    dev = device_of(backend)
    dtypes = [torch.float32] if backend == "torch" else dtypes_for(backend)
    for dtype, shape in itertools.product(dtypes, [(3, 4, 9, 9), (2, 8195)]):
        g, coeffs, w = make_inputs(shape, dtype, dev, guidance=True, kl=True, per_sample=True, mode="sample")
        first = call(name_of(backend), g, coeffs, w)
        again = dict(g)
        again.pop("noise")
        again["prev_sample"] = first.prev_sample.clone()
        second = call(name_of(backend), again, coeffs, w)
        assert torch.equal(first.log_prob, second.log_prob), f"{dtype}: PPO ratio would not be exactly 1"
        assert torch.equal(first.kl, second.kl)
        assert torch.equal(first.mean, second.mean)


@pytest.mark.parametrize("backend", FUSED)
def test_result_of_a_sample_does_not_depend_on_the_batch_and_is_deterministic(backend):
    dev = device_of(backend)
    shape = (6, 5, 1000)
    g, coeffs, w = make_inputs(shape, torch.float32, dev, guidance=True, kl=True, per_sample=True, mode="score")
    full = call(name_of(backend), g, coeffs, w)
    again = call(name_of(backend), g, coeffs, w)
    assert torch.equal(full.log_prob, again.log_prob) and torch.equal(full.kl, again.kl)
    for i in (0, 4):
        one = {k: v[i:i + 1] for k, v in g.items()}
        c1 = StepCoeffs(coeffs.a[i:i + 1], coeffs.c[i:i + 1], coeffs.s[i:i + 1])
        single = call(name_of(backend), one, c1, w)
        assert torch.equal(single.log_prob[0], full.log_prob[i])
        assert torch.equal(single.kl[0], full.kl[i])


@pytest.mark.parametrize("backend", [b for b in FUSED if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounding_is_bitwise_like_torch(backend, dtype):
    """The kernels' float32 -> half/bfloat16 conversions round like torch's (nearest even),
    subnormals, overflow to inf and all."""
    dev = device_of(backend)
    n = 20000
    mag = torch.exp(torch.empty(n).uniform_(-25, 13))  # from half subnormals to past the half maximum
    x = (mag * torch.randn(n).sign()).to(dtype).reshape(4, -1)
    v = (torch.randn(n) * 3).to(dtype).reshape(4, -1)
    coeffs = StepCoeffs(1.0 + 0.37 * torch.rand(4), -0.3 * torch.rand(4), 0.5)
    out = diffrl.sde_step(x.to(dev), v.to(dev), coeffs.to(dev), prev_sample=x.to(dev), backend=name_of(backend))
    a, c, _ = coeffs.expand(4)
    expect = (a[:, None] * x.float() + c[:, None] * v.float()).to(dtype)
    assert torch.equal(out.mean.cpu().view(torch.int16), expect.view(torch.int16))


def _cpu_isas():
    from diffrl import _native

    C, _ = _native.load()
    if C is None or not hasattr(C, "set_cpu_isa"):
        return None, []
    best = C.cpu_isa()
    return C, (["baseline", "avx2"] if best == "avx2" else ["baseline"])


@pytest.mark.skipif(not available("cpp"), reason="needs the cpp backend")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_instruction_sets_give_the_same_bits(dtype):
    """The cpp kernels are compiled twice (baseline and AVX2) from one source and picked at run
    time: every output and gradient must be bitwise equal whichever runs."""
    C, isas = _cpu_isas()
    if len(isas) < 2:
        pytest.skip("this CPU or build has only the baseline kernels")
    before = C.cpu_isa()
    results = []
    try:
        for isa in isas:
            assert C.set_cpu_isa(isa)
            torch.manual_seed(1234)  # the same inputs for each instruction set
            outs = []
            for mode, guidance, kl, shape in [("sample", True, True, (3, 4, 33, 35)), ("score", True, True, (2, 8193)),
                                              ("score", False, False, (1, 3, 5, 7))]:
                g, coeffs, w = make_inputs(shape, dtype, "cpu", guidance=guidance, kl=kl, per_sample=True, mode=mode)
                diff = [k for k in g if k != "noise"]
                leaves = {k: v.clone().requires_grad_(k in diff) for k, v in g.items()}
                out = call("cpp", leaves, coeffs, w)
                loss = out.log_prob.sum() + out.mean.float().sum() + (out.kl.sum() if kl else 0)
                loss.backward()
                outs += [out.prev_sample, out.mean, out.log_prob] + ([out.kl] if kl else [])
                outs += [leaves[k].grad for k in diff]
            results.append(outs)
    finally:
        C.set_cpu_isa(before)
    for x, y in zip(*results):
        assert torch.equal(x.detach().contiguous().view(torch.uint8), y.detach().contiguous().view(torch.uint8))


@pytest.mark.skipif(not available("cpp"), reason="needs the cpp backend")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1.37e-5, 3.3e3])  # identity, into the subnormals, into overflow
def test_every_16_bit_pattern_converts_like_torch(dtype, scale):
    """All 65536 values of the dtype through the CPU kernels' conversions: mean = scale * x exactly
    in float32 (c = 0 and v = -0 add nothing, not even the sign of zero), rounded to the dtype."""
    C, isas = _cpu_isas()
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, -1)
    v = torch.full_like(x, -0.0)
    before = C.cpu_isa() if C is not None else None
    try:
        for isa in isas or [None]:
            if isa is not None:
                C.set_cpu_isa(isa)
            out = diffrl.sde_step(x, v, StepCoeffs(scale, 0.0, 1.0), prev_sample=x, backend="cpp")
            expected = (torch.tensor(scale, dtype=torch.float32) * x.float()).to(dtype)
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(out.mean), nan)
            assert torch.equal(out.mean[~nan].view(torch.int16), expected[~nan].view(torch.int16)), isa
    finally:
        if before is not None:
            C.set_cpu_isa(before)


def test_noise_from_generator_is_reproducible():
    g, coeffs, _ = make_inputs((2, 3, 4), torch.float32, "cpu", guidance=False, kl=False, per_sample=False,
                               mode="score")
    outs = [diffrl.sde_step(g["sample"], g["model_output"], coeffs, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(outs[0].prev_sample, outs[1].prev_sample)
    eps = torch.randn(g["sample"].shape, generator=torch.Generator().manual_seed(7))
    explicit = diffrl.sde_step(g["sample"], g["model_output"], coeffs, noise=eps)
    assert torch.equal(outs[0].prev_sample, explicit.prev_sample)


def test_float64_runs_on_the_reference_and_auto_picks_it():
    g, coeffs, _ = make_inputs((2, 3, 4), torch.float64, "cpu", guidance=False, kl=False, per_sample=False,
                               mode="score")
    out = diffrl.sde_step(g["sample"], g["model_output"], coeffs, prev_sample=g["prev_sample"], backend="torch")
    assert out.log_prob.dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        diffrl.sde_step(g["sample"], g["model_output"], coeffs, prev_sample=g["prev_sample"], backend="cpp")


def test_return_mean_false_skips_it():
    g, coeffs, _ = make_inputs((2, 3, 4), torch.float32, "cpu", guidance=False, kl=False, per_sample=False,
                               mode="sample")
    for be in ["torch"] + CPU_BACKENDS:
        out = call(be, g, coeffs, None, return_mean=False)
        assert out.mean is None
        assert torch.isfinite(out.log_prob).all()


def test_coefficients_as_a_tuple_and_noncontiguous_inputs():
    x = torch.randn(3, 8, 6).transpose(1, 2)  # non-contiguous
    v = torch.randn(3, 6, 8)
    xp = torch.randn(3, 6, 8)
    out = diffrl.sde_step(x, v, (1.0, -0.2, 0.4), prev_sample=xp)
    ref = sde_step_reference(x, v, torch.ones(3), torch.full((3,), -0.2), torch.full((3,), 0.4), prev_sample=xp)
    assert_close(out.log_prob, ref[2], 1e-5, 1e-5, "log_prob")


def _bad_calls():
    x = torch.randn(2, 3, 4)
    ok = StepCoeffs(1.0, -0.1, 0.3)
    yield "shape", ValueError, dict(sample=x, model_output=torch.randn(2, 3, 5), coeffs=ok, noise=torch.randn_like(x))
    yield "dtype", TypeError, dict(sample=x, model_output=x.half(), coeffs=ok, noise=torch.randn_like(x))
    yield "not both", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, prev_sample=x)
    yield "s must be > 0", ValueError, dict(sample=x, model_output=x, coeffs=StepCoeffs(1.0, -0.1, 0.0), noise=x)
    yield "non-finite", ValueError, dict(sample=x, model_output=x, coeffs=(1.0, float("nan"), 0.3), noise=x)
    yield ">= 0", ValueError, dict(sample=x, model_output=x, coeffs=(1.0, 0.1, -0.3), noise=x)
    yield "reduce", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, reduce="max")
    yield "unknown backend", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, backend="metal")
    yield "does not implement", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, backend="flash_attn")
    if available("cuda", "cuda"):
        yield "runs on CUDA tensors", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, backend="cuda")
    else:
        yield "not available here", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, backend="cuda")
    yield "uncond_output and guidance_scale", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x,
                                                               uncond_output=x)
    yield "ref_uncond_output", ValueError, dict(sample=x, model_output=x, coeffs=ok, noise=x, uncond_output=x,
                                                guidance_scale=3.0, ref_output=x)
    yield "per-sample values", ValueError, dict(sample=x, model_output=x, coeffs=StepCoeffs(torch.ones(3), 0.1, 0.3),
                                                noise=x)
    yield "coeffs must be", TypeError, dict(sample=x, model_output=x, coeffs=0.3, noise=x)
    yield "torch.Tensor", TypeError, dict(sample=x, model_output=x.tolist(), coeffs=ok, noise=x)  # arrays: interop
    yield "at least 2 dims", ValueError, dict(sample=torch.randn(5), model_output=torch.randn(5), coeffs=ok,
                                              noise=torch.randn(5))
    yield "floating-point", TypeError, dict(sample=torch.ones(2, 3, dtype=torch.long),
                                            model_output=torch.ones(2, 3, dtype=torch.long), coeffs=ok,
                                            noise=torch.ones(2, 3, dtype=torch.long))
    yield "empty", ValueError, dict(sample=torch.randn(2, 0), model_output=torch.randn(2, 0), coeffs=ok,
                                    noise=torch.randn(2, 0))


@pytest.mark.parametrize("match,exc,kwargs", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_clear_error(match, exc, kwargs):
    kwargs = dict(kwargs)
    args = (kwargs.pop("sample"), kwargs.pop("model_output"), kwargs.pop("coeffs"))
    with pytest.raises(exc, match=match):
        diffrl.sde_step(*args, **kwargs)


def test_compiles_with_fullgraph_forward_and_backward():
    x, v, vu, xp = (torch.randn(2, 4, 6, 6) for _ in range(4))
    coeffs = StepCoeffs(torch.tensor([1.01, 0.99]), torch.tensor([-0.1, -0.2]), torch.tensor([0.3, 0.25]))

    def step(x, v, vu, xp):
        out = diffrl.sde_step(x, v, coeffs, uncond_output=vu, guidance_scale=3.0, prev_sample=xp, backend="cpp")
        return out.log_prob.sum() * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, v, vu, xp)]
    eager_leaves = [t.clone().requires_grad_() for t in (x, v, vu, xp)]
    got = compiled(*leaves)
    want = step(*eager_leaves)
    assert torch.equal(got, want)
    got.backward()
    want.backward()
    for a_, b_ in zip(leaves, eager_leaves):
        assert torch.equal(a_.grad, b_.grad)


def test_torch_library_opcheck():
    x, v, vu, xp = (torch.randn(2, 3, 5) for _ in range(4))
    a, c, s = torch.tensor([1.0, 0.9]), torch.tensor([-0.1, -0.3]), torch.tensor([0.3, 0.2])
    torch.library.opcheck(torch.ops.diffrl.sde_step_fwd.default,
                          (x, v, vu, 2.5, None, xp, None, None, a, c, s, False, True, "cpp"),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

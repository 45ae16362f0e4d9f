"""diffusion_dpo_loss: every backend against the Diffusion-DPO formula written out in float64 here
(values, stats and gradients by torch.autograd), odd sizes, dtypes, determinism, batch independence,
extreme margins, bad input, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

import diffrl
from diffrl.ops.reference import diffusion_dpo_loss_reference

from conftest import HAS_GPU, available

GPU_BACKENDS = ("cuda", "cupy", "triton-gpu")
ALL = (["torch"] + [b for b in ("cpp", "triton") if available(b)]
       + (["cuda", "triton-gpu"] + (["cupy"] if available("cupy", "cuda") else []) if HAS_GPU else []))
BACKENDS = [pytest.param(b, marks=pytest.mark.gpu) if b in GPU_BACKENDS else b for b in ALL]
STATS = ("accuracy", "margin", "policy_err_w", "policy_err_l", "ref_err_w", "ref_err_l")
# B = 1, prime / odd D, D over one 4096-element chunk (4551 = 3 * 37 * 41), a 2-D [B, D] input
SHAPES = [(1, 7), (3, 4, 5, 5), (2, 3, 37, 41), (5, 13)]
# relative tolerance of the gradients, which are stored in the input dtype (one rounding)
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def device_of(backend):
    return "cuda" if backend in GPU_BACKENDS else "cpu"


def name_of(backend):
    return "triton" if backend == "triton-gpu" else backend


def dtypes_for(backend):
    if backend == "torch":
        return [torch.float64, torch.float32, torch.bfloat16]
    if backend == "triton":  # the interpreter stores bfloat16 as raw bits: fp32 / fp16 there
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def make(shape, dtype=torch.float32, spread=0.05):
    """Policy predictions near the reference's (as during training), targets unrelated: the six
    inputs, rounded to ``dtype``."""
    tw, tl = torch.randn(shape), torch.randn(shape)
    rw, rl = torch.randn(shape), torch.randn(shape)
    pw, pl = rw + spread * torch.randn(shape), rl + spread * torch.randn(shape)
    return [t.to(dtype) for t in (pw, pl, rw, rl, tw, tl)]


def beta_for(inputs, target_z=2.0):
    """A beta that puts the margins z around +-target_z (the regime where the loss has a gradient)."""
    pw, pl, rw, rl, tw, tl = (t.double() for t in inputs)
    e = lambda p, t: ((p - t) ** 2).flatten(1).mean(1)  # noqa: E731
    gap = (e(pw, tw) - e(rw, tw)) - (e(pl, tl) - e(rl, tl))
    return float(2 * target_z / gap.abs().mean())


def formula(pw, pl, rw, rl, tw, tl, beta, weights=None):
    """Diffusion-DPO (Wallace et al. 2023, the official code's form) in float64, written out."""
    def err(p, t):
        return ((p - t) ** 2).flatten(1).mean(1)

    z = -beta / 2 * ((err(pw, tw) - err(rw, tw)) - (err(pl, tl) - err(rl, tl)))
    per_pair = -torch.nn.functional.logsigmoid(z)
    if weights is not None:
        per_pair = per_pair * weights
    stats = {"accuracy": (z > 0).double().mean(), "margin": z.mean(), "policy_err_w": err(pw, tw).mean(),
             "policy_err_l": err(pl, tl).mean(), "ref_err_w": err(rw, tw).mean(), "ref_err_l": err(rl, tl).mean()}
    return per_pair.mean(), stats, z


def close(a, b, what, rtol, atol):
    a, b = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (a, b))
    assert abs(a - b) <= atol + rtol * abs(b), f"{what}: {a!r} vs {b!r} (diff {abs(a - b):.3g})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_the_float64_formula_values_stats_and_gradients(backend, shape, weighted):
    dev = device_of(backend)
    for dtype in dtypes_for(backend):
        inputs = make(shape, dtype)
        beta = beta_for(inputs)
        weights = (0.5 + torch.rand(shape[0])) if weighted else None
        mine = [t.clone().to(dev) for t in inputs]
        mine[0].requires_grad_()
        mine[1].requires_grad_()
        loss, stats = diffrl.diffusion_dpo_loss(*mine, beta=beta, backend=name_of(backend),
                                                weights=None if weights is None else weights.to(dev))
        g_up = 1.0 + torch.rand(())  # an upstream gradient other than 1
        (loss * g_up.to(dev)).backward()

        exact = [t.double() for t in inputs]
        exact[0].requires_grad_()
        exact[1].requires_grad_()
        want, want_stats, z = formula(*exact, beta, None if weights is None else weights.double())
        (want * g_up.double()).backward()

        assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert set(stats) == set(STATS) and all(v.shape == () and not v.requires_grad for v in stats.values())
        # the inputs are exact in float64, the kernels' float32 element terms and float64 sums lose
        # ~1e-7 relative of each term; beta (~1e3-1e5 here) scales that into z
        tol = 1e-12 if dtype == torch.float64 else 3e-6
        close(loss, want, f"loss {dtype}", rtol=tol, atol=tol)
        for k in STATS:
            near_zero = k == "accuracy" and bool((z.detach().abs() < 1e-4).any())
            if not near_zero:
                close(stats[k], want_stats[k], f"{k} {dtype}", rtol=tol, atol=tol)
        for i in (0, 1):
            g, r = mine[i].grad, exact[i].grad
            assert g.dtype == dtype and g.shape == r.shape
            err = (g.cpu().double() - r).abs().max()
            bound = GRAD_RTOL[dtype] * r.abs().max() + 1e-30
            assert err <= bound, f"grad {'wl'[i]} {dtype}: max err {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_and_targets_are_constants(backend):
    dev = device_of(backend)
    inputs = [t.to(dev).requires_grad_() for t in make((2, 9))]
    loss, _ = diffrl.diffusion_dpo_loss(*inputs, beta=beta_for(inputs), backend=name_of(backend))
    loss.backward()
    assert inputs[0].grad is not None and inputs[1].grad is not None
    assert all(t.grad is None for t in inputs[2:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_wanted_gradient_is_computed(backend):
    dev = device_of(backend)
    inputs = [t.to(dev) for t in make((3, 11))]
    inputs[1].requires_grad_()  # the preferred prediction is a constant here
    loss, _ = diffrl.diffusion_dpo_loss(*inputs, beta=beta_for(inputs), backend=name_of(backend))
    loss.backward()
    exact = [t.detach().double() for t in inputs]
    exact[1].requires_grad_()
    formula(*exact, beta_for(inputs))[0].backward()
    assert torch.allclose(inputs[1].grad.cpu().double(), exact[1].grad, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_deterministic_and_independent_of_the_batch(backend):
    dev = device_of(backend)
    inputs = [t.to(dev) for t in make((4, 5000))]
    beta = beta_for(inputs)
    runs = [diffrl.diffusion_dpo_loss(*inputs, beta=beta, backend=name_of(backend)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in STATS)
    # the batch loss is the mean of the pairs' losses, each computed alone
    alone = [diffrl.diffusion_dpo_loss(*[t[i:i + 1] for t in inputs], beta=beta, backend=name_of(backend))[0]
             for i in range(4)]
    close(runs[0][0], torch.stack(alone).double().mean(), "batch vs alone", rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_margins_stay_finite(backend):
    """|z| in the thousands: -log sigmoid must neither overflow (z << 0) nor lose the gradient's sign."""
    dev = device_of(backend)
    inputs = make((4, 6), spread=0.3)
    beta = beta_for(inputs, target_z=3000.0)
    _, _, z = formula(*[t.double() for t in inputs], beta)
    mine = [t.to(dev) for t in inputs]
    mine[0].requires_grad_()
    loss, stats = diffrl.diffusion_dpo_loss(*mine, beta=beta, backend=name_of(backend))
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(mine[0].grad).all()
    want = torch.nn.functional.softplus(-z).mean()  # float64: exact at any z
    close(loss, want, "loss", rtol=1e-5, atol=1e-6)
    assert 0 <= float(stats["accuracy"]) <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_policy_and_reference_give_log_2(backend):
    """At the start of training (policy = reference) every z is 0: loss log 2, accuracy 0, and the
    gradient pulls the preferred prediction towards its target: beta / (2 B D) * 2 (p_w - t_w) / 2."""
    dev = device_of(backend)
    pw, pl, _, _, tw, tl = (t.to(dev) for t in make((3, 8)))
    x = pw.clone().requires_grad_()
    loss, stats = diffrl.diffusion_dpo_loss(x, pl, pw, pl, tw, tl, beta=100.0, backend=name_of(backend))
    loss.backward()
    close(loss, math.log(2), "loss", rtol=1e-6, atol=0)
    assert float(stats["accuracy"]) == 0.0 and float(stats["margin"]) == 0.0
    want = 0.5 * 100.0 * (pw - tw).double().cpu() / (3 * 8)
    assert torch.allclose(x.grad.cpu().double(), want, rtol=1e-5, atol=1e-9)


def test_float64_runs_on_the_reference_and_explicit_kernels_refuse_it():
    inputs = make((2, 5), torch.float64)
    loss, _ = diffrl.diffusion_dpo_loss(*inputs, beta=10.0)
    assert loss.dtype == torch.float64
    if available("cpp"):
        with pytest.raises(TypeError, match="float64"):
            diffrl.diffusion_dpo_loss(*inputs, beta=10.0, backend="cpp")


def test_reference_gradcheck_float64():
    pw, pl, rw, rl, tw, tl = make((3, 4), torch.float64, spread=0.3)
    w = torch.rand(3, dtype=torch.float64)

    def f(a, b):
        return diffusion_dpo_loss_reference(a, b, rw, rl, tw, tl, beta=7.0, weights=w)[0]

    assert torch.autograd.gradcheck(f, (pw.requires_grad_(), pl.requires_grad_()))


def _bad_calls():
    pw, pl, rw, rl, tw, tl = make((4, 3, 5))
    ok = dict(beta=100.0)
    yield "same shape", ValueError, (pw, pl, rw[:, :2], rl, tw, tl), ok
    yield "rows", ValueError, (pw, pl[:3], rw, rl, tw, tl), ok  # B mismatch
    yield "rows", ValueError, (pw, pl, rw, rl, tw, tl[0, 0, 0]), ok  # a 0-d target
    yield "beta", ValueError, (pw, pl, rw, rl, tw, tl), dict(beta=float("nan"))
    yield "beta", ValueError, (pw, pl, rw, rl, tw, tl), dict(beta=float("inf"))
    yield "beta", ValueError, (pw, pl, rw, rl, tw, tl), dict(beta=0.0)
    yield "beta", ValueError, (pw, pl, rw, rl, tw, tl), dict(beta=True)
    yield "weights must have shape", ValueError, (pw, pl, rw, rl, tw, tl), dict(beta=1.0, weights=torch.ones(3))
    yield "weights must be", TypeError, (pw, pl, rw, rl, tw, tl), dict(beta=1.0, weights=torch.ones(4).long())
    yield "cast the inputs", TypeError, (pw, pl, rw.half(), rl, tw, tl), ok
    yield "floating-point", TypeError, (pw, pl, rw, rl, tw.long(), tl), ok
    yield "B >= 1", ValueError, (pw[:0], pl[:0], rw[:0], rl[:0], tw[:0], tl[:0]), ok
    yield "unknown backend", ValueError, (pw, pl, rw, rl, tw, tl), dict(beta=1.0, backend="metal")


@pytest.mark.parametrize("match,exc,args,kwargs", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_clear_error(match, exc, args, kwargs):
    with pytest.raises(exc, match=match):
        diffrl.diffusion_dpo_loss(*args, **kwargs)


def test_compiles_with_fullgraph_forward_and_backward():
    be = "cpp" if available("cpp") else "torch"
    pw, pl, rw, rl, tw, tl = make((3, 2, 7))
    beta = beta_for([pw, pl, rw, rl, tw, tl])

    def step(a, b):
        loss, stats = diffrl.diffusion_dpo_loss(a, b, rw, rl, tw, tl, beta=beta, backend=be)
        return loss * 3.0, stats["accuracy"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = [pw.clone().requires_grad_(), pl.clone().requires_grad_()]
    y = [pw.clone().requires_grad_(), pl.clone().requires_grad_()]
    got, want = compiled(*x), step(*y)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got[0].backward()
    want[0].backward()
    assert torch.equal(x[0].grad, y[0].grad) and torch.equal(x[1].grad, y[1].grad)


def test_torch_library_opcheck():
    if not available("cpp"):
        pytest.skip("no cpp backend")
    pw, pl, rw, rl, tw, tl = make((3, 5))
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.diffrl.dpo_loss_fwd.default, (pw, pl, rw, rl, tw, tl, torch.rand(3), 50.0, "cpp"),
                          test_utils=utils)
    coef = torch.rand(3)
    torch.library.opcheck(torch.ops.diffrl.dpo_loss_bwd.default,
                          (torch.tensor([1.5]), coef, pw, pl, tw, tl, True, False, "cpp"), test_utils=utils)

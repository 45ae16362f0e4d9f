"""grpo_loss: every backend against the reference and a plain numpy computation, gradients in
log_prob and kl, stats, determinism, bad input, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffrl
from diffrl.ops.reference import grpo_loss_reference

from conftest import HAS_GPU, available

ALL = ["torch"] + [b for b in ("cpp", "triton") if available(b)] + (["cuda", "triton-gpu"] if HAS_GPU else [])
BACKENDS = [pytest.param(b, marks=pytest.mark.gpu) if b in ("cuda", "triton-gpu") else b for b in ALL]
STATS = ("policy_loss", "kl", "clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max")


def device_of(backend):
    return "cuda" if backend in ("cuda", "triton-gpu") else "cpu"


def name_of(backend):
    return "triton" if backend == "triton-gpu" else backend


def make(shape, adv_shape=None, spread=0.15):
    lp = torch.randn(shape) * 2 - 40.0  # per-step log-probs of a latent are large negative numbers
    old = lp + spread * torch.randn(shape)
    adv = torch.randn(adv_shape or shape)
    kl = torch.rand(shape) * 0.1
    return lp, old, adv, kl


def numpy_loss(lp, old, adv, kl, lo_eps, hi_eps, kl_coef):
    lp, old, adv = (np.asarray(t, dtype=np.float64) for t in (lp, old, adv))
    if adv.ndim < lp.ndim:
        adv = adv[:, None]
    ratio = np.exp(lp - old)
    term = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lo_eps, 1 + hi_eps))
    klm = float(np.mean(kl)) if kl is not None else 0.0
    return float(term.mean()) + kl_coef * klm, {
        "policy_loss": term.mean(), "kl": klm,
        "clip_fraction": np.mean((ratio < 1 - lo_eps) | (ratio > 1 + hi_eps)),
        "approx_kl": 0.5 * np.mean((lp - old) ** 2), "ratio_mean": ratio.mean(), "ratio_min": ratio.min(),
        "ratio_max": ratio.max()}


def close(a, b, what, rtol=2e-5, atol=1e-6):
    a, b = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (a, b))
    assert abs(a - b) <= atol + rtol * abs(b), f"{what}: {a} vs {b}"


CASES = [((1,), None, (0.2, 0.2), True), ((37,), None, (0.1, 0.1), False), ((6, 5), (6,), (0.05, 0.08), True),
         ((3, 4099), None, (0.1, 0.1), True), ((2, 3), (2, 3), (1e-3, 1e-3), False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,adv_shape,clip,with_kl", CASES)
def test_forward_matches_reference_and_numpy(backend, shape, adv_shape, clip, with_kl):
    dev = device_of(backend)
    lp, old, adv, kl = make(shape, adv_shape)
    kl_coef = 0.04 if with_kl else 0.0
    clip_range = clip[0] if clip[0] == clip[1] else clip
    loss, stats = diffrl.grpo_loss(lp.to(dev), old.to(dev), adv.to(dev), clip_range=clip_range,
                                   kl=kl.to(dev) if with_kl else None, kl_coef=kl_coef, backend=name_of(backend))
    assert loss.shape == () and loss.dtype == torch.float32
    assert set(stats) == set(STATS) and all(v.shape == () and not v.requires_grad for v in stats.values())
    ref_loss, ref_stats = grpo_loss_reference(lp.double(), old.double(), adv.double(), clip_range=clip_range,
                                              kl=kl.double() if with_kl else None, kl_coef=kl_coef)
    np_loss, np_stats = numpy_loss(lp, old, adv, kl.numpy() if with_kl else None, *clip, kl_coef)
    scale = float(adv.abs().mean())
    close(loss, ref_loss, "loss", atol=1e-6 * scale)
    close(loss, np_loss, "loss numpy", atol=1e-6 * scale)
    # clip_fraction counts ratios outside [1 - lo, 1 + hi]: a float32 exp (Triton's on a GPU is the
    # approximate ex2) may put a ratio within a few ulp of a bound on the other side. Allow exactly
    # those elements, and no others.
    ratio = (lp.double() - old.double()).exp()
    bounds = torch.tensor([1 - clip[0], 1 + clip[1]], dtype=torch.float64)
    near = ((ratio[..., None] - bounds).abs() <= 1e-6 * bounds).any(-1).sum().item()
    for k in STATS:
        atol = 1e-6 * (scale if k == "policy_loss" else 1.0) + (near / lp.numel() if k == "clip_fraction" else 0.0)
        close(stats[k], ref_stats[k], k, atol=atol)
        close(stats[k], np_stats[k], f"{k} numpy", atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,adv_shape", [((37,), None), ((6, 5), (6,)), ((2, 4099), None)])
def test_backward_matches_reference_autograd(backend, shape, adv_shape):
    dev = device_of(backend)
    lp, old, adv, kl = make(shape, adv_shape, spread=0.3)  # many ratios outside the clip range
    clip_range = (0.1, 0.2)
    mine_lp, mine_kl = lp.clone().to(dev).requires_grad_(), kl.clone().to(dev).requires_grad_()
    loss, _ = diffrl.grpo_loss(mine_lp, old.to(dev), adv.to(dev), clip_range=clip_range, kl=mine_kl, kl_coef=0.3,
                               backend=name_of(backend))
    (loss * 2.5).backward()
    ref_lp, ref_kl = lp.double().requires_grad_(), kl.double().requires_grad_()
    ref_loss, _ = grpo_loss_reference(ref_lp, old.double(), adv.double(), clip_range=clip_range, kl=ref_kl,
                                      kl_coef=0.3)
    (ref_loss * 2.5).backward()
    n = lp.numel()
    g, r = mine_lp.grad.cpu().double(), ref_lp.grad
    assert mine_lp.grad.dtype == torch.float32
    assert (g - r).abs().max() <= 1e-5 * r.abs().max() + 1e-9, f"grad log_prob max err {(g - r).abs().max()}"
    assert ((g == 0) == (r == 0)).all(), "the clipped elements differ"
    assert 0 < int((r == 0).sum()) < n, "the case should clip some elements and not others"
    assert torch.allclose(mine_kl.grad.cpu().double(), ref_kl.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_ratio_is_one(backend):
    """Before the first update log_prob == old: loss = -mean(A), grad = -A / N, nothing clipped."""
    dev = device_of(backend)
    lp = (torch.randn(4, 6) - 30).to(dev).requires_grad_()
    adv = torch.randn(4).to(dev)
    loss, stats = diffrl.grpo_loss(lp, lp.detach().clone(), adv, clip_range=1e-4, backend=name_of(backend))
    loss.backward()
    close(loss, -adv.double().mean(), "loss", atol=1e-7)
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    assert float(stats["ratio_min"]) == 1.0 == float(stats["ratio_max"]) == float(stats["ratio_mean"])
    assert torch.allclose(lp.grad.cpu(), (-adv.cpu() / 24)[:, None].expand(4, 6), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_deterministic(backend):
    dev = device_of(backend)
    lp, old, adv, kl = (t.to(dev) for t in make((3, 5000)))
    runs = [diffrl.grpo_loss(lp, old, adv, clip_range=0.1, kl=kl, kl_coef=0.1, backend=name_of(backend))
            for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in STATS)


def test_low_precision_inputs_are_upcast_and_float64_runs_on_the_reference():
    lp, old, adv, kl = make((5, 3))
    for dtype in (torch.float16, torch.bfloat16):
        x = lp.to(dtype).requires_grad_()
        loss, _ = diffrl.grpo_loss(x, old.to(dtype), adv.to(dtype), clip_range=0.2)
        loss.backward()
        assert loss.dtype == torch.float32 and x.grad.dtype == dtype
        want, _ = grpo_loss_reference(lp.to(dtype).float(), old.to(dtype).float(), adv.to(dtype).float(),
                                      clip_range=0.2)
        close(loss, want, f"{dtype}", atol=1e-6)
    loss, _ = diffrl.grpo_loss(lp.double(), old.double(), adv.double(), clip_range=0.2)
    assert loss.dtype == torch.float64
    if available("cpp"):
        with pytest.raises(TypeError, match="float64"):
            diffrl.grpo_loss(lp.double(), old.double(), adv.double(), clip_range=0.2, backend="cpp")


def test_old_log_prob_and_advantages_are_constants():
    lp, old, adv, _ = make((8,))
    lp.requires_grad_()
    old.requires_grad_()
    adv.requires_grad_()
    loss, _ = diffrl.grpo_loss(lp, old, adv, clip_range=0.2)
    loss.backward()
    assert lp.grad is not None and old.grad is None and adv.grad is None


def test_reference_gradcheck_float64():
    lp, old, adv, kl = (t.double() for t in make((3, 4), spread=0.3))

    def f(x, k):
        return grpo_loss_reference(x, old, adv, clip_range=0.1, kl=k, kl_coef=0.5)[0]

    assert torch.autograd.gradcheck(f, (lp.requires_grad_(), kl.requires_grad_()))


def _bad_calls():
    lp, old, adv, kl = make((4, 3))
    yield "shape", ValueError, (lp, old[:, :2], adv), dict(clip_range=0.2)
    yield "advantages must have", ValueError, (lp, old, adv[:, :2]), dict(clip_range=0.2)
    yield "kl has shape", ValueError, (lp, old, adv), dict(clip_range=0.2, kl=kl[0], kl_coef=0.1)
    yield r"\[B\] or \[B, T\]", ValueError, (lp[None], old[None], adv[None]), dict(clip_range=0.2)
    yield "empty", ValueError, (lp[:0], old[:0], adv[:0]), dict(clip_range=0.2)
    yield "clip_range", ValueError, (lp, old, adv), dict(clip_range=0.0)
    yield "clip_range", ValueError, (lp, old, adv), dict(clip_range=(0.1, float("nan")))
    yield "clip_range", ValueError, (lp, old, adv), dict(clip_range=(0.1, 0.2, 0.3))
    yield "lower clip", ValueError, (lp, old, adv), dict(clip_range=1.5)
    yield "needs kl", ValueError, (lp, old, adv), dict(clip_range=0.2, kl_coef=0.1)
    yield "kl_coef", ValueError, (lp, old, adv), dict(clip_range=0.2, kl=kl, kl_coef=float("inf"))
    yield "floating-point", TypeError, (lp.long(), old, adv), dict(clip_range=0.2)
    yield "torch.Tensor", TypeError, (lp, old.tolist(), adv), dict(clip_range=0.2)  # arrays are accepted (interop)
    yield "unknown backend", ValueError, (lp, old, adv), dict(clip_range=0.2, backend="metal")


@pytest.mark.parametrize("match,exc,args,kwargs", list(_bad_calls()), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_clear_error(match, exc, args, kwargs):
    with pytest.raises(exc, match=match):
        diffrl.grpo_loss(*args, **kwargs)


def test_compiles_with_fullgraph_forward_and_backward():
    be = "cpp" if available("cpp") else "torch"
    lp, old, adv, kl = make((4, 6), (4,))

    def step(lp, kl):
        loss, stats = diffrl.grpo_loss(lp, old, adv, clip_range=0.1, kl=kl, kl_coef=0.2, backend=be)
        return loss * 3.0, stats["clip_fraction"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [lp.clone().requires_grad_(), kl.clone().requires_grad_()]
    b = [lp.clone().requires_grad_(), kl.clone().requires_grad_()]
    got, want = compiled(*a), step(*b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got[0].backward()
    want[0].backward()
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)


def test_torch_library_opcheck():
    if not available("cpp"):
        pytest.skip("no cpp backend")
    lp, old, adv, kl = make((3, 5), (3,))
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.diffrl.grpo_loss_fwd.default, (lp, old, adv, kl, 0.9, 1.1, 0.1, "cpp"),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.diffrl.grpo_loss_bwd.default, (torch.tensor(1.5), lp, old, adv, 0.9, 1.1, "cpp"),
                          test_utils=utils)

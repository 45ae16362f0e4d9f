"""The stochastic denoising step with its log-probability: ``diffrl.ops.sde_step``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffrl import interop
from diffrl.ops import _dispatch
from diffrl.ops._library import LIB
from diffrl.ops.reference import sde_step_reference
from diffrl.schedules import StepCoeffs

IMPLEMENTED = _dispatch.implementing("sde_step")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCES = ("mean", "sum")


@dataclass
class SDEStepOutput:
    """``prev_sample``: x' (the given one in scoring mode), input dtype; ``log_prob``: [B] float32;
    ``mean``: the step's mean (None unless asked for); ``kl``: [B] float32 or None."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor | None
    kl: torch.Tensor | None


@interop.accepts_arrays
def sde_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: StepCoeffs | tuple,
    *,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    ref_output: torch.Tensor | None = None,
    ref_uncond_output: torch.Tensor | None = None,
    reduce: str = "mean",
    generator: torch.Generator | None = None,
    return_mean: bool = True,
    backend: str = "auto",
) -> SDEStepOutput:
    """One stochastic denoising step ``x' ~ N(a x + c v, s^2 I)`` and its log-probability, fused.

    Covers DDPO's DDIM step, Flow-GRPO's SDE step, the coefficients-preserving step and any other
    affine Gaussian step: the schedule functions in ``diffrl.schedules`` turn a scheduler state into
    ``coeffs = (a, c, s)``, each a float or one value per sample.

    * ``model_output`` is the model's prediction ``v`` (velocity, epsilon, v-prediction: the
      coefficients say how it enters). With ``uncond_output`` and ``guidance_scale`` the guidance
      ``v = uncond + w (cond - uncond)`` is fused.
    * Sampling mode: ``noise`` given, or drawn from ``generator``; ``prev_sample`` comes out.
      Scoring mode: ``prev_sample`` given (a stored rollout), its log-prob under this step comes out.
      Scoring the sampled ``prev_sample`` with the same inputs gives a bitwise-identical log-prob.
    * ``ref_output`` (and ``ref_uncond_output`` under guidance) adds ``kl``: the KL divergence
      between this step's Gaussian and the reference model's, ``sum (mean - mean_ref)^2 / (2 s^2)``.
      Flow-GRPO divides by ``2 std_dev_t^2`` without the ``sqrt(-dt)`` factor, so its KL is ours
      divided by ``-dt``: multiply its beta by ``-dt`` per step to compare.
    * ``reduce="mean"`` (DDPO, Flow-GRPO) averages the per-element log-density over all non-batch
      dimensions, ``"sum"`` gives the true log-density of the whole latent.
    * ``return_mean=False`` skips writing the mean (one latent-sized write less; samplers use it).

    Arithmetic is float32 for float16/bfloat16/float32 inputs (float64 only on the ``torch``
    backend); ``prev_sample`` and ``mean`` come out in the input dtype, ``log_prob`` and ``kl`` in
    float32. Differentiable with respect to ``sample``, ``model_output``, ``uncond_output``,
    ``ref_output``, ``ref_uncond_output`` and ``prev_sample``; the backward is one fused pass that
    recomputes what it needs. ``coeffs`` are constants. Non-contiguous inputs are copied.
    """
    if not isinstance(coeffs, StepCoeffs):
        if isinstance(coeffs, (tuple, list)) and len(coeffs) == 3:
            coeffs = StepCoeffs(*coeffs)
        else:
            raise TypeError(f"sde_step: coeffs must be a StepCoeffs or an (a, c, s) tuple, got {type(coeffs).__name__}")
    _validate(sample, model_output, coeffs, uncond_output, guidance_scale, noise, prev_sample, ref_output,
              ref_uncond_output, reduce)
    name = _dispatch.resolve("sde_step", IMPLEMENTED, backend, sample.device)
    if name != "torch" and sample.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"sde_step: backend {name!r} takes float32, float16 or bfloat16 tensors, got {sample.dtype}; "
                        "use backend='torch' for float64")

    if noise is None and prev_sample is None:
        gen_device = generator.device if generator is not None else sample.device
        noise = torch.randn(sample.shape, generator=generator, device=gen_device, dtype=sample.dtype).to(sample.device)

    B = sample.shape[0]
    a, c, s = coeffs.expand(B, sample.device)
    w = 1.0 if guidance_scale is None else float(guidance_scale)

    if name == "torch":
        prev, mean, log_prob, kl = sde_step_reference(
            sample, model_output, a, c, s, uncond_output=uncond_output, guidance_scale=w, noise=noise,
            prev_sample=prev_sample, ref_output=ref_output, ref_uncond_output=ref_uncond_output, reduce=reduce,
            return_mean=return_mean)
        return SDEStepOutput(prev, log_prob, mean, kl)

    tensors = [t if t is None else t.contiguous() for t in
               (sample, model_output, uncond_output, noise, prev_sample, ref_output, ref_uncond_output)]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        prev_out, mean, log_prob, kl = _SDEStepFunction.apply(*tensors, a, c, s, w, reduce == "sum",
                                                              bool(return_mean), name)
    else:  # no autograd node needed (sampling under no_grad, or plain inputs)
        x, v, vu, noise, prev_in, vr, vru = tensors
        prev_out, mean, log_prob, kl = _call_fwd(x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce == "sum",
                                                 bool(return_mean), name)
    return SDEStepOutput(
        prev_sample if prev_sample is not None else prev_out,
        log_prob,
        mean if return_mean else None,
        kl if ref_output is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# validation: every bad call raises here, before any kernel runs


def _validate(sample, model_output, coeffs, uncond_output, guidance_scale, noise, prev_sample, ref_output,
              ref_uncond_output, reduce):
    named = {"sample": sample, "model_output": model_output, "uncond_output": uncond_output, "noise": noise,
             "prev_sample": prev_sample, "ref_output": ref_output, "ref_uncond_output": ref_uncond_output}
    for n, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"sde_step: {n} must be a torch.Tensor, got {type(t).__name__}")
    if sample.dim() < 2:
        raise ValueError(f"sde_step: sample must be [B, ...] with at least 2 dims, got shape {tuple(sample.shape)}")
    if sample.numel() == 0:
        raise ValueError(f"sde_step: sample is empty (shape {tuple(sample.shape)})")
    if not sample.is_floating_point():
        raise TypeError(f"sde_step: sample must be a floating-point tensor, got {sample.dtype}")
    for n, t in named.items():
        if t is None or n == "sample":
            continue
        if t.shape != sample.shape:
            raise ValueError(f"sde_step: {n} has shape {tuple(t.shape)} but sample has {tuple(sample.shape)}")
        if t.dtype != sample.dtype:
            raise TypeError(f"sde_step: {n} has dtype {t.dtype} but sample has {sample.dtype} (cast them to one dtype)")
        if t.device != sample.device:
            raise ValueError(f"sde_step: {n} is on {t.device} but sample is on {sample.device}")
    if noise is not None and prev_sample is not None:
        raise ValueError("sde_step: give either noise (sampling) or prev_sample (scoring), not both")
    if (uncond_output is None) != (guidance_scale is None):
        raise ValueError("sde_step: uncond_output and guidance_scale go together (classifier-free guidance)")
    if guidance_scale is not None:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"sde_step: guidance_scale must be a float, got {type(guidance_scale).__name__}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"sde_step: guidance_scale must be finite, got {guidance_scale}")
    if ref_uncond_output is not None and ref_output is None:
        raise ValueError("sde_step: ref_uncond_output given without ref_output")
    if ref_output is not None and (ref_uncond_output is None) != (uncond_output is None):
        raise ValueError("sde_step: with guidance the KL needs ref_uncond_output too (and without guidance, not)")
    if reduce not in _REDUCES:
        raise ValueError(f"sde_step: reduce must be one of {_REDUCES}, got {reduce!r}")
    n = coeffs.batch_size
    if n is not None and n != sample.shape[0]:
        raise ValueError(f"sde_step: coeffs have {n} per-sample values but the batch has {sample.shape[0]}")
    if not coeffs.stochastic:
        raise ValueError("sde_step: coeffs.s must be > 0 for every sample: a step with s == 0 is deterministic "
                         "and has no log-prob (apply mean = a*x + c*v yourself, e.g. outside the SDE window)")
    if coeffs.device.type != "cpu" and coeffs.device != sample.device:
        raise ValueError(f"sde_step: coeffs are on {coeffs.device} but sample is on {sample.device}")


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, with fake implementations) and autograd

LIB.define(
    "sde_step_fwd(Tensor x, Tensor v, Tensor? vu, float w, Tensor? noise, Tensor? prev_in, Tensor? vr, "
    "Tensor? vru, Tensor a, Tensor c, Tensor s, bool reduce_sum, bool return_mean, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
LIB.define(
    "sde_step_bwd(Tensor x, Tensor v, Tensor? vu, float w, Tensor? prev, Tensor? vr, Tensor? vru, Tensor a, "
    "Tensor c, Tensor s, Tensor? g_log_prob, Tensor? g_kl, Tensor? g_prev, Tensor? g_mean, bool sampling, "
    "bool reduce_sum, bool[] needs, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def _sde_step_fwd(x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum, return_mean, backend):
    """Launchers may return None for absent outputs (eager callers accept that)."""
    return _dispatch.launcher(backend, "sde_step_forward")(x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum,
                                                           return_mean)


def _sde_step_bwd(x, v, vu, w, prev, vr, vru, a, c, s, g_log_prob, g_kl, g_prev, g_mean, sampling, reduce_sum,
                  needs, backend):
    return _dispatch.launcher(backend, "sde_step_backward")(x, v, vu, w, prev, vr, vru, a, c, s, g_log_prob, g_kl,
                                                            g_prev, g_mean, sampling, reduce_sum, needs)


def _tensors_only(outs, dtypes, x):
    # the registered op's schema returns Tensors: absent outputs become empty ones
    return tuple(x.new_empty(0, dtype=dt) if o is None else o for o, dt in zip(outs, dtypes))


def _sde_step_fwd_op(x, *rest):
    return _tensors_only(_sde_step_fwd(x, *rest), (x.dtype, x.dtype, torch.float32, torch.float32), x)


def _sde_step_bwd_op(x, *rest):
    return _tensors_only(_sde_step_bwd(x, *rest), (x.dtype,) * 6, x)


for _key in ("CPU", "CUDA"):
    LIB.impl("sde_step_fwd", _sde_step_fwd_op, _key)
    LIB.impl("sde_step_bwd", _sde_step_bwd_op, _key)


@torch.library.register_fake("diffrl::sde_step_fwd")
def _sde_step_fwd_fake(x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum, return_mean, backend):
    B = x.shape[0]
    return (
        torch.empty_like(x) if noise is not None else x.new_empty(0),
        torch.empty_like(x) if return_mean else x.new_empty(0),
        x.new_empty(B, dtype=torch.float32),
        x.new_empty(B if vr is not None else 0, dtype=torch.float32),
    )


@torch.library.register_fake("diffrl::sde_step_bwd")
def _sde_step_bwd_fake(x, v, vu, w, prev, vr, vru, a, c, s, g_log_prob, g_kl, g_prev, g_mean, sampling, reduce_sum,
                       needs, backend):
    want = [bool(n) and t is not None for n, t in zip(needs, (x, v, vu, None if sampling else prev, vr, vru))]
    return tuple(torch.empty_like(x) if wnt else x.new_empty(0) for wnt in want)


# Eager calls go straight to the implementation: the Python-defined torch.library op costs ~30 us per
# call in dispatch, which dominates small latents. Under torch.compile the registered op is used, so
# the compiled graph sees one opaque node with its fake implementation.
def _call_fwd(*args):
    if torch.compiler.is_compiling():
        return torch.ops.diffrl.sde_step_fwd(*args)
    return _sde_step_fwd(*args)


def _call_bwd(*args):
    if torch.compiler.is_compiling():
        return torch.ops.diffrl.sde_step_bwd(*args)
    return _sde_step_bwd(*args)


class _SDEStepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v, vu, noise, prev_in, vr, vru, a, c, s, w, reduce_sum, return_mean, backend):
        prev_out, mean, log_prob, kl = _call_fwd(x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum,
                                                 return_mean, backend)
        ctx.sampling = noise is not None
        ctx.w, ctx.reduce_sum, ctx.backend = w, reduce_sum, backend
        # inputs only (no [B, D] intermediates): the backward recomputes the mean
        ctx.save_for_backward(x, v, vu, prev_in, vr, vru, a, c, s)
        ctx.set_materialize_grads(False)
        return prev_out, mean, log_prob, kl

    @staticmethod
    def backward(ctx, g_prev, g_mean, g_log_prob, g_kl):
        x, v, vu, prev_in, vr, vru, a, c, s = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[0], n[1], n[2], n[4], n[5], n[6]]
        if not any(needs):
            return (None,) * 14
        if g_prev is not None and g_prev.numel() == 0:
            g_prev = None
        if g_mean is not None and g_mean.numel() == 0:
            g_mean = None
        if g_kl is not None and g_kl.numel() == 0:
            g_kl = None
        grads = _call_bwd(
            x, v, vu, ctx.w, prev_in, vr, vru, a, c, s,
            None if g_log_prob is None else g_log_prob.contiguous().float(),
            None if g_kl is None else g_kl.contiguous().float(),
            None if g_prev is None else g_prev.contiguous().to(x.dtype),
            None if g_mean is None else g_mean.contiguous().to(x.dtype),
            ctx.sampling, ctx.reduce_sum, needs, ctx.backend)
        gx, gv, gvu, gprev, gvr, gvru = (g if g is not None and g.numel() else None for g in grads)
        return gx, gv, gvu, None, gprev, gvr, gvru, None, None, None, None, None, None, None

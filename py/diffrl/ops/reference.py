"""Plain-PyTorch references: the spec of every diffrl op.

Readable, float64-capable and differentiable by autograd. Every fast backend computes the same
function (tests/ compare them on random inputs), so change an op here first.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def sde_step_reference(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    *,
    uncond_output: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    ref_output: torch.Tensor | None = None,
    ref_uncond_output: torch.Tensor | None = None,
    reduce: str = "mean",
    return_mean: bool = True,
):
    """One affine Gaussian step with its log-probability; returns (prev_sample, mean, log_prob, kl).

    ``a, c, s`` are float32 tensors of shape ``[B]``. Arithmetic is float32 (float64 for float64
    inputs). Exactly one of ``noise`` (sampling) and ``prev_sample`` (scoring) is given.

        v    = uncond + w (cond - uncond)                 (when uncond_output is given)
        mean = a x + c v
        x'   = mean + s eps, rounded to the input dtype   (sampling)   |   x' = prev_sample (scoring)
        logp = -sum_j (x'_j - mean_j)^2 / (2 s^2) - D (log s + log sqrt(2 pi)),  divided by D for "mean"
        kl   =  sum_j (c (v_j - v_ref_j))^2 / (2 s^2),                            divided by D for "mean"

    The KL is the closed form between the two Gaussians N(mean, s^2) and N(mean_ref, s^2); writing
    mean - mean_ref as c (v - v_ref) avoids the cancellation of a x. ``mean`` is None when
    ``return_mean`` is False, ``kl`` None without ``ref_output``; in scoring mode the returned
    prev_sample is the given one.
    """
    ct = torch.float64 if sample.dtype == torch.float64 else torch.float32
    B = sample.shape[0]
    D = sample[0].numel()
    bshape = (B,) + (1,) * (sample.dim() - 1)
    a_, c_, s_ = (t.to(ct).reshape(bshape) for t in (a, c, s))

    def guide(cond, uncond):
        v = cond.to(ct)
        if uncond is not None:
            vu = uncond.to(ct)
            v = vu + guidance_scale * (v - vu)
        return v

    v = guide(model_output, uncond_output)
    mean = a_ * sample.to(ct) + c_ * v
    if noise is not None:
        prev = (mean + s_ * noise.to(ct)).to(sample.dtype)
    else:
        prev = prev_sample
    diff = prev.to(ct) - mean
    sq = (diff * diff).reshape(B, D).sum(dim=1)
    s1 = s.to(ct)
    f = 1.0 if reduce == "sum" else 1.0 / D
    norm = (torch.log(s1) + LOG_SQRT_2PI) * (D if reduce == "sum" else 1.0)
    log_prob = (-sq / (2.0 * s1 * s1) * f - norm).to(torch.float32 if ct == torch.float32 else ct)
    kl = None
    if ref_output is not None:
        dk = c_ * (v - guide(ref_output, ref_uncond_output))
        kl = ((dk * dk).reshape(B, D).sum(dim=1) / (2.0 * s1 * s1) * f).to(log_prob.dtype)
    return prev, (mean.to(sample.dtype) if return_mean else None), log_prob, kl

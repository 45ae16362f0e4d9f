"""Schedule coefficients: turn a scheduler state into the affine Gaussian step (a, c, s).

Every stochastic step diffrl knows is ``x' = a * x + c * v + s * eps`` with per-sample scalars
``a, c, s`` (see ``diffrl.ops.sde_step``). The functions here own the numerical guards of each
schedule (sigma == 1, the last step, excluded steps) so that the kernels never see a degenerate step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Number = float | int


def _as_coeff(name: str, value) -> torch.Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"StepCoeffs.{name} must be a float or a float tensor, got {type(value).__name__}")
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() > 1:
        raise ValueError(f"StepCoeffs.{name} must be a scalar or a 1-D [B] tensor, got shape {tuple(t.shape)}")
    return t.to(torch.float32)


@dataclass(frozen=True)
class StepCoeffs:
    """Per-sample coefficients of one affine Gaussian step: ``mean = a*x + c*v``, ``std = s``.

    ``a``, ``c`` and ``s`` are float32 tensors, each either 0-d (one value for the whole batch) or
    ``[B]`` (one step per sample). Values are checked once, here, when the object is built (finite,
    ``s >= 0``), so that ``sde_step`` never synchronises with the device to check them: build
    coefficients on the host and move them with ``.to(device)`` once per rollout.
    """

    a: torch.Tensor
    c: torch.Tensor
    s: torch.Tensor
    # True when every s > 0 (a stochastic step with a log-prob); set by validation.
    stochastic: bool = field(default=True, compare=False)

    def __init__(self, a, c, s, *, _checked: tuple[bool] | None = None):
        a, c, s = (_as_coeff(n, v) for n, v in (("a", a), ("c", c), ("s", s)))
        devices = {a.device, c.device, s.device}
        if len(devices) != 1:
            raise ValueError(f"StepCoeffs: a, c, s must be on one device, got {sorted(map(str, devices))}")
        sizes = {t.numel() for t in (a, c, s) if t.dim() == 1}
        if len(sizes) > 1:
            raise ValueError(f"StepCoeffs: a, c, s have different lengths {sorted(sizes)}")
        if _checked is None:
            for name, t in (("a", a), ("c", c), ("s", s)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"StepCoeffs.{name} has non-finite values: {t.tolist()}")
            if bool((s < 0).any()):
                raise ValueError(f"StepCoeffs.s must be >= 0, got {s.tolist()}")
            stochastic = bool((s > 0).all())
        else:
            (stochastic,) = _checked
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "c", c)
        object.__setattr__(self, "s", s)
        object.__setattr__(self, "stochastic", stochastic)
        object.__setattr__(self, "_expanded", {})

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def batch_size(self) -> int | None:
        """Length of the per-sample coefficients, or None when all three are scalars."""
        for t in (self.a, self.c, self.s):
            if t.dim() == 1:
                return t.numel()
        return None

    def to(self, device) -> "StepCoeffs":
        """Move to ``device`` without re-checking (and so without a device synchronisation)."""
        return StepCoeffs(self.a.to(device), self.c.to(device), self.s.to(device), _checked=(self.stochastic,))

    def expand(self, batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three coefficients as contiguous float32 ``[batch]`` tensors (on ``device`` if given).

        The result is memoised per (batch, device): a trainer scores the same step for several
        minibatches, and three small allocations and copies are a visible part of a small call.
        Treat a StepCoeffs as immutable (do not write into ``a``, ``c`` or ``s`` in place).
        """
        n = self.batch_size
        if n is not None and n != batch:
            raise ValueError(f"coeffs have {n} per-sample values but the batch has {batch} samples")
        device = self.device if device is None else torch.device(device)
        if torch.compiler.is_compiling():  # keep traced graphs free of Python-side state
            return tuple(t.to(device).expand(batch).contiguous() for t in (self.a, self.c, self.s))
        key = (batch, device)
        hit = self._expanded.get(key)
        if hit is None:
            hit = tuple(t.to(device).expand(batch).contiguous() for t in (self.a, self.c, self.s))
            self._expanded[key] = hit
        return hit

    def __repr__(self) -> str:
        def fmt(t):
            return f"{t.item():.6g}" if t.dim() == 0 else f"[{t.numel()}]"

        return f"StepCoeffs(a={fmt(self.a)}, c={fmt(self.c)}, s={fmt(self.s)})"


# --------------------------------------------------------------------------------------------------
# Coefficient functions. Each computes in float64 on the host and returns float32 StepCoeffs (on
# ``device`` if given). Inputs: a schedule tensor (sigmas or alphas_cumprod) and a step index that is
# an int (one step for the whole batch) or a [B] integer tensor (one step per sample).
# --------------------------------------------------------------------------------------------------


def _schedule(name: str, values) -> torch.Tensor:
    t = torch.as_tensor(values)
    if not t.is_floating_point() or t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"{name} must be a 1-D float tensor with at least 2 entries, got "
                         f"{tuple(t.shape)} {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values")
    return t


def _index(name: str, value, low: int, high: int) -> torch.Tensor:
    """An int or a 1-D integer tensor, checked to lie in [low, high]; returned as a CPU int64 tensor."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(value, int):
        t = torch.tensor(value)
    elif isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex():
        t = value.detach().to("cpu", torch.int64)
    else:
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(value).__name__}"
                        + (f" {value.dtype}" if isinstance(value, torch.Tensor) else ""))
    if t.dim() > 1:
        raise ValueError(f"{name} must be an int or a 1-D [B] tensor, got shape {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < low or int(t.max()) > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {t.tolist()}")
    return t


def _level(name: str, value, low: float = 0.0, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value}")
    return value


def _finish(a, c, s, device) -> StepCoeffs:
    coeffs = StepCoeffs(torch.as_tensor(a), torch.as_tensor(c), torch.as_tensor(s))
    return coeffs if device is None else coeffs.to(device)


def _sigma_pair(sigmas, step_index):
    sig = _schedule("sigmas", sigmas)
    idx = _index("step_index", step_index, 0, sig.numel() - 2)
    sigma, sigma_next = sig[idx], sig[idx + 1]
    if bool((sigma_next >= sigma).any()):
        raise ValueError("sigmas must decrease from one step to the next (flow-matching schedules run "
                         f"from noise, sigma = 1, to data, sigma = 0); got sigma={sigma.tolist()} -> "
                         f"{sigma_next.tolist()}")
    if bool((sigma > 1).any()) or bool((sigma_next < 0).any()):
        raise ValueError("flow-matching sigmas must lie in [0, 1]")
    return sig, sigma, sigma_next


def flow_sde(sigmas, step_index, noise_level: float, *, device=None) -> StepCoeffs:
    """Flow-GRPO's SDE step for a rectified-flow model (``v`` = velocity, ``x0 = x - sigma v``).

    With ``sigma = sigmas[i]``, ``sigma' = sigmas[i+1]``, ``dt = sigma' - sigma`` (< 0) and
    ``std = noise_level * sqrt(sigma / (1 - sigma))`` (at ``sigma == 1`` the denominator uses
    ``sigmas[1]``, Flow-GRPO's guard against a division by zero at the first step)::

        a = 1 + std^2 dt / (2 sigma)
        c = (1 + std^2 (1 - sigma) / (2 sigma)) dt
        s = std sqrt(-dt)

    ``noise_level = 0`` gives the deterministic Euler step of ``FlowMatchEulerDiscreteScheduler``
    (then ``s == 0`` and the step has no log-prob). Flow-GRPO's KL term divides by ``2 std^2``
    rather than ``2 s^2``; see ``diffrl.ops.sde_step`` for the relation between the two betas.
    """
    level = _level("noise_level", noise_level)
    sig, sigma, sigma_next = _sigma_pair(sigmas, step_index)
    dt = sigma_next - sigma
    denominator_sigma = torch.where(sigma == 1, sig[1], sigma)
    if bool((denominator_sigma >= 1).any()):
        raise ValueError("flow_sde needs sigmas[1] < 1 to guard the first step (sigma == 1)")
    if bool((sigma <= 0).any()):
        raise ValueError("flow_sde: sigma must be > 0 at a stochastic step")
    std = level * torch.sqrt(sigma / (1 - denominator_sigma))
    a = 1 + std**2 * dt / (2 * sigma)
    c = (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    s = std * torch.sqrt(-dt)
    return _finish(a, c, s, device)


def flow_cps(sigmas, step_index, noise_level: float, *, device=None) -> StepCoeffs:
    """The coefficients-preserving sampling (CPS) step for rectified flow.

    ``x0 = x - sigma v`` and ``eps = x + (1 - sigma) v`` are re-mixed so that the signal and noise
    coefficients of the next latent are exactly those of the schedule::

        s  = sigma' sin(noise_level pi / 2)
        mu = (1 - sigma') x0 + sqrt(sigma'^2 - s^2) eps

    ``noise_level`` lies in [0, 1]; at 0 this is the Euler step, and at the last step (``sigma' = 0``)
    it is deterministic. Flow-GRPO's CPS code scores a step as ``-(x' - mu)^2`` (no ``1/(2 s^2)``,
    no constants); ``sde_step`` always returns the true Gaussian log-density.
    """
    level = _level("noise_level", noise_level, 0.0, 1.0)
    _, sigma, sigma_next = _sigma_pair(sigmas, step_index)
    s = sigma_next * math.sin(level * math.pi / 2)
    direction = torch.sqrt(torch.clamp(sigma_next**2 - s**2, min=0))
    a = (1 - sigma_next) + direction
    c = -sigma * (1 - sigma_next) + (1 - sigma) * direction
    return _finish(a, c, s, device)


def flow_ode(sigmas, step_index, *, device=None) -> StepCoeffs:
    """The deterministic Euler step ``x' = x + dt v`` (``a = 1, c = dt, s = 0``): no log-prob.

    A sampler applies ``a x + c v`` itself outside the stochastic window; ``sde_step`` refuses it.
    """
    _, sigma, sigma_next = _sigma_pair(sigmas, step_index)
    return _finish(torch.ones_like(sigma), sigma_next - sigma, torch.zeros_like(sigma), device)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim(alphas_cumprod, timestep, prev_timestep, eta: float, prediction_type: str = "epsilon", *,
         final_alpha_cumprod: float | None = None, device=None) -> StepCoeffs:
    """DDIM's step with stochasticity ``eta`` (DDPO), as an affine Gaussian step.

    With ``A = alphas_cumprod[t]`` and ``A' = alphas_cumprod[t_prev]`` (or ``final_alpha_cumprod``
    when ``t_prev < 0``: 1.0 for a scheduler with ``set_alpha_to_one``, else ``alphas_cumprod[0]``)::

        s  = eta sqrt((1 - A') / (1 - A) (1 - A / A'))
        mu = sqrt(A') x0 + sqrt(1 - A' - s^2) eps

    where ``(x0, eps)`` come from the prediction: epsilon ``x0 = (x - sqrt(1-A) v) / sqrt(A)``;
    v_prediction ``x0 = sqrt(A) x - sqrt(1-A) v, eps = sqrt(A) v + sqrt(1-A) x``; sample ``x0 = v``.
    ``eta = 0`` is diffusers' ``DDIMScheduler.step`` with ``eta=0``. Clipping or thresholding x0
    makes the step non-affine and is not supported here.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    level = _level("eta", eta)
    alphas = _schedule("alphas_cumprod", alphas_cumprod)
    if bool((alphas <= 0).any()) or bool((alphas > 1).any()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    n = alphas.numel()
    t = _index("timestep", timestep, 0, n - 1)
    t_prev = _index("prev_timestep", prev_timestep, -(2**62), n - 1)
    if t.dim() == 1 and t_prev.dim() == 1 and t.numel() != t_prev.numel():
        raise ValueError(f"timestep has {t.numel()} entries but prev_timestep has {t_prev.numel()}")
    if bool((t_prev >= t).any()):
        raise ValueError(f"prev_timestep must be < timestep, got {t_prev.tolist()} and {t.tolist()}")
    if bool((t_prev < 0).any()):
        if final_alpha_cumprod is None:
            raise ValueError("prev_timestep < 0 (the last step) needs final_alpha_cumprod: 1.0 when the "
                             "scheduler has set_alpha_to_one, else alphas_cumprod[0]")
        final = _level("final_alpha_cumprod", final_alpha_cumprod, 0.0, 1.0)
    else:
        final = 1.0
    A = alphas[t]
    A_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
    B = 1 - A
    variance = (1 - A_prev) / B * (1 - A / A_prev)
    s = level * torch.sqrt(variance.clamp(min=0))
    if bool((1 - A_prev - s**2 < -1e-12).any()):
        raise ValueError(f"eta={level} is too large for this step: the DDIM direction term "
                         "sqrt(1 - A' - s^2) would be imaginary (eta must be <= 1 for DDPO's step)")
    direction = torch.sqrt((1 - A_prev - s**2).clamp(min=0))
    sqrt_a, sqrt_b, sqrt_ap = A.sqrt(), B.sqrt(), A_prev.sqrt()
    if prediction_type == "epsilon":
        # mu = sqrt(A')(x - sqrt(B) v)/sqrt(A) + direction * v
        a = sqrt_ap / sqrt_a
        c = direction - sqrt_ap * sqrt_b / sqrt_a
    elif prediction_type == "v_prediction":
        a = sqrt_ap * sqrt_a + direction * sqrt_b
        c = -sqrt_ap * sqrt_b + direction * sqrt_a
    else:  # sample: x0 = v, eps = (x - sqrt(A) v) / sqrt(B)
        a = direction / sqrt_b
        c = sqrt_ap - direction * sqrt_a / sqrt_b
    return _finish(a, c, s, device)


# ---- Convenience wrappers that read a diffusers scheduler's state ---------------------------------


def flow_sde_from_scheduler(scheduler, step_index, noise_level: float, *, sde_type: str = "sde",
                            device=None) -> StepCoeffs:
    """``flow_sde`` / ``flow_cps`` / ``flow_ode`` (``sde_type`` "sde", "cps" or "ode") on the sigmas of
    a ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or torch.as_tensor(sigmas).numel() < 2:
        raise ValueError("the scheduler has no sigmas: call scheduler.set_timesteps(...) first")
    if sde_type == "sde":
        return flow_sde(sigmas, step_index, noise_level, device=device)
    if sde_type == "cps":
        return flow_cps(sigmas, step_index, noise_level, device=device)
    if sde_type == "ode":
        return flow_ode(sigmas, step_index, device=device)
    raise ValueError(f"sde_type must be 'sde', 'cps' or 'ode', got {sde_type!r}")


def lcm(alphas_cumprod, timestep, prev_timestep, c_skip: float, c_out: float, prediction_type: str = "epsilon", *,
        last: bool = False, noise: bool = True, final_alpha_cumprod: float | None = None, device=None) -> StepCoeffs:
    """The Latent Consistency Model's multistep step (RLCM's policy), as an affine Gaussian step.

    With ``A = alphas_cumprod[t]``, ``A' = alphas_cumprod[t_prev]`` and the boundary scalings ``c_skip,
    c_out`` of ``t``, the consistency function's output is ``denoised = c_skip x + c_out x0(x, v)`` (``x0``
    from the prediction as in :func:`ddim`), and the step re-noises it to ``t_prev``::

        mean = sqrt(A') denoised,   s = sqrt(1 - A')     (every step but the last; LCMScheduler.step)
        mean = denoised,            s = 0                (the last step: the sample itself)

    ``noise=False`` gives the step's mean alone (s = 0). Clipping or thresholding x0 is not affine: not
    supported (the sampler refuses such configs).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    ac = _schedule("alphas_cumprod", alphas_cumprod)
    A = ac[int(timestep)].to(torch.float64)
    if last:
        m = torch.ones((), dtype=torch.float64)
        s = torch.zeros((), dtype=torch.float64)
    else:
        Ap = ac[int(prev_timestep)].to(torch.float64) if int(prev_timestep) >= 0 else \
            torch.tensor(float(final_alpha_cumprod if final_alpha_cumprod is not None else 1.0), dtype=torch.float64)
        m = Ap.sqrt()
        s = (1 - Ap).sqrt() if noise else torch.zeros((), dtype=torch.float64)
    sa, sb = A.sqrt(), (1 - A).sqrt()
    if prediction_type == "epsilon":  # x0 = (x - sqrt(1-A) v) / sqrt(A)
        kx, kv = c_skip + c_out / sa, -c_out * sb / sa
    elif prediction_type == "v_prediction":  # x0 = sqrt(A) x - sqrt(1-A) v
        kx, kv = c_skip + c_out * sa, -c_out * sb
    else:  # sample: x0 = v
        kx, kv = torch.tensor(float(c_skip), dtype=torch.float64), torch.tensor(float(c_out), dtype=torch.float64)
    return _finish(m * kx, m * kv, s, device)


def lcm_from_scheduler(scheduler, step_index: int, *, noise: bool = True, device=None) -> StepCoeffs:
    """``lcm`` for an ``LCMScheduler`` after ``set_timesteps``: step ``step_index``'s timestep, the next one
    (the last step keeps its own), the boundary scalings and the prediction type, as its ``step`` reads them."""
    config = scheduler.config
    if getattr(config, "clip_sample", False) or getattr(config, "thresholding", False):
        raise ValueError("the LCM scheduler clips or thresholds x0 (clip_sample/thresholding): its step is not an "
                         "affine Gaussian step; build it with clip_sample=False, thresholding=False")
    ts = scheduler.timesteps
    if ts is None or scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) first")
    t = int(ts[step_index])
    last = step_index == scheduler.num_inference_steps - 1
    prev = int(ts[step_index + 1]) if step_index + 1 < len(ts) else t
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    return lcm(scheduler.alphas_cumprod, t, prev, float(c_skip), float(c_out), config.prediction_type, last=last,
               noise=noise, final_alpha_cumprod=float(scheduler.final_alpha_cumprod), device=device)


def ddim_from_scheduler(scheduler, timestep, eta: float, *, device=None) -> StepCoeffs:
    """``ddim`` for a ``DDIMScheduler`` after ``set_timesteps``: the previous timestep, the final alpha
    and the prediction type are read from the scheduler, as its own ``step`` does."""
    config = scheduler.config
    if getattr(config, "clip_sample", False) or getattr(config, "thresholding", False):
        raise ValueError("the scheduler clips or thresholds x0 (clip_sample/thresholding), so its step is "
                         "not an affine Gaussian step; build it with clip_sample=False, thresholding=False")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) first")
    ratio = config.num_train_timesteps // scheduler.num_inference_steps
    t = timestep if isinstance(timestep, int) else torch.as_tensor(timestep).to(torch.int64)
    prev = t - ratio
    return ddim(scheduler.alphas_cumprod, t, prev, eta, config.prediction_type,
                final_alpha_cumprod=float(scheduler.final_alpha_cumprod), device=device)

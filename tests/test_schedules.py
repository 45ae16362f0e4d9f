"""Schedule coefficients against each paper's step written the long way, and against diffusers.

The long-way steps below are written independently of diffrl.schedules: they form x0 and the noise
estimate, compute the standard deviation from the schedule, and build the next latent from them, in
float64. The coefficient functions must reproduce them through sde_step's affine form.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffrl import schedules
from diffrl.ops import sde_step
from diffrl.schedules import StepCoeffs


def _flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    return sched.sigmas.clone()


def _affine(coeffs: StepCoeffs, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (x.dim() - 1)
    a, c = (t.to(torch.float64).reshape(shape) if t.dim() else t.double() for t in (coeffs.a, coeffs.c))
    return a * x + c * v


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


# ---- Flow-GRPO SDE step, the long way: drift v - (std^2/2) * score, score = -eps_hat / sigma ----

def _flow_sde_long_way(x, v, sigmas, i, eta, eps):
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    dt = sigma_next - sigma
    guard = float(sigmas[1]) if sigma == 1.0 else sigma
    std = eta * math.sqrt(sigma / (1 - guard))
    eps_hat = x + (1 - sigma) * v              # noise estimate, since x = (1-sigma) x0 + sigma eps
    score = -eps_hat / sigma
    mean = x + (v - 0.5 * std**2 * score) * dt
    step_std = std * math.sqrt(-dt)
    return mean, mean + step_std * eps, step_std


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("steps", [10, 7])
def test_flow_sde_matches_long_way(eta, steps):
    sigmas = _flow_sigmas(steps)
    x, v, eps = _rand(2, 3, 5, 7), _rand(2, 3, 5, 7), _rand(2, 3, 5, 7)
    for i in range(steps):  # includes sigma == 1 (the guard) and the last step to sigma = 0
        mean, nxt, std = _flow_sde_long_way(x, v, sigmas, i, eta, eps)
        coeffs = schedules.flow_sde(sigmas, i, eta)
        assert coeffs.stochastic
        torch.testing.assert_close(coeffs.s.double(), torch.tensor(std, dtype=torch.float64), rtol=1e-6, atol=0)
        torch.testing.assert_close(_affine(coeffs, x, v), mean, rtol=2e-6, atol=2e-6)
        out = sde_step(x, v, coeffs, noise=eps, backend="torch")
        torch.testing.assert_close(out.prev_sample, nxt, rtol=2e-6, atol=2e-6)
        logp = torch.distributions.Normal(mean, std).log_prob(nxt).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob.double(), logp, rtol=1e-5, atol=1e-5)


# ---- Coefficients-preserving step, the long way ----

@pytest.mark.parametrize("eta", [0.2, 0.5, 0.9])
def test_flow_cps_matches_long_way(eta):
    sigmas = _flow_sigmas(8, shift=1.0)
    x, v, eps = _rand(3, 4, 6), _rand(3, 4, 6), _rand(3, 4, 6)
    for i in range(7):  # the last step has sigma' = 0, hence s = 0
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = x - sigma * v
        eps_hat = x + (1 - sigma) * v
        std = sigma_next * math.sin(eta * math.pi / 2)
        mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * eps_hat
        coeffs = schedules.flow_cps(sigmas, i, eta)
        torch.testing.assert_close(_affine(coeffs, x, v), mean, rtol=2e-6, atol=2e-6)
        out = sde_step(x, v, coeffs, noise=eps, backend="torch")
        torch.testing.assert_close(out.prev_sample, mean + std * eps, rtol=2e-6, atol=2e-6)
    last = schedules.flow_cps(sigmas, 7, eta)
    assert not last.stochastic and float(last.s) == 0.0


# ---- DDIM with eta (DDPO), the long way ----

def _alphas_cumprod():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    return torch.cumprod(1 - betas, 0)


def _ddim_long_way(x, v, alphas, t, t_prev, eta, prediction_type, final_alpha):
    A = float(alphas[t])
    A_prev = float(alphas[t_prev]) if t_prev >= 0 else final_alpha
    if prediction_type == "epsilon":
        eps = v
        x0 = (x - math.sqrt(1 - A) * eps) / math.sqrt(A)
    elif prediction_type == "v_prediction":
        x0 = math.sqrt(A) * x - math.sqrt(1 - A) * v
        eps = math.sqrt(A) * v + math.sqrt(1 - A) * x
    else:
        x0 = v
        eps = (x - math.sqrt(A) * x0) / math.sqrt(1 - A)
    variance = (1 - A_prev) / (1 - A) * (1 - A / A_prev)
    std = eta * math.sqrt(variance)
    mean = math.sqrt(A_prev) * x0 + math.sqrt(1 - A_prev - std**2) * eps
    return mean, std


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_matches_long_way(prediction_type, eta):
    alphas = _alphas_cumprod()
    x, v, eps = _rand(2, 4, 5, 5), _rand(2, 4, 5, 5), _rand(2, 4, 5, 5)
    for t, t_prev in [(999, 979), (501, 481), (41, 21), (21, 1), (20, -1)]:
        mean, std = _ddim_long_way(x, v, alphas, t, t_prev, eta, prediction_type, final_alpha=0.99915)
        coeffs = schedules.ddim(alphas, t, t_prev, eta, prediction_type, final_alpha_cumprod=0.99915)
        torch.testing.assert_close(coeffs.s.double(), torch.tensor(std, dtype=torch.float64), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(_affine(coeffs, x, v), mean, rtol=1e-5, atol=1e-5)
        if std > 0:
            out = sde_step(x, v, coeffs, noise=eps, backend="torch")
            torch.testing.assert_close(out.prev_sample, mean + std * eps, rtol=1e-5, atol=1e-5)


def test_per_sample_indices_equal_stacked_scalars():
    sigmas = _flow_sigmas(10)
    idx = torch.tensor([0, 3, 9, 3, 5])
    for fn in (lambda i: schedules.flow_sde(sigmas, i, 0.7), lambda i: schedules.flow_cps(sigmas, i, 0.4),
               lambda i: schedules.flow_ode(sigmas, i)):
        batched = fn(idx)
        assert batched.batch_size == 5
        for name in "acs":
            stacked = torch.stack([getattr(fn(int(i)), name) for i in idx])
            assert torch.equal(getattr(batched, name), stacked)
    alphas = _alphas_cumprod()
    t, tp = torch.tensor([981, 501, 21]), torch.tensor([961, 481, -1])
    batched = schedules.ddim(alphas, t, tp, 1.0, final_alpha_cumprod=1.0)
    for name in "acs":
        stacked = torch.stack([getattr(schedules.ddim(alphas, int(a), int(b), 1.0, final_alpha_cumprod=1.0), name)
                               for a, b in zip(t, tp)])
        assert torch.equal(getattr(batched, name), stacked)


# ---- Against diffusers: at noise level 0 / eta 0 the mean is the scheduler's own step ----

@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("sde_type", ["sde", "cps", "ode"])
def test_flow_noise_zero_is_flow_match_euler(shift, sde_type):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    steps = 9
    sched.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn_like(x)
        expected = sched.step(v, t, x, return_dict=False)[0]
        coeffs = schedules.flow_sde_from_scheduler(sched, i, 0.0, sde_type=sde_type)
        assert not coeffs.stochastic
        got = coeffs.a * x + coeffs.c * v
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        x = expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_eta_zero_is_ddim_scheduler(prediction_type, set_alpha_to_one):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type, steps_offset=1)
    sched.set_timesteps(10)
    x = torch.randn(2, 4, 8, 8)
    for t in sched.timesteps:
        v = torch.randn_like(x)
        expected = sched.step(v, t, x, eta=0.0, return_dict=False)[0]
        coeffs = schedules.ddim_from_scheduler(sched, int(t), 0.0)
        got = coeffs.a * x + coeffs.c * v
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        x = expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta_positive_is_ddim_scheduler_with_variance_noise(prediction_type):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, prediction_type=prediction_type, steps_offset=1)
    sched.set_timesteps(12)
    x = torch.randn(3, 4, 8, 8)
    for t in sched.timesteps[:-1]:  # the last step to alphas_cumprod[0] keeps a tiny s; checked below
        v, noise = torch.randn_like(x), torch.randn_like(x)
        expected = sched.step(v, t, x, eta=1.0, variance_noise=noise, return_dict=False)[0]
        out = sde_step(x, v, schedules.ddim_from_scheduler(sched, int(t), 1.0), noise=noise, backend="torch")
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-5, atol=1e-5)
        x = expected


# ---- StepCoeffs and sde_step agree on which steps are stochastic ----

def test_ode_step_is_refused_by_sde_step():
    coeffs = schedules.flow_ode(_flow_sigmas(5), 2)
    assert not coeffs.stochastic
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="s"):
        sde_step(x, torch.randn_like(x), coeffs, noise=torch.randn_like(x))


def test_device_argument_moves_without_recheck():
    coeffs = schedules.flow_sde(_flow_sigmas(5), 1, 0.5, device="cpu")
    assert coeffs.a.device.type == "cpu" and coeffs.a.dtype == torch.float32


# ---- Bad input ----

def test_bad_inputs():
    sigmas = _flow_sigmas(6)
    alphas = _alphas_cumprod()
    with pytest.raises(ValueError, match="step_index"):
        schedules.flow_sde(sigmas, 6, 0.7)  # no next sigma
    with pytest.raises(ValueError, match="step_index"):
        schedules.flow_sde(sigmas, torch.tensor([0, -1]), 0.7)
    with pytest.raises(TypeError, match="step_index"):
        schedules.flow_sde(sigmas, 1.0, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        schedules.flow_sde(sigmas, 1, -0.1)
    with pytest.raises(ValueError, match="noise_level"):
        schedules.flow_sde(sigmas, 1, float("nan"))
    with pytest.raises(ValueError, match="noise_level"):
        schedules.flow_cps(sigmas, 1, 1.5)
    with pytest.raises(ValueError, match="decrease"):
        schedules.flow_sde(sigmas.flip(0), 1, 0.7)
    with pytest.raises(ValueError, match="sigmas"):
        schedules.flow_sde(torch.tensor([1, 0]), 0, 0.7)  # integer tensor
    with pytest.raises(ValueError, match="prediction_type"):
        schedules.ddim(alphas, 981, 961, 1.0, "x0")
    with pytest.raises(ValueError, match="prev_timestep"):
        schedules.ddim(alphas, 500, 500, 1.0)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        schedules.ddim(alphas, 20, -1, 1.0)
    with pytest.raises(ValueError, match="timestep"):
        schedules.ddim(alphas, 1000, 980, 1.0)
    with pytest.raises(ValueError, match="eta"):
        schedules.ddim(alphas, 981, 961, 3.0)
    with pytest.raises(ValueError, match="sde_type"):
        schedules.flow_sde_from_scheduler(FlowMatchEulerDiscreteScheduler(), 0, 0.5, sde_type="sde2")
    clipped = DDIMScheduler(clip_sample=True)
    clipped.set_timesteps(10)
    with pytest.raises(ValueError, match="clip_sample"):
        schedules.ddim_from_scheduler(clipped, 901, 1.0)
    with pytest.raises(ValueError, match="s must be >= 0"):
        StepCoeffs(1.0, 1.0, -0.5)
    with pytest.raises(ValueError, match="non-finite"):
        StepCoeffs(float("inf"), 1.0, 0.5)

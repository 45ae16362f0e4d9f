"""``FlowSDESampler``: Flow-GRPO's SDE (or the coefficients-preserving step) on a rectified-flow
pipeline (SD3 / SD3.5, FLUX.1)."""

from __future__ import annotations

from diffrl import schedules
from diffrl.samplers.base import BaseSampler
from diffrl.schedules import StepCoeffs

SDE_TYPES = ("sde", "cps")


class FlowSDESampler(BaseSampler):
    """Sample a flow-matching pipeline with stochastic steps and record their log-probs.

    ``noise_level`` is Flow-GRPO's ``eta`` for ``sde_type="sde"`` (std ``eta sqrt(sigma / (1 -
    sigma))``, see ``diffrl.schedules.flow_sde``) or the CPS angle in [0, 1] for ``sde_type="cps"``
    (``diffrl.schedules.flow_cps``). Steps outside ``sde_steps`` are Euler (ODE) steps, as the
    pipeline's ``FlowMatchEulerDiscreteScheduler`` takes them; with ``noise_level=0`` every step is,
    and the rollout's images are the pipeline's for the same generator.

    The schedule is that of a ``FlowMatchEulerDiscreteScheduler`` built from ``pipe.scheduler``'s
    config (the pipeline's own scheduler object is not touched); the pipeline's timestep logic
    (FLUX's sigmas and resolution shift, SD3's optional dynamic shift) is reproduced by the adapter.
    Options of that config that change the step itself (``stochastic_sampling``) are not honoured:
    the step is always the one described here.
    """

    kind = "flow"

    def __init__(self, pipe, noise_level: float = 0.7, sde_type: str = "sde", sde_steps=None, **kwargs):
        super().__init__(pipe, sde_steps, **kwargs)
        if sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type must be one of {SDE_TYPES}, got {sde_type!r}")
        high = 1.0 if sde_type == "cps" else None
        self.noise_level = schedules._level("noise_level", noise_level, 0.0, high)
        self.sde_type = sde_type

    def _make_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

        return FlowMatchEulerDiscreteScheduler.from_config(self.adapter.scheduler_config())

    def _coeffs(self, scheduler, i, t, stochastic) -> StepCoeffs:
        # sigmas copied to the host once per rollout (set_timesteps puts them on the device)
        sigmas = getattr(scheduler, "_diffrl_host_sigmas", None)
        if sigmas is None:
            if getattr(scheduler, "sigmas", None) is None:
                raise ValueError("the scheduler has no sigmas after set_timesteps")
            sigmas = scheduler.sigmas.detach().cpu()
            scheduler._diffrl_host_sigmas = sigmas
        if not stochastic or self.noise_level == 0:
            return schedules.flow_ode(sigmas, i)
        if self.sde_type == "cps":
            return schedules.flow_cps(sigmas, i, self.noise_level)
        return schedules.flow_sde(sigmas, i, self.noise_level)

    def _forward_noise(self, scheduler, i, t, x0, eps):
        sigma = float(scheduler.sigmas[i])  # rectified flow: x_sigma = (1 - sigma) x0 + sigma eps
        return (1 - sigma) * x0 + sigma * eps

    def _info(self):
        return {"noise_level": self.noise_level, "sde_type": self.sde_type}

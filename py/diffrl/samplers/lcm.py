"""``LCMSampler``: the Latent Consistency Model's multistep sampling as recorded Gaussian steps (RLCM)."""

from __future__ import annotations

from diffrl import schedules
from diffrl.samplers.base import BaseSampler
from diffrl.schedules import StepCoeffs


class LCMSampler(BaseSampler):
    """Sample a ``LatentConsistencyModelPipeline`` and record its steps' log-probs.

    LCM's multistep sampler is stochastic by construction: each step maps the latent to the consistency
    function's clean estimate and re-noises it to the next timestep with fresh noise (``LCMScheduler.step``).
    That is the policy RLCM trains, an affine Gaussian step (``diffrl.schedules.lcm``), so this sampler
    needs no noise level: with every step recorded (the default) its images are the pipeline's for the same
    generator (the noise is drawn in the same order). Steps outside ``sde_steps`` take the step's mean.
    The last step is deterministic (it returns the clean estimate) and records nothing.
    """

    kind = "lcm"

    def __init__(self, pipe, sde_steps=None, **kwargs):
        super().__init__(pipe, sde_steps, **kwargs)
        cfg = self.adapter.scheduler_config()
        if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
            raise ValueError("the pipeline's LCMScheduler clips or thresholds x0 (clip_sample / thresholding): that "
                             "step is not an affine Gaussian step; rebuild it with clip_sample=False, "
                             "thresholding=False")

    def _make_scheduler(self):
        from diffusers import LCMScheduler  # noqa: PLC0415

        return LCMScheduler.from_config(self.adapter.scheduler_config())

    def _coeffs(self, scheduler, i, t, stochastic) -> StepCoeffs:
        return schedules.lcm_from_scheduler(scheduler, i, noise=stochastic)

    def _forward_noise(self, scheduler, i, t, x0, eps):
        a = float(scheduler.alphas_cumprod[int(t)])
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * eps

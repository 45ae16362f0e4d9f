"""``DDIMSampler``: DDPO's stochastic DDIM step on a UNet pipeline (SD 1.x / 2.x, SDXL)."""

from __future__ import annotations

import warnings

from diffrl import schedules
from diffrl.samplers.base import BaseSampler
from diffrl.schedules import StepCoeffs


class DDIMSampler(BaseSampler):
    """Sample a UNet pipeline with DDIM steps of stochasticity ``eta`` and record their log-probs.

    ``eta = 1`` is DDPO's default; ``eta = 0`` is plain DDIM, and with it the rollout's images are
    the pipeline's for the same generator when ``pipe.scheduler`` is a ``DDIMScheduler``. Epsilon and
    v-prediction come from the scheduler config.

    The scheduler is a ``DDIMScheduler`` built from ``pipe.scheduler.config`` (as DDPO does; the
    pipeline's own scheduler is not touched). DDIM steps that clip or threshold x0 are not affine
    Gaussian steps, so:

    * if ``pipe.scheduler`` is itself a DDIMScheduler with ``clip_sample`` or ``thresholding`` on,
      the sampler refuses it (its drop-in output could not match the pipeline's);
    * if the pipeline has another scheduler (Euler, PNDM, DDPM ...) whose config has them on, the
      DDIM scheduler is built with ``clip_sample=False, thresholding=False`` and a warning says so.
    """

    kind = "ddim"

    def __init__(self, pipe, eta: float = 1.0, sde_steps=None, **kwargs):
        super().__init__(pipe, sde_steps, **kwargs)
        self.eta = schedules._level("eta", eta, 0.0, 1.0)
        self._config_overrides = {}
        from diffusers import DDIMScheduler  # noqa: PLC0415

        cfg = self.adapter.scheduler_config()
        clips = bool(cfg.get("clip_sample", False)) or bool(cfg.get("thresholding", False))
        if clips:
            if isinstance(pipe.scheduler, DDIMScheduler):
                raise ValueError("pipe.scheduler is a DDIMScheduler that clips or thresholds x0 (clip_sample / "
                                 "thresholding): that step is not an affine Gaussian step. Rebuild it with "
                                 "DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, "
                                 "thresholding=False)")
            warnings.warn(f"{type(pipe.scheduler).__name__}'s config clips or thresholds x0; DDIMSampler's "
                          "DDIMScheduler is built with clip_sample=False, thresholding=False", stacklevel=2)
            self._config_overrides = {"clip_sample": False, "thresholding": False}

    def _make_scheduler(self):
        from diffusers import DDIMScheduler  # noqa: PLC0415

        return DDIMScheduler.from_config(self.adapter.scheduler_config(), **self._config_overrides)

    def _coeffs(self, scheduler, i, t, stochastic) -> StepCoeffs:
        # alphas_cumprod stay on the host in DDIMScheduler; t is a host int. The config's steps_offset
        # (1 for SD 1.5) is already in t (set_timesteps adds it with "leading" spacing), and the step
        # goes back num_train_timesteps // T from there, as DDIMScheduler.step does; the offset reaches
        # our scheduler because the family's scheduler_config() spells every value out (issue #22;
        # tests/test_ddim_steps_offset.py compares both with diffusers)
        return schedules.ddim_from_scheduler(scheduler, int(t), self.eta if stochastic else 0.0)

    def _forward_noise(self, scheduler, i, t, x0, eps):
        a = float(scheduler.alphas_cumprod[int(t)])  # q(x_t | x0) = N(sqrt(A) x0, (1 - A) I)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * eps

    def _info(self):
        return {"eta": self.eta}

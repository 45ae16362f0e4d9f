"""Drop-in samplers for diffusers pipelines: rollouts with the log-probs of their stochastic steps.

::

    from diffrl.samplers import FlowSDESampler, DDIMSampler, Rollout

    sampler = FlowSDESampler(pipe, noise_level=0.7, sde_type="sde", sde_steps=None)   # SD3, FLUX
    sampler = DDIMSampler(pipe, eta=1.0, sde_steps=None)                              # SD 1.x/2.x, SDXL
    sampler = LCMSampler(pipe)                                                        # LCM (RLCM)
    rollout = sampler.sample(prompts, num_images_per_prompt=G, num_inference_steps=T, guidance_scale=w,
                             generator=torch.Generator().manual_seed(0))
    out = sampler.score(rollout, j, reference=DISABLE_ADAPTERS)   # out.log_prob, out.kl (with grad)

The pipeline is not modified. See ``base`` for the loop and the generator's draw order, ``rollout``
for what is stored, ``families`` for the supported model families (one module each) and ``lora``
for the LoRA helpers; random-weight test pipelines are in ``diffrl.models.tiny``.
"""

from diffrl.samplers.families import Adapter, get_adapter, register_adapter, supported_pipelines
from diffrl.samplers.base import DISABLE_ADAPTERS, BaseSampler, resolve_sde_steps
from diffrl.samplers.ddim import DDIMSampler
from diffrl.samplers.flow import FlowSDESampler
from diffrl.samplers.lcm import LCMSampler
from diffrl.samplers.rollout import Rollout

__all__ = ["Adapter", "BaseSampler", "DDIMSampler", "DISABLE_ADAPTERS", "FlowSDESampler", "LCMSampler", "Rollout",
           "get_adapter",
           "register_adapter", "resolve_sde_steps", "supported_pipelines"]

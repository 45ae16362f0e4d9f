"""``RewardBackpropTrainer``: direct reward backpropagation through the sampling chain (AlignProp, DRaFT).

No policy gradient: each minibatch's images are sampled (deterministic ODE / DDIM eta 0 steps) with autograd
on the last ``grad_steps`` steps (DRaFT-K; ``grad_steps = num_inference_steps`` is AlignProp's full chain),
decoded, scored by a *differentiable* reward, and the loss is ``-mean(reward)``. ``checkpoint_steps``
recomputes each differentiable step's model call in the backward pass (the memory of one step instead of
``grad_steps``). ``draft_lv = n`` (DRaFT-LV, with ``grad_steps: 1``): the chain runs without autograd to the
final latent ``x0``, which is noised ``n`` times back to the last step's input, ``x = (1 - sigma) x0 + sigma eps``
(flow models) or ``sqrt(A) x0 + sqrt(1 - A) eps`` (DDIM), and each is stepped once with autograd: the gradient
is the mean over the ``n`` re-noisings (lower variance for one model call more each).

The reward must be differentiable in the images (a torch function of them: aesthetic / CLIP / PickScore
heads, or a callable); a reward that detaches them (the shapes verifier, JPEG sizes) is refused with a clear
error at the first step. Works on flow-matching and DDIM families alike (the sampler follows the family).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffrl.trainers.base import BaseTrainer
from diffrl.trainers.data import EpochData
from diffrl.trainers.objectives import Objective

__all__ = ["PromptBatch", "PromptSource", "RewardBackpropObjective", "RewardBackpropTrainer"]


@dataclass
class PromptBatch:
    """An epoch's samples before they are drawn: ``prompts[i]`` and the seed of sample ``i``'s noise."""

    prompts: list[str]
    seeds: torch.Tensor  # [B] int64

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx) -> PromptBatch:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return PromptBatch([self.prompts[i] for i in idx.tolist()], self.seeds[idx])


class PromptSource:
    """The data of a reward-backprop epoch: ``prompts_per_epoch`` prompts x ``group_size`` samples with one
    seed each (drawn from the epoch's generator); nothing is sampled until the objective's loss."""

    def __init__(self, trainer):
        from diffrl.trainers.data import RolloutSource  # noqa: PLC0415

        self.trainer = trainer
        self.config = trainer.config
        self._prompts = RolloutSource(trainer).prompts  # the same prompt draw as the RL trainers

    def collect(self, epoch: int) -> EpochData:
        prompts, _ = self._prompts(epoch)
        G = self.config.group_size
        expanded = [p for p in prompts for _ in range(G)]
        seeds = torch.randint(2**62, (len(expanded),), generator=self.trainer._generator(epoch, 1, self.trainer.rank))
        return EpochData(PromptBatch(expanded, seeds), torch.ones(len(expanded)), {"samples": len(expanded)})


class RewardBackpropObjective(Objective):
    """``-mean(reward)`` of images sampled with autograd (module docstring)."""

    def prepare(self, epoch, batch, advantages):
        return {"gen": self.trainer._generator(epoch, 2, self.trainer.rank), "B": len(batch)}

    def order(self, state, inner):
        return torch.randperm(state["B"], generator=state["gen"])

    def images(self, sub: PromptBatch) -> torch.Tensor:
        """The minibatch's images, differentiable through the trained steps."""
        tr, cfg = self.trainer, self.config
        gens = [torch.Generator().manual_seed(int(s)) for s in sub.seeds]
        kw = dict(num_images_per_prompt=1, num_inference_steps=cfg.num_inference_steps,
                  guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution, generator=gens)
        if cfg.draft_lv == 0:
            return tr.sampler.sample(list(sub.prompts), grad=True, grad_steps=cfg.grad_steps,
                                     checkpoint_steps=cfg.checkpoint_steps, **kw).images
        # DRaFT-LV: the chain without autograd, then n re-noisings of x0 stepped once each with it
        with torch.no_grad():
            r = tr.sampler.sample(list(sub.prompts), decode=False, keep_final_latents=True, **kw)
        x0 = r.final_latents
        return torch.cat([tr.sampler.last_step_from(r, x0, gens) for _ in range(cfg.draft_lv)])

    def loss(self, state, sub, idx, term):
        tr, cfg = self.trainer, self.config
        images = self.images(sub)
        prompts = list(sub.prompts) * (cfg.draft_lv or 1)
        out = tr.reward_fn(images, prompts)
        reward = out["reward"] if isinstance(out, dict) else out
        if not isinstance(reward, torch.Tensor) or not reward.requires_grad:
            raise ValueError("trainer reward_backprop needs a reward that is differentiable in the images; this one "
                             "returned no gradient (the shapes verifier and the JPEG rewards are not differentiable: "
                             "use aesthetic / clip / pickscore, or pass reward=callable(images, prompts))")
        reward = reward.float().reshape(len(images), -1).mean(1)
        return -reward.mean(), {"reward_mean": reward.detach().mean()}


class RewardBackpropTrainer(BaseTrainer):
    """ODE sampling with autograd on the last steps, a differentiable reward, ``-reward`` as the loss (kind
    ``reward_backprop``, diffrl.trainers.kinds)."""

    objective_class = RewardBackpropObjective
    data_source_class = PromptSource

    def make_sampler(self, pipe):
        from diffrl.samplers import DDIMSampler, FlowSDESampler  # noqa: PLC0415
        from diffrl.samplers.families import get_adapter  # noqa: PLC0415

        if get_adapter(pipe).kind == "flow":
            return FlowSDESampler(pipe, noise_level=0.0)
        return DDIMSampler(pipe, eta=0.0)

    def compute_advantages(self, rewards, group_ids, prompts, heads=None, rollout=None):
        raise NotImplementedError("reward backpropagation has no advantages: the reward's gradient is the signal")

"""``NFTTrainer``: group-relative policy optimisation on the *forward* process (DiffusionNFT-style).

GRPO (``GRPOTrainer``) pushes up the log-probability of the stochastic reverse steps that led to a good
image. Its gradient is the sampled noise times the advantage, so in a latent of thousands of dimensions
most of it is noise (docs/demo-experiments.md measures 0.1-1.6 % signal per 64-image batch on the shapes model).
This trainer learns from the same rollouts and the same group-normalised advantages through the
flow-matching loss instead: each sampled image ``x0`` is noised afresh, ``x_t = (1 - t) x0 + t eps``,
and the model is pulled towards predicting the images with a positive advantage and pushed away
from those with a negative one:

    r     = clamp(0.5 + A / (2 nft_adv_scale), 0, 1)          (optimality of the sample, 0.5 = average)
    x_old = x_t - t v_old(x_t)                                 (the sampling policy, no gradient)
    x_pos = (1 - beta) x_old + beta x_theta                    (the implicit positive policy)
    x_neg = (1 + beta) x_old - beta x_theta                    (the implicit negative policy)
    loss  = mean[ r |x_pos - x0|^2 + (1 - r) |x_neg - x0|^2 ]

At ``theta = old`` the gradient is ``2 beta (2r - 1)(x_old - x0)``: a flow-matching step towards
the better images and away from the worse, with the common part of the group cancelling. The loss is
measured on the predicted clean latent (``x_t - t v``), like the shapes model's pre-training.

Sampling needs no log-probs: ``noise_level`` 0 (the default) samples with the deterministic ODE, and
any flow-matching family of ``FlowSDESampler`` works. The "old" predictions are those of the weights
that sampled the epoch, computed before the epoch's first update (no frozen copy of the model).
``train_guided``: train the classifier-free-guided velocity the sampler used (two model calls per
sample), rather than the conditional one alone.
``nft_negative_weight`` (w in [0, 1]) scales how far below 0.5 the worse samples' r goes: at r = 0.5 a
sample's loss is ``|x_theta - x_old|^2`` plus a constant, so w = 0 pulls towards the better samples only
and the others hold the update near the sampling policy.
``nft_group_noise``: one noise level and noise draw per group instead of per sample (common random
numbers), so that the part of each sample's loss that comes from the noise draw cancels in the group's
advantage-weighted sum.
``nft_old_policy: ema`` (DiffusionNFT's off-policy option): the rollouts are sampled, and ``v_old`` is
evaluated, with an EMA of the trained weights, ``old <- d old + (1 - d) trained`` after each epoch's
updates (``d`` = ``nft_old_decay``, ramped linearly from 0 over ``nft_old_decay_ramp`` epochs); it starts
at the initial weights, and checkpoints keep it (``"nft_old_policy"``) for an exact resume.
"""

from __future__ import annotations

import torch

from diffrl.trainers.grpo import GRPOTrainer
from diffrl.trainers.objectives import NFTObjective

__all__ = ["NFTTrainer"]


class NFTTrainer(GRPOTrainer):
    """GRPO's sampler and advantages, NFT's objective (:class:`diffrl.trainers.objectives.NFTObjective`)."""

    objective_class = NFTObjective

    old_policy = None  # nft_old_policy: ema: float32 copy of the sampling ('old') weights

    def extra_weight_copies(self):
        if self.config.nft_old_policy != "ema":
            return {}
        self.old_policy = self.copy_weights()  # the initial weights (a resume overwrites them)
        return {"nft_old_policy": self.old_policy}

    def sampling_weights(self):
        return super().sampling_weights() if self.old_policy is None else self.weights_of(self.old_policy)

    def old_decay(self, epoch: int) -> float:
        """The old policy's EMA decay after epoch ``epoch`` (1-based, as the loop counts)."""
        cfg = self.config
        ramp = cfg.nft_old_decay_ramp
        return cfg.nft_old_decay if ramp == 0 else cfg.nft_old_decay * min(1.0, epoch / ramp)

    def train_epoch(self, epoch, batch, advantages):
        res = super().train_epoch(epoch, batch, advantages)
        if self.old_policy is not None:
            d = self.old_decay(epoch)
            with torch.no_grad():
                for n, p in self.trainable.items():
                    self.old_policy[n].mul_(d).add_(self.parallel.local(p).detach().float(), alpha=1 - d)
            res["old_policy_decay"] = d
        return res

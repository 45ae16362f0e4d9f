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
"""

from __future__ import annotations

import torch

from diffrl.trainers.config import NFTConfig
from diffrl.trainers.grpo import GRPOTrainer

__all__ = ["NFTTrainer"]


def _first_of_group(group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the first sample of each sample's group."""
    ids = group_ids.long().cpu()
    first: dict[int, int] = {}
    return torch.tensor([first.setdefault(int(g), i) for i, g in enumerate(ids)], dtype=torch.long)


class NFTTrainer(GRPOTrainer):
    config_class = NFTConfig
    kind = "nft"
    keep_final_latents = True  # the loss trains on the sampled images' latents

    def _velocity(self, model, sub, x_t, t):
        """The trained velocity of minibatch ``sub`` at ``(x_t, t)``: the guided one (as sampled) when
        ``train_guided`` and the rollout used CFG, else the conditional one."""
        sampler = self.sampler
        guided = self.config.train_guided and sub.guidance_scale is not None
        emb = sampler.model_batch(sub.embeddings(), sub.embeddings(uncond=True) if guided else None)
        v_cond, v_uncond = sampler.predict(x_t, t, emb, sub.shared, cfg=guided, model=model)
        return sampler.guide(v_cond, v_uncond, sub.guidance_scale)

    def prepare_training(self, epoch: int, rollout, advantages: torch.Tensor) -> dict:
        """Per inner epoch: an order of the samples, a noise level t and a noise draw per sample, and
        the sampling policy's prediction there (before any update: the 'old' policy of the loss)."""
        cfg = self.config
        x0 = rollout.final_latents
        B = len(rollout)
        gen = self._generator(epoch, 2, self.rank)
        num_train = float(getattr(getattr(self.pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000))
        adv = advantages.to(x0.device).float()
        plan = []
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(B, generator=gen)
            # logit-normal t (more weight mid-trajectory, where layout and content are decided)
            t = torch.sigmoid(torch.randn(B, generator=gen)).to(x0.device)
            eps = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            if cfg.nft_group_noise:
                # the group's first sample's (t, eps) for all of it: the advantages sum to ~0 over a
                # group, so what the samples' losses share (the noise's own error) cancels in the update
                first = _first_of_group(rollout.group_ids).to(x0.device)
                t, eps = t[first], eps[first]
            tt = t.view(-1, *[1] * (x0.dim() - 1))
            x_t = (1 - tt) * x0 + tt * eps
            x_old = torch.empty_like(x0)
            with torch.no_grad(), self.accelerator.autocast():
                for idx in perm.split(cfg.train_batch_size):
                    d = idx.to(x0.device)
                    v = self._velocity(self.model, rollout[idx], x_t[d], t[d] * num_train)
                    x_old[d] = x_t[d] - tt[d] * v.float()
            plan.append({"perm": perm, "t": t, "x_t": x_t, "x_old": x_old})
        r = (0.5 + adv / (2 * cfg.nft_adv_scale)).clamp(0, 1)
        if cfg.nft_negative_weight != 1.0:
            # below-average samples: r = 0.5 is |x_theta - x_old|^2 + const, no push, only the anchor
            r = torch.where(r < 0.5, 0.5 - cfg.nft_negative_weight * (0.5 - r), r)
        return {"x0": x0, "r": r, "plan": plan, "num_train": num_train}

    def inner_epoch_order(self, state: dict, inner: int) -> torch.Tensor:
        state["inner"] = inner  # the loop asks for an inner epoch's order before its minibatches' losses
        return state["plan"][inner]["perm"]

    def terms_per_minibatch(self, state: dict) -> int:
        return 1

    def minibatch_loss(self, state: dict, sub, idx: torch.Tensor, term: int):
        cfg = self.config
        p = state["plan"][state["inner"]]
        d = idx.to(state["x0"].device)
        x0, x_t, x_old, t = state["x0"][d], p["x_t"][d], p["x_old"][d], p["t"][d]
        tt = t.view(-1, *[1] * (x0.dim() - 1))
        v = self._velocity(self.model, sub, x_t, t * state["num_train"]).float()
        x_theta = x_t - tt * v
        beta = cfg.nft_beta
        x_pos = (1 - beta) * x_old + beta * x_theta
        x_neg = (1 + beta) * x_old - beta * x_theta
        r = state["r"][d]
        per_sample_pos = (x_pos - x0).pow(2).flatten(1).mean(1)
        per_sample_neg = (x_neg - x0).pow(2).flatten(1).mean(1)
        loss = (r * per_sample_pos + (1 - r) * per_sample_neg).mean()
        with torch.no_grad():
            drift = (x_theta - x_old).pow(2).flatten(1).mean(1).mean()  # how far the update has moved
        return loss, {"fm_loss_pos": per_sample_pos.mean().detach(), "policy_drift": drift}

"""What an epoch's updates minimise, apart from the loop that runs them.

The loop (``BaseTrainer.train_epoch``) cuts the epoch's samples into minibatches, takes the backward
passes, accumulates and steps the optimizer. An objective says what each pass's loss is:

* ``prepare(epoch, batch, advantages)``: what the epoch's loss needs, computed once before the first
  update (the old log-probs, the noised latents and old predictions, ...): a ``state`` dict;
* ``order(state, inner)``: the order of the samples in inner epoch ``inner``;
* ``terms(state)``: backward passes per minibatch (their mean is the minibatch's gradient);
* ``loss(state, sub, idx, term)``: ``(loss, stats)`` of one pass on the minibatch ``sub = batch[idx]``.

What the trainer builds for it: ``keep_final_latents`` (the rollouts keep the last latent), and
``needs_reference(config)`` (a frozen reference policy: a copy of the initial weights, or the LoRA
base with the adapters off). docs/adding-an-objective.md walks through adding one.
"""

from __future__ import annotations

import torch

__all__ = ["Objective", "PPOObjective", "NFTObjective"]


class Objective:
    keep_final_latents = False

    def __init__(self, trainer):
        self.trainer = trainer  # (config, sampler, the trained model, reference, generators, autocast)
        self.config = trainer.config

    @classmethod
    def needs_reference(cls, config) -> bool:
        return False

    def prepare(self, epoch: int, batch, advantages: torch.Tensor) -> dict:
        raise NotImplementedError

    def order(self, state: dict, inner: int) -> torch.Tensor:
        raise NotImplementedError

    def terms(self, state: dict) -> int:
        return 1

    def loss(self, state: dict, sub, idx: torch.Tensor, term: int):
        raise NotImplementedError


class PPOObjective(Objective):
    """The clipped PPO surrogate on the recorded steps' log-probs (GRPO, DDPO), plus ``kl_coef`` times the
    KL to the reference policy. Each sample trains on its own random subset of the recorded steps
    (``timestep_fraction``, as DDPO); one backward pass per trained step. ``step_weights`` (GRPO): the
    advantage at recorded step j is ``A * step_weights[j]``.

    ``grpo_guard`` (GRPO-Guard's regulated clipping): the sampling policy's guided prediction at every
    recorded step is computed once before the updates, and each step's log-ratio is re-centred and
    re-scaled, ``log r' = s (log p - log p_old + KL(p || p_old))``: with ``x' = mu_old + s eps`` that is
    ``reduce(eps * (mu - mu_old))``, whose mean is 0 and whose spread no longer grows as ``s`` shrinks
    (the plain log-ratio's mean is ``-KL``, left of 0, so the upper clip rarely bites). Each step's loss is
    weighted by ``1 / |c|`` (``c``: the step's velocity gain, ``(1 + noise_level^2 / 2) dt`` for Flow-GRPO's
    SDE, so this is the paper's ``1 / |dt|``), normalised to mean 1 over the recorded steps so that
    ``lr`` keeps its meaning."""

    @classmethod
    def needs_reference(cls, config) -> bool:
        return config.kl_coef > 0

    def prepare(self, epoch, batch, advantages):
        S = batch.num_steps
        if S == 0:
            raise ValueError("the sampler recorded no stochastic step (noise_level / eta 0, or an sde_window of "
                             "deterministic steps): there is no log-prob to train on")
        old = batch.log_probs.detach()
        weights = list(getattr(self.config, "step_weights", []))
        if weights and len(weights) != S:
            raise ValueError(f"step_weights has {len(weights)} entries but the sampler recorded {S} steps")
        state = {"old": old, "adv": advantages.to(old.device).float(), "S": S,
                 "n_steps": max(1, int(S * self.config.timestep_fraction)),
                 "step_weights": torch.tensor(weights, dtype=torch.float32, device=old.device) if weights else None,
                 "gen": self.trainer._generator(epoch, 2, self.trainer.rank), "guard": None}
        if getattr(self.config, "grpo_guard", False):
            inv_c = 1.0 / batch.coeffs[:, 1].abs().double()
            gain = (inv_c / inv_c.mean()).float().to(old.device)
            state["step_weights"] = gain if state["step_weights"] is None else state["step_weights"] * gain
            state["guard"] = self.sampling_predictions(batch)
        return state

    def sampling_predictions(self, batch) -> torch.Tensor:
        """``[B, S, ...]`` float32: the (guided) prediction of the weights that sampled ``batch`` at each
        recorded step's input, before any update (minibatches of ``train_batch_size``)."""
        tr = self.trainer
        sampler, B, S = tr.sampler, len(batch), batch.num_steps
        out = torch.empty((B, S, *batch.latents.shape[2:]), dtype=torch.float32, device=batch.latents.device)
        cfg = batch.guidance_scale is not None
        with torch.no_grad(), tr.accelerator.autocast(), tr.sampling_weights():
            for idx in torch.arange(B).split(self.config.train_batch_size):
                sub = batch[idx]
                emb = sampler.model_batch(sub.embeddings(), sub.embeddings(uncond=True))
                for j in range(S):
                    t = sub.timesteps[j].to(sub.device).expand(len(sub))
                    v_cond, v_uncond = sampler.predict(sub.latents_before(j), t, emb, sub.shared, cfg=cfg,
                                                       model=tr.model)
                    out[idx.to(out.device), j] = sampler.guide(v_cond, v_uncond, sub.guidance_scale)
        return out

    def order(self, state, inner):
        B = len(state["old"])
        perm = torch.randperm(B, generator=state["gen"])
        state["step_order"] = torch.stack([torch.randperm(state["S"], generator=state["gen"])
                                           for _ in range(B)])[:, :state["n_steps"]]
        return perm

    def terms(self, state):
        return state["n_steps"]

    def loss(self, state, sub, idx, term):
        from diffrl.ops import grpo_loss  # noqa: PLC0415

        tr, cfg = self.trainer, self.config
        old, adv = state["old"], state["adv"]
        steps = state["step_order"][idx, term]
        a = adv[idx.to(adv.device)]
        if a.dim() == 2:  # per-step advantages (advantage: dense): each sample's trained step's
            a = a.gather(1, steps.to(a.device)[:, None]).squeeze(1)
        if state["step_weights"] is not None:  # the advantage's weight at each sample's trained step
            a = a * state["step_weights"][steps.to(a.device)]
        old_lp = old[idx.to(old.device), steps.to(old.device)]
        if state["guard"] is not None:
            return self._guard_loss(state, sub, idx, steps, a, old_lp)
        out = tr.sampler.score(sub, steps, transformer_or_unet=tr.model, reference=tr.reference)
        return grpo_loss(out.log_prob.float(), old_lp, a, clip_range=cfg.clip_range,
                         kl=None if out.kl is None else out.kl.float(), kl_coef=cfg.kl_coef)

    def _guard_loss(self, state, sub, idx, steps, a, old_lp):
        """GRPO-Guard's step loss: the PPO clip on the re-centred, re-scaled ratio (class docstring); the
        KL to the sampling policy comes from the same fused step as the log-prob."""
        from diffrl.ops import grpo_loss  # noqa: PLC0415

        tr, cfg = self.trainer, self.config
        d = idx.to(state["guard"].device)
        v_old = state["guard"][d, steps.to(d.device)]
        out = tr.sampler.score(sub, steps, transformer_or_unet=tr.model, reference=v_old)
        s = sub.coeffs[steps.cpu(), 2].to(out.log_prob.device).float()
        log_ratio = s * (out.log_prob.float() - old_lp + out.kl.float())
        loss, stats = grpo_loss(log_ratio, torch.zeros_like(log_ratio), a, clip_range=cfg.clip_range)
        if cfg.kl_coef > 0:  # the KL to the frozen reference, as without the guard (a second fused step)
            ref = tr.sampler.score(sub, steps, transformer_or_unet=tr.model, reference=tr.reference)
            kl = ref.kl.float().mean()
            loss = loss + cfg.kl_coef * kl
            stats = {**stats, "kl": kl.detach()}
        return loss, stats


def _first_of_group(group_ids: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the first sample of each sample's group."""
    ids = group_ids.long().cpu()
    first: dict[int, int] = {}
    return torch.tensor([first.setdefault(int(g), i) for i, g in enumerate(ids)], dtype=torch.long)


class NFTObjective(Objective):
    """Advantage-weighted flow matching on the sampled images (DiffusionNFT-style); the maths is in
    :mod:`diffrl.trainers.nft`. No log-probs and no reference: the 'old' policy is the weights that
    sampled the epoch, evaluated before its first update."""

    keep_final_latents = True  # the loss trains on the sampled images' latents

    def velocity(self, model, sub, x_t, t):
        """The trained velocity of minibatch ``sub`` at ``(x_t, t)``: the guided one (as sampled) when
        ``train_guided`` and the rollout used CFG, else the conditional one."""
        sampler = self.trainer.sampler
        guided = self.config.train_guided and sub.guidance_scale is not None
        emb = sampler.model_batch(sub.embeddings(), sub.embeddings(uncond=True) if guided else None)
        v_cond, v_uncond = sampler.predict(x_t, t, emb, sub.shared, cfg=guided, model=model)
        return sampler.guide(v_cond, v_uncond, sub.guidance_scale)

    def prepare(self, epoch, batch, advantages):
        """Per inner epoch: an order of the samples, a noise level t and a noise draw per sample, and
        the sampling policy's prediction there (before any update: the 'old' policy of the loss)."""
        tr, cfg = self.trainer, self.config
        x0 = batch.final_latents
        B = len(batch)
        gen = tr._generator(epoch, 2, tr.rank)
        num_train = float(getattr(getattr(tr.pipe, "scheduler", None), "config", {}).get("num_train_timesteps", 1000))
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
                first = _first_of_group(batch.group_ids).to(x0.device)
                t, eps = t[first], eps[first]
            tt = t.view(-1, *[1] * (x0.dim() - 1))
            x_t = (1 - tt) * x0 + tt * eps
            x_old = torch.empty_like(x0)
            with torch.no_grad(), tr.accelerator.autocast(), tr.sampling_weights():
                for idx in perm.split(cfg.train_batch_size):
                    d = idx.to(x0.device)
                    v = self.velocity(tr.model, batch[idx], x_t[d], t[d] * num_train)
                    x_old[d] = x_t[d] - tt[d] * v.float()
            plan.append({"perm": perm, "t": t, "x_t": x_t, "x_old": x_old})
        r = (0.5 + adv / (2 * cfg.nft_adv_scale)).clamp(0, 1)
        if cfg.nft_negative_weight != 1.0:
            # below-average samples: r = 0.5 is |x_theta - x_old|^2 + const, no push, only the anchor
            r = torch.where(r < 0.5, 0.5 - cfg.nft_negative_weight * (0.5 - r), r)
        return {"x0": x0, "r": r, "plan": plan, "num_train": num_train}

    def order(self, state, inner):
        state["inner"] = inner  # the loop asks for an inner epoch's order before its minibatches' losses
        return state["plan"][inner]["perm"]

    def loss(self, state, sub, idx, term):
        cfg = self.config
        p = state["plan"][state["inner"]]
        d = idx.to(state["x0"].device)
        x0, x_t, x_old, t = state["x0"][d], p["x_t"][d], p["x_old"][d], p["t"][d]
        tt = t.view(-1, *[1] * (x0.dim() - 1))
        v = self.velocity(self.trainer.model, sub, x_t, t * state["num_train"]).float()
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

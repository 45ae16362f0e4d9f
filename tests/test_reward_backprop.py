"""RewardBackpropTrainer (AlignProp / DRaFT-K / DRaFT-LV) on tiny random pipelines: the loss is minus the
reward of the sampled images, its gradient flows through the last K steps only, checkpointing changes
nothing but memory, DRaFT-LV's step is the forward-noised final latent stepped once, resume is exact,
and a short run raises the reward beyond the noise of its epochs."""

import pytest
import torch

from diffrl.rewards import ColourTarget, JpegIncompressibility
from diffrl.samplers import FlowSDESampler
from diffrl.trainers import RewardBackpropConfig, RewardBackpropTrainer, get_preset, load_config


def _config(out, preset="tiny-sd3-draft-colour", **over):
    kind, values = get_preset(preset)
    assert kind == "reward_backprop"
    values.update({"output_dir": str(out), "seed": int(torch.randint(1 << 20, ())), **over})
    return load_config(RewardBackpropConfig, base=values)


def _grads(tr):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in tr.trainable.items()}


def _loss_and_grads(tr, sub):
    for p in tr.trainable.values():
        p.grad = None
    state = tr.objective.prepare(1, sub, torch.ones(len(sub)))
    loss, stats = tr.objective.loss(state, sub, torch.arange(len(sub)), 0)
    loss.backward()
    return loss.detach(), _grads(tr)


def _manual(tr, sub, K, reward):
    """-mean(reward) with autograd on the last K steps, from the sampler's parts (float64 reward)."""
    cfg, sampler = tr.config, tr.sampler
    for p in tr.trainable.values():
        p.grad = None
    gens = [torch.Generator().manual_seed(int(s)) for s in sub.seeds]
    with torch.no_grad():  # (the embeddings and shared inputs of these prompts)
        r = sampler.sample(list(sub.prompts), num_inference_steps=cfg.num_inference_steps,
                           guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution,
                           generator=gens, decode=False, keep_final_latents=True)
    T = cfg.num_inference_steps
    sched = sampler._make_scheduler()
    ts = sampler.adapter.set_timesteps(sched, T, r.final_latents, sampler.adapter.check_options({}))
    plan = sampler.plan_steps(sched, ts, set())
    emb = sampler.model_batch(r.embeddings(), r.embeddings(uncond=True))
    # run the first T - K steps without autograd from the initial latents, the last K with it
    gens = [torch.Generator().manual_seed(int(s)) for s in sub.seeds]
    lat0 = sampler.adapter.prepare_latents(len(sub), cfg.resolution, cfg.resolution, gens, None, dict(r.shared))
    with torch.no_grad():
        x = sampler.denoise(lat0.float(), ts[:T - K], plan[:T - K], emb, r.shared, r.guidance_scale).latents
    x = sampler.denoise(x, ts[T - K:], plan[T - K:], emb, r.shared, r.guidance_scale, grad=True).latents
    images = sampler.adapter.decode(x, cfg.resolution, cfg.resolution)
    target = torch.tensor(reward.rgb, dtype=torch.float64).view(1, 3, 1, 1)
    loss = (images.double() - target).pow(2).flatten(1).mean(1).mean()  # -mean(reward)
    loss.backward()
    return loss.detach(), _grads(tr)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_loss_is_minus_the_reward_and_its_gradient_stops_at_the_last_k_steps(tmp_path, K):
    tr = RewardBackpropTrainer(_config(tmp_path, grad_steps=K, checkpoint_steps=False), progress=False)
    with torch.no_grad():  # LoRA B starts at 0: move it so that every LoRA weight gets a gradient
        for n, p in tr.trainable.items():
            p.add_(torch.randn_like(p) * 0.02)
    sub = tr.data.collect(1).batch[torch.arange(3)]
    loss, grads = _loss_and_grads(tr, sub)
    want_loss, want = _manual(tr, sub, K, tr.reward_fn)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads.values())
    for n in grads:
        torch.testing.assert_close(grads[n], want[n], rtol=1e-4, atol=1e-7)
    if K < 3:  # fewer steps of autograd give another gradient (the check above is not vacuous)
        _, full = _manual(tr, sub, 3, tr.reward_fn)
        assert any(not torch.allclose(full[n], want[n], rtol=1e-3, atol=1e-6) for n in want)


def test_checkpointing_changes_nothing_but_memory(tmp_path):
    tr = RewardBackpropTrainer(_config(tmp_path, grad_steps=3, checkpoint_steps=False), progress=False)
    with torch.no_grad():
        for p in tr.trainable.values():
            p.add_(torch.randn_like(p) * 0.02)
    sub = tr.data.collect(1).batch[torch.arange(2)]
    loss, plain = _loss_and_grads(tr, sub)
    tr.config.checkpoint_steps = True
    loss_c, ckpt = _loss_and_grads(tr, sub)
    assert torch.equal(loss, loss_c)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-8)


def test_draft_lv_steps_the_renoised_final_latent(tmp_path):
    n = 3
    tr = RewardBackpropTrainer(_config(tmp_path, grad_steps=1, draft_lv=n), progress=False)
    sub = tr.data.collect(1).batch[torch.arange(2)]
    images = tr.objective.images(sub)
    assert images.shape[0] == n * len(sub) and images.requires_grad
    # one re-noising written out: x = (1 - sigma) x0 + sigma eps at the last step's sigma, one Euler step
    cfg, s = tr.config, tr.sampler
    gen = torch.Generator().manual_seed(7)
    r = s.sample(list(sub.prompts), num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                 height=cfg.resolution, width=cfg.resolution, generator=torch.Generator().manual_seed(3),
                 decode=False, keep_final_latents=True)
    got = s.last_step_from(r, r.final_latents, torch.Generator().manual_seed(7))
    sched = s._make_scheduler()
    ts = s.adapter.set_timesteps(sched, cfg.num_inference_steps, r.final_latents, s.adapter.check_options({}))
    sig = sched.sigmas.double()
    T = cfg.num_inference_steps
    eps = torch.randn(r.final_latents.shape, generator=gen)
    x = (1 - sig[T - 1]) * r.final_latents.double() + sig[T - 1] * eps.double()
    with torch.no_grad():
        v_c, v_u = s.predict(x.float(), ts[T - 1].expand(len(r)), s.model_batch(r.embeddings(), r.embeddings(
            uncond=True)), r.shared, cfg=True)
    v = v_u.double() + r.guidance_scale * (v_c.double() - v_u.double())
    want = s.adapter.decode((x + (sig[T] - sig[T - 1]) * v).float(), cfg.resolution, cfg.resolution)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=2e-5)
    recs = tr.train()
    assert all(r["optimizer_steps"] >= 1 for r in recs)


def test_resume_is_exact_and_bad_rewards_and_configs_are_clear(tmp_path):
    seed = int(torch.randint(1 << 20, ()))
    straight = RewardBackpropTrainer(_config(tmp_path / "a", epochs=2, seed=seed), progress=False)
    history = straight.train()
    RewardBackpropTrainer(_config(tmp_path / "b", epochs=1, seed=seed), progress=False).train()
    resumed = RewardBackpropTrainer(_config(tmp_path / "b", epochs=2, seed=seed), resume=True, progress=False)
    (rec,) = resumed.train()
    a, b = straight.trained_weights(), resumed.trained_weights()
    assert all(torch.equal(a[k], b[k]) for k in a) and rec["loss"] == history[1]["loss"]
    tr = RewardBackpropTrainer(_config(tmp_path / "c", epochs=1, save_every=0), reward=JpegIncompressibility(),
                               progress=False)
    with pytest.raises(ValueError, match="differentiable in the images"):
        tr.train()
    for bad, match in (({"grad_steps": 0}, "grad_steps"), ({"grad_steps": 4}, "grad_steps"),
                       ({"draft_lv": 2, "grad_steps": 2}, "draft_lv"), ({"draft_lv": -1}, "draft_lv"),
                       ({"kl_coef": 0.1}, "kl_coef")):
        with pytest.raises(ValueError, match=match):
            _config(tmp_path, **bad)
    with pytest.raises(ValueError, match="rgb"):
        ColourTarget(rgb=(1.0, 2.0, 0.0))


@pytest.mark.parametrize("preset", ["tiny-sd3-draft-colour", "tiny-sd-draft-colour"])
def test_a_short_run_raises_the_reward_beyond_its_noise(tmp_path, preset):
    """Eight held-out samples (their own prompts' draws, fixed seeds) before and after 12 epochs: the paired
    reward gain is more than 3 standard errors above 0."""
    from diffrl.trainers.reward_backprop import PromptBatch

    tr = RewardBackpropTrainer(_config(tmp_path, preset=preset, epochs=12, save_every=0), progress=False)
    held = PromptBatch([tr.prompts[i % len(tr.prompts)] for i in range(8)], torch.randint(1 << 40, (8,)))

    def rewards():
        with torch.no_grad():
            return tr.reward_fn(tr.objective.images(held), list(held.prompts))["reward"].double()

    before = rewards()
    tr.train()
    d = rewards() - before
    assert d.mean() > 3 * d.std() / len(d) ** 0.5, d.tolist()


def test_flow_sampler_grad_steps_errors(tmp_path):
    tr = RewardBackpropTrainer(_config(tmp_path), progress=False)
    s = tr.sampler
    assert isinstance(s, FlowSDESampler)
    with pytest.raises(ValueError, match="grad_steps"):
        s.sample(["a"], num_inference_steps=3, height=32, width=32, grad=True, grad_steps=5)

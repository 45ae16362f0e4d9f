"""The GRPO family's advantage options as trainer config keys (issue #20): ``advantage: win_rate``
(Pref-GRPO, from the scalar reward or a pairwise one), ``reward_aggregation: per_reward`` (each reward
normalised in its group, then the weighted sum) and PPO's ``step_weights``. Each is checked against its
formula written out here in float64, on fresh random rewards and on a real epoch of a tiny pipeline."""

from types import SimpleNamespace

import pytest
import torch

from diffrl.trainers import GRPOConfig, GRPOTrainer, NFTConfig, get_preset, load_config
from diffrl.trainers.advantage import grpo_advantages, pairwise_win_rate

EPS = 1e-4  # group_advantages' default (added to the std)


def _normalise(x: torch.Tensor, ids: torch.Tensor, clip=None) -> torch.Tensor:
    """[B] float64: (x - group mean) / (group population std + eps), clamped."""
    out = torch.empty_like(x, dtype=torch.float64)
    for g in ids.unique():
        m = ids == g
        v = x[m].double()
        out[m] = (v - v.mean()) / (v.std(unbiased=False) + EPS) if m.sum() > 1 else torch.zeros_like(v)
    return out if clip is None else out.clamp(-clip, clip)


def _win_rate(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(x), dtype=torch.float64)
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i and ids[j] == ids[i]]
        out[i] = sum(1.0 if x[i] > x[j] else 0.5 if x[i] == x[j] else 0.0 for j in others) / len(others) \
            if others else 0.5
    return out


def _cfg(**kw):
    base = dict(adv_std="group", adv_clip=5.0, advantage="group", reward_aggregation="sum",
                reward={"a": 1.0, "b": 0.5, "c": 2.0})
    return SimpleNamespace(**{**base, **kw})


def _batch(B=23, groups=5):
    ids = torch.randint(groups, (B,))
    heads = {f"{n}/reward": torch.randn(B) * s for n, s in (("a", 1.0), ("b", 30.0), ("c", 0.01))}
    heads["reward"] = heads["a/reward"] + 0.5 * heads["b/reward"] + 2 * heads["c/reward"]
    return ids, heads


def test_per_reward_normalises_each_reward_then_sums():
    ids, heads = _batch()
    got = grpo_advantages(_cfg(reward_aggregation="per_reward"), heads["reward"], ids, heads=heads)
    want = sum(w * _normalise(heads[f"{n}/reward"], ids) for n, w in (("a", 1.0), ("b", 0.5), ("c", 2.0)))
    torch.testing.assert_close(got.double(), want.clamp(-5, 5), rtol=1e-6, atol=1e-6)
    # the sum's normalisation is a different thing: the large-scale reward b dominates it
    plain = grpo_advantages(_cfg(), heads["reward"], ids, heads=heads)
    torch.testing.assert_close(plain.double(), _normalise(heads["reward"], ids, clip=5.0), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_win_rate_from_the_scalar_reward():
    ids, heads = _batch(B=31, groups=4)
    r = torch.randint(0, 5, (31,)).float()  # ties on purpose
    got = grpo_advantages(_cfg(advantage="win_rate", adv_clip=0.0), r, ids)
    torch.testing.assert_close(got.double(), _normalise(_win_rate(r, ids), ids), rtol=1e-6, atol=1e-6)
    # per reward: each reward's win rate, normalised on its own, then the weighted sum
    got = grpo_advantages(_cfg(advantage="win_rate", reward_aggregation="per_reward", adv_clip=0.0),
                          heads["reward"], ids, heads=heads)
    want = sum(w * _normalise(_win_rate(heads[f"{n}/reward"], ids), ids) for n, w in (("a", 1.0), ("b", 0.5),
                                                                                    ("c", 2.0)))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_win_rate_from_a_pairwise_reward():
    """A Bradley-Terry judge over hidden per-image scores: win rate_i = mean_j sigmoid(s_i - s_j); each
    unordered pair of a group is judged once, in one call."""
    B = 13
    ids = torch.randint(3, (B,))
    ids[0] = 7  # a group of one: 0.5, never judged
    images = torch.rand(B, 3, 4, 4)
    hidden = torch.randn(B, dtype=torch.float64)
    calls = []

    def judge(a, b, prompts):
        ia = [int((images == x).flatten(1).all(1).nonzero()) for x in a]
        ib = [int((images == x).flatten(1).all(1).nonzero()) for x in b]
        calls.append(list(zip(ia, ib)))
        assert prompts == [f"p{ids[i]}" for i in ia]
        return torch.sigmoid(hidden[ia] - hidden[ib]).float()

    wr = pairwise_win_rate(judge, images, [f"p{int(g)}" for g in ids], ids)
    want = torch.empty(B, dtype=torch.float64)
    for i in range(B):
        others = [j for j in range(B) if j != i and ids[j] == ids[i]]
        want[i] = sum(torch.sigmoid(hidden[i] - hidden[j]) for j in others) / len(others) if others else 0.5
    torch.testing.assert_close(wr, want, rtol=1e-6, atol=1e-6)
    (pairs,) = calls
    n_pairs = sum(int((ids == g).sum()) * (int((ids == g).sum()) - 1) // 2 for g in ids.unique())
    assert len(pairs) == n_pairs == len({frozenset(p) for p in pairs})
    rollout = SimpleNamespace(images=images, prompts=[f"p{int(g)}" for g in ids])
    got = grpo_advantages(_cfg(advantage="win_rate", adv_clip=0.0), torch.zeros(B), ids, rollout=rollout,
                          pairwise=judge)
    torch.testing.assert_close(got.double(), _normalise(want, ids), rtol=1e-5, atol=1e-5)
    for bad, match in ((lambda a, b, p: torch.ones(len(a) + 1), "preferences for"),
                       (lambda a, b, p: torch.full((len(a),), 1.5), "probabilities in"),
                       (lambda a, b, p: torch.full((len(a),), float("nan")), "probabilities in")):
        with pytest.raises(ValueError, match=match):
            pairwise_win_rate(bad, images, rollout.prompts, ids)


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="advantage must be one of group, win_rate, dense"):
        GRPOConfig(advantage="sparse")
    with pytest.raises(ValueError, match="reward_aggregation must be one of"):
        NFTConfig(reward_aggregation="mean")
    with pytest.raises(ValueError, match="one weight per recorded"):
        GRPOConfig(num_inference_steps=4, sde_window=[1, 3], step_weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="step_weights do not apply to the nft"):
        NFTConfig(num_inference_steps=2, step_weights=[1.0, 1.0])
    ids, heads = _batch()
    with pytest.raises(ValueError, match="per_reward needs each reward's own head"):
        grpo_advantages(_cfg(reward_aggregation="per_reward"), heads["reward"], ids, heads={"reward": heads["reward"]})
    _, values = get_preset("tiny-sd3-jpeg")
    cfg = load_config(GRPOConfig, base={**values, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="pairwise_reward is used by advantage: win_rate only"):
        GRPOTrainer(cfg, pairwise_reward=lambda a, b, p: torch.rand(len(a)), progress=False)


def test_an_epoch_with_per_reward_win_rate_and_step_weights(tmp_path, monkeypatch):
    """A real epoch (tiny SD3, two rewards): the advantages the trainer trains on are the formula's on the
    rewards it measured, and each PPO term sees them times the weight of its step."""
    import diffrl.ops as ops

    seen = []
    real_loss = ops.grpo_loss

    def spy(log_prob, old, adv, **kw):
        seen.append(adv.detach().clone())
        return real_loss(log_prob, old, adv, **kw)

    monkeypatch.setattr(ops, "grpo_loss", spy)
    weights = [float(w) for w in torch.rand(3) + 0.5]
    _, values = get_preset("tiny-sd3-jpeg")
    values.update(output_dir=str(tmp_path), epochs=1, num_inference_steps=3, save_every=0, advantage="win_rate",
                  reward_aggregation="per_reward", step_weights=weights, timestep_fraction=1.0,
                  reward={"jpeg_incompressibility": 1.0, "jpeg_compressibility": 0.3}, adv_clip=0.0)
    tr = GRPOTrainer(load_config(GRPOConfig, base=values), progress=False)
    captured = {}
    real_adv = tr.compute_advantages

    def capture(rewards, group_ids, prompts, heads=None, rollout=None):
        captured.update(heads=heads, ids=group_ids.clone())
        return real_adv(rewards, group_ids, prompts, heads=heads, rollout=rollout)

    tr.compute_advantages = capture
    order = []
    real_order = tr.objective.order

    def record_order(state, inner):
        perm = real_order(state, inner)
        order.append((perm.clone(), state["step_order"].clone()))
        return perm

    tr.objective.order = record_order
    (rec,) = tr.train()
    h, ids = captured["heads"], captured["ids"].cpu()
    want = sum(w * _normalise(_win_rate(h[f"{n}/reward"].cpu(), ids), ids)
               for n, w in (("jpeg_incompressibility", 1.0), ("jpeg_compressibility", 0.3)))
    adv = tr.last_batch["advantages"]
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-5)
    (perm, step_order), = order
    w = torch.tensor(weights)
    batches = perm.split(tr.config.train_batch_size)
    expected = [adv[idx] * w[step_order[idx, j]] for idx in batches for j in range(3)]
    assert len(seen) == len(expected) and rec["optimizer_steps"] >= 1
    for got, exp in zip(seen, expected):
        torch.testing.assert_close(got.cpu(), exp, rtol=1e-6, atol=1e-7)


def test_moving_window_positions_and_errors(tmp_path):
    """``sde_window_move``: slide moves one step every N epochs and wraps; random draws a start per epoch in
    range, the same for the same (seed, epoch); fixed leaves the sampler's window."""
    _, values = get_preset("tiny-sd3-jpeg")
    T, size, every = 7, 2, int(torch.randint(1, 4, ()))
    base = {**values, "output_dir": str(tmp_path), "num_inference_steps": T, "sde_window": [1, 1 + size]}
    slide = GRPOTrainer(load_config(GRPOConfig, base={**base, "sde_window_move": "slide",
                                                      "sde_window_slide_every": every}), progress=False)
    positions = T - size + 1
    for e in range(1, 3 * positions * every):  # epochs count from 1: the configured start first
        s = (1 + (e - 1) // every) % positions
        assert slide.sampling_window(e) == (s, s + size)
    seed = int(torch.randint(1 << 20, ()))
    rnd = GRPOTrainer(load_config(GRPOConfig, base={**base, "sde_window_move": "random", "seed": seed}),
                      progress=False)
    starts = [rnd.sampling_window(e)[0] for e in range(60)]
    assert all(0 <= s < positions for s in starts) and len(set(starts)) == positions  # every position, in 60 draws
    assert [rnd.sampling_window(e)[0] for e in range(60)] == starts
    fixed = GRPOTrainer(load_config(GRPOConfig, base=base), progress=False)
    assert fixed.sampling_window(5) == "default"
    with pytest.raises(ValueError, match="sde_window_move must be one of"):
        GRPOConfig(sde_window=[0, 2], sde_window_move="sliding")
    with pytest.raises(ValueError, match="set sde_window"):
        GRPOConfig(sde_window_move="random")
    with pytest.raises(ValueError, match="sde_window_slide_every"):
        GRPOConfig(sde_window=[0, 2], sde_window_move="slide", sde_window_slide_every=0)
    with pytest.raises(ValueError, match="share_prefix needs same_initial_noise"):
        GRPOConfig(share_prefix=True)


def test_epochs_with_a_random_window_and_a_shared_prefix(tmp_path):
    """Real epochs: each epoch's rollout records exactly its window's steps, the group starts the window from
    one latent, the steps before it cost one model row per prompt, and the PPO update trains on them."""
    _, values = get_preset("tiny-sd3-jpeg")
    T, size, G = 6, 2, 3
    values.update(output_dir=str(tmp_path), epochs=3, num_inference_steps=T, save_every=0, sde_window=[0, size],
                  sde_window_move="random", same_initial_noise=True, share_prefix=True, group_size=G,
                  prompts_per_epoch=2, sample_batch_size=6, timestep_fraction=1.0, seed=int(torch.randint(1 << 20, ())))
    tr = GRPOTrainer(load_config(GRPOConfig, base=values), progress=False)
    rows, rollouts = [], []
    hook = tr.sampler.model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]) if torch.is_grad_enabled() is False
        else None, with_kwargs=True)
    real_sample = tr.data.sample

    def keep(epoch):
        rows.clear()
        r = real_sample(epoch)
        rollouts.append((epoch, r, list(rows)))
        return r

    tr.data.sample = keep
    try:
        recs = tr.train()
    finally:
        hook.remove()
    assert len(recs) == 3 and all(r["optimizer_steps"] >= 1 for r in recs)
    B = 2 * G
    for (epoch, r, n), rec in zip(rollouts, recs):
        start = tr.sampling_window(epoch)[0]
        assert rec["sde_window_start"] == start
        assert r.step_indices.tolist() == list(range(start, start + size))
        x0 = r.latents_before(0)
        assert torch.equal(x0[0], x0[1]) and torch.equal(x0[0], x0[2]) and not torch.equal(x0[0], x0[3])
        cfg_rows = n[-1] // B  # the last step runs on every sample
        assert sum(n) == cfg_rows * (start * 2 + (T - start) * B)


def test_grpo_guard_ratio_and_step_weights_match_the_formula(tmp_path, monkeypatch):
    """grpo_guard: the ratio PPO clips is exp(reduce((x' - mu_old)(mu - mu_old)) / s) (the re-centred,
    re-scaled log-ratio), and each step's advantage carries 1/|c| normalised over the recorded steps;
    checked in float64 from the model's own predictions after a random change of the trained weights."""
    import diffrl.ops as ops

    _, values = get_preset("tiny-sd3-jpeg")
    T = 4
    values.update(output_dir=str(tmp_path), epochs=1, num_inference_steps=T, save_every=0, grpo_guard=True,
                  timestep_fraction=1.0, kl_coef=0.0, sde_window=[0, 3], seed=int(torch.randint(1 << 20, ())))
    tr = GRPOTrainer(load_config(GRPOConfig, base=values), progress=False)
    data = tr.data.collect(1)
    batch, adv = data.batch, data.advantages
    state = tr.objective.prepare(1, batch, adv)
    tr.objective.order(state, 0)
    with torch.no_grad():  # a policy that has moved away from the sampling one
        for p in tr.trainable.values():
            p.add_(torch.randn_like(p) * 0.05)
    seen = []
    real_loss = ops.grpo_loss

    def spy(log_prob, old, a, **kw):
        seen.append((log_prob.detach().double(), old.detach(), a.detach().double()))
        return real_loss(log_prob, old, a, **kw)

    monkeypatch.setattr(ops, "grpo_loss", spy)
    idx = torch.arange(min(4, len(batch)))
    sub = batch[idx]
    loss, stats = tr.objective.loss(state, sub, idx, 0)
    assert torch.isfinite(loss) and loss.requires_grad
    (log_ratio, old, a), = seen
    assert torch.equal(old, torch.zeros_like(old))
    steps = state["step_order"][idx, 0]
    sampler = tr.sampler
    emb = sampler.model_batch(sub.embeddings(), sub.embeddings(uncond=True))
    want = torch.empty(len(idx), dtype=torch.float64)
    inv_c = 1.0 / batch.coeffs[:, 1].double().abs()
    for r, j in enumerate(steps.tolist()):
        one = sub[[r]]
        x = one.latents_before(j).double()
        x_next = one.latents_after(j).double()
        with torch.no_grad():
            v_c, v_u = sampler.predict(one.latents_before(j), one.timesteps[j].expand(1), sampler.model_batch(
                one.embeddings(), one.embeddings(uncond=True)), one.shared, cfg=True, model=tr.model)
        v = v_u.double() + one.guidance_scale * (v_c.double() - v_u.double())
        v_old = state["guard"][idx[r], j].double()[None]
        a_j, c_j, s_j = (float(z) for z in batch.coeffs[j])
        mu, mu_old = a_j * x + c_j * v, a_j * x + c_j * v_old
        want[r] = ((x_next - mu_old) * (mu - mu_old)).mean() / s_j  # = mean(eps (mu - mu_old)), x' = mu_old + s eps
        assert float(a[r]) == pytest.approx(float(adv[idx[r]]) * float(inv_c[j] / inv_c.mean()), rel=1e-5)
    torch.testing.assert_close(log_ratio, want, rtol=2e-3, atol=1e-6)
    assert float(want.abs().max()) > 1e-4  # the perturbation moved the ratio: the check is not vacuous
    del emb
    with pytest.raises(ValueError, match="grpo_guard applies to the PPO objective"):
        NFTConfig(grpo_guard=True)


def test_complete_and_dense_advantages_match_their_definitions(tmp_path):
    """advantage: dense (DenseGRPO). sampler.complete(rollout, p) is the ODE completion from position p (from
    after the window it is the sampled images; from 0 the ODE sample of the same start); a real epoch's
    advantages are each step's reward gain R(i + 1) - R(i), normalised within the group per step (float64)."""
    from diffrl.samplers import FlowSDESampler

    _, values = get_preset("tiny-sd3-jpeg")
    T, size = 4, 2
    values.update(output_dir=str(tmp_path), epochs=1, num_inference_steps=T, save_every=0, advantage="dense",
                  sde_window=[0, size], timestep_fraction=1.0, adv_clip=0.0, group_size=3, prompts_per_epoch=2,
                  seed=int(torch.randint(1 << 20, ())))
    tr = GRPOTrainer(load_config(GRPOConfig, base=values), progress=False)
    captured = {}
    real = tr.compute_advantages

    def capture(rewards, group_ids, prompts, heads=None, rollout=None):
        r = rollout  # (the weights that sampled it: before the update)
        # the completion from after the window is what the sampler drew (its remaining steps are ODE steps too)
        torch.testing.assert_close(tr.sampler.complete(r, size), r.images, rtol=0, atol=1e-5)
        # from 0: the ODE sample from the rollout's initial latents
        ode = FlowSDESampler(tr.pipe, noise_level=0.0).sample(
            list(r.prompts[::3]), num_images_per_prompt=3, num_inference_steps=T,
            guidance_scale=tr.config.guidance_scale, height=tr.config.resolution, width=tr.config.resolution,
            latents=r.latents_before(0).clone())
        torch.testing.assert_close(tr.sampler.complete(r, 0), ode.images, rtol=0, atol=1e-5)
        R = {p: tr.reward_fn(tr.sampler.complete(r, p), r.prompts)["reward"].double().cpu() for p in range(size)}
        captured.update(R=R, rewards=rewards.clone(), ids=group_ids.clone(), rollout=r)
        return real(rewards, group_ids, prompts, heads=heads, rollout=rollout)

    tr.compute_advantages = capture
    (rec,) = tr.train()
    r, ids, R = captured["rollout"], captured["ids"].cpu(), captured["R"]
    assert rec["optimizer_steps"] >= 1
    R[size] = captured["rewards"].double().cpu()
    gains = torch.stack([R[i + 1] - R[i] for i in range(size)], 1)
    want = torch.stack([_normalise(gains[:, j], ids) for j in range(size)], 1)
    adv = tr.last_batch["advantages"]
    assert adv.shape == (len(r), size)
    torch.testing.assert_close(adv.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dense takes reward_aggregation: sum"):
        GRPOConfig(advantage="dense", reward_aggregation="per_reward")
    with pytest.raises(ValueError, match="the nft trainer has none"):
        NFTConfig(advantage="dense")
    with pytest.raises(ValueError, match="not stored"):
        tr.sampler.complete(r, T - 1)

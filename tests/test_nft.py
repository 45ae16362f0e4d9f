"""NFTTrainer (forward-process, advantage-weighted flow matching) on the tiny random-weight SD3 pipeline.

The loss is checked against its formula evaluated independently in float64; the loop's bookkeeping
(what is trained, exact resume, the CLI) as for the other trainers.
"""

import json

import pytest
import torch

from diffrl.cli import main
from diffrl.trainers import NFTConfig, NFTTrainer, get_preset, load_config

FAST = {"num_inference_steps": 2}


def _config(out, **over):
    kind, values = get_preset("tiny-sd3-nft-jpeg")
    assert kind == "nft"
    values.update(FAST, output_dir=str(out), **over)
    return load_config(NFTConfig, base=values)


def _epoch_inputs(tr, epoch=1):
    rollout = tr.data.sample(epoch)
    rewards = tr.data.score(rollout)["reward"]
    adv = tr.compute_advantages(rewards, rollout.group_ids, rollout.prompts)
    return rollout, adv


@pytest.mark.parametrize("guided", [False, True])
def test_loss_matches_its_formula_and_gradient_at_the_old_policy(tmp_path, guided):
    beta = float(torch.empty(()).uniform_(0.3, 1.5))
    scale = float(torch.empty(()).uniform_(0.5, 3.0))
    tr = NFTTrainer(_config(tmp_path, nft_beta=beta, nft_adv_scale=scale, train_guided=guided, group_size=3,
                            prompts_per_epoch=3, train_batch_size=4), progress=False)
    rollout, adv = _epoch_inputs(tr)
    state = tr.objective.prepare(1, rollout, adv)
    x0 = rollout.final_latents.double()
    r = (0.5 + adv.double() / (2 * scale)).clamp(0, 1)
    torch.testing.assert_close(state["r"].double(), r, rtol=0, atol=1e-6)
    idx = tr.objective.order(state, 0)[:4]
    plan = state["plan"][0]
    d = idx
    # the trained velocity, captured at the same inputs, to build the loss by hand in float64
    captured = {}
    orig = tr.objective.velocity

    def spy(model, sub, x_t, t):
        v = orig(model, sub, x_t, t)
        v.retain_grad()
        captured["v"] = v
        return v

    tr.objective.velocity = spy
    loss, stats = tr.objective.loss(state, rollout[idx], idx, 0)
    v = captured["v"].detach().double()
    t = plan["t"][d].double().view(-1, 1, 1, 1)
    x_t, x_old = plan["x_t"][d].double(), plan["x_old"][d].double()
    x_theta = x_t - t * v
    # before any update the trained model is the sampling policy: x_theta == x_old (same minibatch)
    torch.testing.assert_close(x_theta, x_old, rtol=1e-5, atol=1e-5)
    pos = (1 - beta) * x_old + beta * x_theta
    neg = (1 + beta) * x_old - beta * x_theta
    rr = r[d].view(-1, 1, 1, 1)
    expected = (rr * (pos - x0[d]) ** 2 + (1 - rr) * (neg - x0[d]) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    # gradient w.r.t. the velocity at the old policy: -t * 2 beta (2r - 1)(x_old - x0) / (numel B)
    loss.backward()
    n = x0[0].numel() * len(idx)
    g_expected = -t * 2 * beta * (2 * rr - 1) * (x_old - x0[d]) / n
    torch.testing.assert_close(captured["v"].grad.double(), g_expected, rtol=1e-4, atol=1e-9)
    assert float(stats["policy_drift"]) < 1e-8


def test_one_epoch_changes_lora_only_and_resume_is_exact(tmp_path):
    straight = NFTTrainer(_config(tmp_path / "a", epochs=2), progress=False)
    base = {n: p.detach().clone() for n, p in straight.raw_model.named_parameters()}
    history = straight.train()
    changed = {n for n, p in straight.raw_model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all("lora_" in n for n in changed)
    for key in ("loss", "fm_loss_pos", "policy_drift", "reward_mean", "optimizer_steps", "lr"):
        assert key in history[0], key
    assert history[0]["optimizer_steps"] >= 1 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    NFTTrainer(_config(tmp_path / "b", epochs=1), progress=False).train()
    resumed = NFTTrainer(_config(tmp_path / "b", epochs=2), resume=True, progress=False)
    (rec,) = resumed.train()
    a, b = straight.trained_weights(), resumed.trained_weights()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rec["loss"] == history[1]["loss"]


def test_nft_configs_are_checked(tmp_path):
    for bad, match in (({"nft_beta": 0.0}, "nft_beta"), ({"nft_adv_scale": -1.0}, "nft_adv_scale"),
                       ({"kl_coef": 0.1}, "kl_coef")):
        with pytest.raises(ValueError, match=match):
            _config(tmp_path, **bad)
    with pytest.raises(ValueError, match="NFTTrainer trains rectified-flow pipelines"):
        NFTTrainer(NFTConfig(prompts=["a"], pretrained="tiny:sd", output_dir=str(tmp_path / "sd")), progress=False)


def test_cli_trainer_kinds_are_the_trainer_classes():
    from diffrl.trainers import TRAINER_CLASSES
    from diffrl.trainers.cli_train import TRAINERS

    assert set(TRAINERS) == set(TRAINER_CLASSES)
    assert TRAINER_CLASSES["nft"] == (NFTConfig, NFTTrainer)


def test_cli_trains_the_nft_preset(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny-sd3-nft-jpeg", "--epochs", "1", "--output-dir", str(out),
                 "num_inference_steps=2"]) == 0
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["epoch"] == 1 and "fm_loss_pos" in rec
    assert (out / "checkpoints").is_dir()


@pytest.mark.parametrize("group_noise", [False, True])
def test_group_noise_shares_t_and_noise_within_each_group_only(tmp_path, group_noise):
    tr = NFTTrainer(_config(tmp_path, nft_group_noise=group_noise, group_size=3, prompts_per_epoch=3,
                            train_batch_size=4, inner_epochs=2), progress=False)
    rollout, adv = _epoch_inputs(tr)
    state = tr.objective.prepare(1, rollout, adv)
    x0 = rollout.final_latents
    gids = rollout.group_ids.tolist()
    for plan in state["plan"]:
        t = plan["t"]
        tt = t.view(-1, *[1] * (x0.dim() - 1))
        eps = (plan["x_t"] - (1 - tt) * x0) / tt  # the noise draw, recovered from x_t
        for i in range(len(gids)):
            for j in range(i + 1, len(gids)):
                same_t = bool(t[i] == t[j])
                same_eps = torch.allclose(eps[i], eps[j], rtol=1e-4, atol=1e-4)
                if group_noise and gids[i] == gids[j]:
                    assert same_t and same_eps, (i, j)
                else:  # fresh draws: equal only by an astronomically unlikely chance
                    assert not same_t and not same_eps, (i, j)


def test_ema_old_policy_samples_and_anchors_with_the_ema_and_resumes(tmp_path):
    """nft_old_policy: ema: every epoch samples (and evaluates v_old) with old_e, where old_0 = the initial
    weights and old_{e+1} = d_e old_e + (1 - d_e) trained_{e+1} (the ramped decay); a resume restores it."""
    d_max, ramp = float(torch.rand(()) * 0.5 + 0.3), 2
    over = dict(nft_old_policy="ema", nft_old_decay=d_max, nft_old_decay_ramp=ramp, epochs=3, save_every=1)
    tr = NFTTrainer(_config(tmp_path / "a", **over), progress=False)
    names = list(tr.trainable)
    at_sampling, after_epoch = [], []
    real_sample, real_epoch = tr.sampler.sample, NFTTrainer.train_epoch

    def spy_sample(*a, **kw):
        at_sampling.append({n: tr.trainable[n].detach().double().clone() for n in names})
        return real_sample(*a, **kw)

    def spy_epoch(self, *a, **kw):
        res = real_epoch(self, *a, **kw)
        after_epoch.append({n: self.trainable[n].detach().double().clone() for n in names})
        return res

    tr.sampler.sample = spy_sample
    tr.train_epoch = spy_epoch.__get__(tr)
    initial = {n: tr.trainable[n].detach().double().clone() for n in names}
    recs = tr.train()
    old = initial
    for e in range(3):
        for n in names:  # float32 storage of the EMA: compare at float32 rounding
            torch.testing.assert_close(at_sampling[e][n], old[n], rtol=1e-6, atol=1e-7)
        d = d_max * min(1.0, (e + 1) / ramp)  # after epoch e + 1 (epochs count from 1)
        assert recs[e]["old_policy_decay"] == pytest.approx(d)
        old = {n: d * old[n] + (1 - d) * after_epoch[e][n] for n in names}
    assert not torch.equal(at_sampling[2][names[0]], after_epoch[1][names[0]])  # off-policy: not the trained
    # the trained weights are back in place after each sampling
    assert all(torch.equal(tr.trainable[n].detach().double(), after_epoch[2][n]) for n in names)
    # exact resume of the old policy
    NFTTrainer(_config(tmp_path / "b", **{**over, "epochs": 2}), progress=False).train()
    resumed = NFTTrainer(_config(tmp_path / "b", **over), resume=True, progress=False)
    (rec,) = resumed.train()
    assert rec["loss"] == recs[2]["loss"]
    assert all(torch.equal(resumed.old_policy[n], tr.old_policy[n]) for n in names)
    for bad, match in (({"nft_old_policy": "lagged"}, "nft_old_policy"), ({"nft_old_decay": 1.0}, "nft_old_decay"),
                       ({"nft_old_decay_ramp": -1}, "nft_old_decay_ramp")):
        with pytest.raises(ValueError, match=match):
            _config(tmp_path, **bad)

"""GRPOTrainer / DDPOTrainer / ``diffrl train`` on the tiny random-weight presets (CPU, seconds each).

Kept small on purpose (2 prompts x group 2, 2 steps, 32 px): the point is the loop's bookkeeping
(what is trained, what is frozen, exact resume, the files written), not learning.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from two_ranks import launch_two_ranks, wait_all

from diffrl.cli import main
from diffrl.ops import group_advantages
from diffrl.trainers import (DDPOConfig, DDPOTrainer, GRPOConfig, GRPOTrainer, NFTConfig, NonFiniteError,
                             get_preset, latest_checkpoint, load_checkpoint, load_config)

FAST = {"num_inference_steps": 2}


def _config(preset: str, out: Path, **over):
    kind, values = get_preset(preset)
    values.update(FAST, output_dir=str(out), **over)
    return load_config(GRPOConfig if kind == "grpo" else DDPOConfig, base=values)


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for cname, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for n, t in comp.state_dict().items():
                out[f"{cname}.{n}"] = t.detach().clone()
    return out


@pytest.mark.parametrize("preset,trainer_cls,denoiser", [("tiny-sd3-jpeg", GRPOTrainer, "transformer"),
                                                        ("tiny-sd-ddpo-jpeg", DDPOTrainer, "unet")])
def test_one_epoch_changes_lora_and_nothing_else(tmp_path, preset, trainer_cls, denoiser):
    cfg = _config(preset, tmp_path, save_every=0, timestep_fraction=0.5)
    tr = trainer_cls(cfg, progress=False)
    before = _snapshot(tr.pipe)
    lora = {f"{denoiser}.{n}" for n in tr.trainable}
    assert lora and all("lora_" in n for n in lora)
    assert all(not p.requires_grad for c in tr.pipe.components.values() if isinstance(c, torch.nn.Module)
               for n, p in c.named_parameters() if "lora_" not in n)
    (rec,) = tr.train(1)
    after = _snapshot(tr.pipe)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "one epoch changed nothing"
    assert changed <= lora, f"frozen weights changed: {sorted(changed - lora)[:5]}"
    assert rec["epoch"] == 1 and rec["optimizer_steps"] >= 1 and not rec["nonfinite"]
    for key in ("lr", "reward_mean", "reward_std", "loss", "clip_fraction", "approx_kl", "kl", "adv_mean", "adv_std",
                "time_sample", "time_train", "peak_memory_mb", "reward/jpeg_kb"):
        assert key in rec, key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two GRPO epochs in one go: the trained weights and the metrics records."""
    out = tmp_path_factory.mktemp("straight")
    tr = GRPOTrainer(_config("tiny-sd3-jpeg", out, epochs=2), progress=False)
    tr.train()
    return {k: v.clone() for k, v in tr.trained_weights().items()}, tr.history


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item():.3g}"


def test_resume_equals_uninterrupted(tmp_path, uninterrupted):
    weights, history = uninterrupted
    GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path, epochs=1), progress=False).train()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "epoch-000001"
    resumed = GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path, epochs=2), resume=True, progress=False)
    assert resumed.resumed_from == 1 and resumed.global_step == history[0]["global_step"]
    (rec,) = resumed.train()
    _assert_same_weights(resumed.trained_weights(), weights)
    assert rec["reward_mean"] == history[1]["reward_mean"] and rec["loss"] == history[1]["loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


@pytest.mark.slow
def test_killed_subprocess_resumes_exactly(tmp_path, uninterrupted):
    """``diffrl train`` killed (SIGKILL) after its first checkpoint, then ``--resume``d: the same
    weights as the uninterrupted run."""
    weights, _ = uninterrupted
    cmd = [sys.executable, "-m", "diffrl", "train", "--preset", "tiny-sd3-jpeg", "--epochs", "2", "--output-dir",
           str(tmp_path), "--no-progress", "--num_inference_steps", str(FAST["num_inference_steps"])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "checkpoints" / "epoch-000001" / "state.json"
    deadline = time.monotonic() + 300  # generous: a loaded 2-core machine is slow to reach epoch 1
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert first.exists(), err.decode()[-2000:]
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert latest_checkpoint(tmp_path / "checkpoints").name == "epoch-000001"
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after epoch 1" in done.stderr
    ck = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"), restore_rng=False)
    assert ck["meta"]["epoch"] == 2
    _assert_same_weights(ck["weights"], weights)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]


def test_cli_runs_a_preset_end_to_end(tmp_path):
    rc = main(["train", "--preset", "tiny-sd3-jpeg", "--epochs", "1", "--output-dir", str(tmp_path), "--no-progress",
               "--num_inference_steps", "2", "--eval_every", "1", "--kl_coef=0"])
    assert rc == 0
    (rec,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rec["epoch"] == 1 and {"reward_mean", "loss"} <= rec.keys()
    ck = latest_checkpoint(tmp_path / "checkpoints")
    assert ck.name == "epoch-000001" and (ck / "weights.safetensors").is_file() and (ck / "optimizer.pt").is_file()
    meta = json.loads((ck / "state.json").read_text())
    assert meta["config"]["kl_coef"] == 0 and meta["trainer"] == "grpo"
    assert Image.open(tmp_path / "grids" / "epoch-000001.png").size == (64, 32)  # 2 eval prompts at 32 px


def test_bad_configs_are_clear_errors(tmp_path, capsys):
    assert main(["train", "--preset", "tiny-sd3-jpeg", "--output-dir", str(tmp_path), "--lrr", "1"]) == 2
    assert "unknown config key 'lrr' (did you mean 'lr'?)" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny-sd3", "--output-dir", str(tmp_path)]) == 2
    assert "did you mean 'tiny-sd3-jpeg'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny-sd3-jpeg", "--output-dir", str(tmp_path), "--group_size", "1"]) == 2
    assert "group_size must be >= 2" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny-sd3-jpeg", "--output-dir", str(tmp_path), "--reward", "{jpg: 1}"]) == 2
    assert "unknown reward 'jpg'" in capsys.readouterr().err
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("trainer: ppo\npretrained: tiny:sd3\n")
    assert main(["train", "--config", str(cfg_file)]) == 2
    assert "trainer must be one of" in capsys.readouterr().err
    # a config file naming its trainer, plus overrides: builds a DDPO run (0 epochs: nothing to train)
    cfg_file.write_text("trainer: ddpo\npretrained: tiny:sd\nprompts: [a cat]\nresolution: 32\n")
    assert main(["train", "--config", str(cfg_file), "--epochs", "0", "--output-dir", str(tmp_path / "d"),
                 "--eta", "0.5", "--no-progress"]) == 0
    assert (tmp_path / "d" / "metrics.jsonl").read_text() == ""
    with pytest.raises(TypeError, match="needs a GRPOConfig"):
        GRPOTrainer(DDPOConfig(prompts=["a"], pretrained="tiny:sd"))
    with pytest.raises(ValueError, match="pretrained is empty"):
        GRPOTrainer(GRPOConfig(prompts=["a"], output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="no training prompts"):
        GRPOTrainer(GRPOConfig(pretrained="tiny:sd3", output_dir=str(tmp_path)))
    # a config built directly (not through load_config) is checked when it is built (__post_init__),
    # each class its own keys; one changed after it was built, by the trainer
    with pytest.raises(ValueError, match="lr_scheduler must be"):
        GRPOConfig(prompts=["a"], pretrained="tiny:sd3", lr_scheduler="cosin", output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sde_window"):
        NFTConfig(sde_window=[3, 1])
    with pytest.raises(ValueError, match="eta must be"):
        DDPOConfig(eta=-1.0)
    changed = GRPOConfig(prompts=["a"], pretrained="tiny:sd3", output_dir=str(tmp_path))
    changed.lr_scheduler = "cosin"
    with pytest.raises(ValueError, match="lr_scheduler must be"):
        GRPOTrainer(changed)
    # a pipeline of the other family: said in trainer terms, before any training
    with pytest.raises(ValueError, match="GRPOTrainer trains rectified-flow pipelines.*DDPOTrainer"):
        GRPOTrainer(GRPOConfig(prompts=["a"], pretrained="tiny:sd", output_dir=str(tmp_path / "g")))
    with pytest.raises(ValueError, match="DDPOTrainer trains DDIM/UNet pipelines.*GRPOTrainer"):
        DDPOTrainer(DDPOConfig(prompts=["a"], pretrained="tiny:sd3", output_dir=str(tmp_path / "h")))
    # ranks with different numbers of optimizer steps would hang in DDP's all-reduce
    two_ranks = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2)
    with pytest.raises(ValueError, match=r"different numbers of optimizer steps per epoch \[1, 2\]"):
        GRPOTrainer(GRPOConfig(prompts=["a"], pretrained="tiny:sd3", prompts_per_epoch=3, group_size=2,
                               train_batch_size=2, output_dir=str(tmp_path)), accelerator=two_ranks)


class _NaNReward:
    def __call__(self, images, prompts):
        return {"reward": torch.full((images.shape[0],), float("nan"))}


def test_nonfinite_rewards_skip_updates_and_stop(tmp_path):
    cfg = _config("tiny-sd3-jpeg", tmp_path, epochs=5, max_nonfinite=2, num_inference_steps=1)
    tr = GRPOTrainer(cfg, reward=_NaNReward(), progress=False)
    before = {k: v.clone() for k, v in tr.trained_weights().items()}
    with pytest.raises(NonFiniteError, match="2 consecutive epochs with a non-finite"):
        tr.train()
    _assert_same_weights(tr.trained_weights(), before)
    assert latest_checkpoint(tmp_path / "checkpoints") is None  # bad epochs are not checkpointed
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in recs] == [True, True] and recs[0]["reward_mean"] == "nan"


def test_nonfinite_loss_skips_the_update(tmp_path):
    cfg = _config("tiny-sd3-jpeg", tmp_path / "b", epochs=3, max_nonfinite=1, num_inference_steps=1, kl_coef=0.0)
    tr = GRPOTrainer(cfg, progress=False)
    score = tr.sampler.score

    def nan_score(*args, **kwargs):
        out = score(*args, **kwargs)
        return dataclasses.replace(out, log_prob=out.log_prob * float("nan"))

    tr.sampler.score = nan_score
    before = {k: v.clone() for k, v in tr.trained_weights().items()}
    with pytest.raises(NonFiniteError, match="max_nonfinite=1"):
        tr.train()
    _assert_same_weights(tr.trained_weights(), before)
    assert tr.global_step == 0 and tr.history[0]["skipped_updates"] >= 1


def test_full_finetuning_with_frozen_reference_and_ema(tmp_path):
    cfg = _config("tiny-sd3-jpeg", tmp_path, use_lora=False, kl_coef=0.01, ema_decay=0.5, num_inference_steps=1,
                  lr=1e-4)
    tr = GRPOTrainer(cfg, progress=False)
    assert isinstance(tr.reference, torch.nn.Module) and not any(p.requires_grad for p in tr.reference.parameters())
    before = _snapshot(tr.pipe)
    ref_before = {k: v.clone() for k, v in tr.reference.state_dict().items()}
    (rec,) = tr.train(1)
    after = _snapshot(tr.pipe)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("transformer.") for k in changed)
    _assert_same_weights(tr.reference.state_dict(), ref_before)
    ck = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"), restore_rng=False)
    assert ck["weights"].keys() == tr.raw_model.state_dict().keys() and "ema" in ck["states"]
    ema = ck["states"]["ema"]
    name = next(iter(ema))
    start, now = before[f"transformer.{name}"], after[f"transformer.{name}"]
    steps = rec["optimizer_steps"]
    assert steps >= 1 and not torch.equal(ema[name], now) and not torch.equal(ema[name], start)
    # ema_weights(): the EMA in place of the trained weights inside the block, the trained ones after
    with tr.ema_weights():
        inside = tr.raw_model.state_dict()
        assert all(torch.equal(inside[n], tr.ema[n]) for n in tr.trainable)
    assert all(torch.equal(tr.raw_model.state_dict()[f], after[f"transformer.{f}"]) for f in tr.trainable)
    with pytest.raises(ValueError, match="ema_decay > 0"), GRPOTrainer(
            _config("tiny-sd3-jpeg", tmp_path / "no-ema", num_inference_steps=1), progress=False).ema_weights():
        pass


_WORKER = r"""
import sys, torch
from diffrl.trainers import GRPOTrainer, GRPOConfig, NFTTrainer, NFTConfig, get_preset, load_config
kind, values = get_preset(sys.argv[2])
values.update(num_inference_steps=1, output_dir=sys.argv[1], epochs=1, prompts_per_epoch=4, save_every=0)
config_cls, trainer_cls = (NFTConfig, NFTTrainer) if kind == "nft" else (GRPOConfig, GRPOTrainer)
tr = trainer_cls(load_config(config_cls, base=values), progress=False)
tr.train()
torch.save({"batch": tr.last_batch, "weights": tr.trained_weights(), "world": tr.world,
            "wrapped": tr.model is not tr.raw_model}, f"{sys.argv[1]}/rank{tr.rank}.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-sd3-jpeg", "tiny-sd3-nft-jpeg"])
def test_two_processes_gloo_agree_with_gathered_advantages(tmp_path, preset):
    """Two CPU processes (gloo, DDP through accelerate): each samples its share of the prompts, the
    advantages are those of the gathered batch, and the ranks end with identical weights (GRPO and
    NFT: the same loop, different losses)."""
    wait_all(launch_two_ranks(_WORKER, [tmp_path, preset]))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["world"] == 2 and r0["wrapped"]
    b0, b1 = r0["batch"], r1["batch"]
    assert set(b0["group_ids"].tolist()).isdisjoint(b1["group_ids"].tolist())  # each rank its own prompts
    rewards = torch.cat([b0["rewards"], b1["rewards"]])
    gids = torch.cat([b0["group_ids"], b1["group_ids"]])
    expected = group_advantages(rewards, gids, std="group", clip=5.0)
    torch.testing.assert_close(torch.cat([b0["advantages"], b1["advantages"]]), expected, rtol=0, atol=1e-6)
    _assert_same_weights(r0["weights"], r1["weights"])  # DDP averaged the gradients
    (rec,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rec["samples"] == 8 and abs(rec["reward_mean"] - float(rewards.mean())) < 1e-6


def test_bf16_mixed_precision_keeps_trained_weights_float32(tmp_path):
    cfg = _config("tiny-sd3-jpeg", tmp_path, mixed_precision="bf16", num_inference_steps=1, save_every=0)
    tr = GRPOTrainer(cfg, progress=False)
    assert tr.pipe.vae.dtype == torch.bfloat16 and tr.pipe.text_encoder.dtype == torch.bfloat16
    assert {p.dtype for p in tr.trainable.values()} == {torch.float32}
    before = {k: v.clone() for k, v in tr.trained_weights().items()}
    (rec,) = tr.train(1)
    assert not rec["nonfinite"] and rec["optimizer_steps"] >= 1
    assert any(not torch.equal(before[k], v) for k, v in tr.trained_weights().items())


# ---- LR schedule, trackers, DDPO options ----

def _record_steps(tr) -> list[dict]:
    """Wraps ``tr.optimizer.step``: each applied step appends the lr it runs with and the (clipped)
    gradients it is given."""
    steps, step = [], tr.optimizer.step

    def recording(*args, **kwargs):
        steps.append({"lr": tr.optimizer.param_groups[0]["lr"],
                      "grads": {n: p.grad.detach().clone() for n, p in tr.trainable.items()}})
        return step(*args, **kwargs)

    tr.optimizer.step = recording
    return steps


def _randint(lo: int, hi: int) -> int:
    """An int in [lo, hi], from the test's seeded global RNG."""
    return int(torch.randint(lo, hi + 1, ()).item())


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_steps_once_per_optimizer_step(tmp_path, schedule):
    from diffrl.trainers.base import lr_factor

    ppe, gs, tbs = _randint(1, 3), _randint(2, 3), _randint(1, 3)
    gas, inner, warmup = _randint(1, 2), _randint(1, 2), _randint(0, 3)
    cfg = _config("tiny-sd3-jpeg", tmp_path, epochs=2, num_inference_steps=1, save_every=0, prompts_per_epoch=ppe,
                  group_size=gs, train_batch_size=tbs, gradient_accumulation_steps=gas, inner_epochs=inner,
                  lr_scheduler=schedule, lr_warmup_steps=warmup, lr=float(torch.empty(()).uniform_(1e-4, 1e-3)))
    tr = GRPOTrainer(cfg, progress=False)
    per_epoch = tr._optimizer_steps_per_epoch(0)
    assert per_epoch == inner * math.ceil(math.ceil(ppe * gs / tbs) / gas)
    steps = _record_steps(tr)
    recs = tr.train()
    assert [r["optimizer_steps"] for r in recs] == [per_epoch, per_epoch]
    assert tr.total_optimizer_steps == 2 * per_epoch == tr.global_step == len(steps)
    f = lr_factor(schedule, warmup, 2 * per_epoch)
    expected = [cfg.lr * f(s) for s in range(2 * per_epoch)]
    assert [s["lr"] for s in steps] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in recs] == pytest.approx([expected[0], expected[per_epoch]], rel=1e-12)
    if warmup:
        assert steps[0]["lr"] == pytest.approx(cfg.lr / warmup)
    if schedule == "constant":
        assert tr.lr_scheduler.get_last_lr()[0] == pytest.approx(cfg.lr)
    else:  # decayed to 0 after the run's last step, which still had a positive lr
        assert tr.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-15) and steps[-1]["lr"] > 0


def test_resume_with_lr_schedule_equals_uninterrupted(tmp_path):
    over = dict(epochs=3, num_inference_steps=1, lr_scheduler="cosine", lr_warmup_steps=_randint(1, 3),
                seed=_randint(0, 10**6))
    straight = GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path / "a", **over), progress=False)
    straight.train()
    first = GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path / "b", **over), progress=False)
    first.train(1)  # interrupted after epoch 1 (the config's horizon stays 3 epochs)
    resumed = GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path / "b", **over), resume=True, progress=False)
    assert resumed.resumed_from == 1
    assert resumed.lr_scheduler.state_dict() == first.lr_scheduler.state_dict()
    assert resumed.lr_scheduler.last_epoch == resumed.global_step == first.global_step > 0
    resumed.train()
    _assert_same_weights(resumed.trained_weights(), straight.trained_weights())
    assert resumed.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in straight.history[1:]]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[1:]]


def test_lr_scheduler_state_is_required_on_resume(tmp_path):
    """A checkpoint without the scheduler's state resumes only a run without a schedule."""
    GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path, epochs=1, num_inference_steps=1), progress=False).train()
    ck = latest_checkpoint(tmp_path / "checkpoints")
    (ck / "lr_scheduler.pt").unlink()
    meta = json.loads((ck / "state.json").read_text())
    meta["states"].remove("lr_scheduler")
    (ck / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no LR scheduler state"):
        GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path, epochs=2, lr_scheduler="linear"), resume=True, progress=False)
    assert GRPOTrainer(_config("tiny-sd3-jpeg", tmp_path, epochs=2), resume=True, progress=False).resumed_from == 1


def test_tensorboard_tracker_writes_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc = main(["train", "--preset", "tiny-sd-ddpo-jpeg", "--epochs", "2", "--output-dir", str(tmp_path),
               "--no-progress", "--num_inference_steps", "1", "--save_every", "0", "--log_with", "[tensorboard]",
               "--seed", str(_randint(0, 10**6))])
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    files = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file under the output dir"
    scalars = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in scalars["reward_mean"]] == [1, 2]
    assert [v for _, v in scalars["reward_mean"]] == pytest.approx([r["reward_mean"] for r in recs], rel=1e-6)
    assert {"loss", "lr", "optimizer_steps"} <= scalars.keys()


def test_missing_wandb_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as if wandb were not installed
                        lambda name, *a, **k: None if name == "wandb" else find_spec(name, *a, **k))
    cfg = _config("tiny-sd-ddpo-jpeg", tmp_path, epochs=1, num_inference_steps=1, save_every=0, log_with=["wandb"])
    with pytest.warns(UserWarning, match="wandb is not installed"):
        tr = DDPOTrainer(cfg, progress=False)
    assert not tr.accelerator.trackers
    (rec,) = tr.train()
    assert rec["optimizer_steps"] >= 1
    assert [json.loads(x)["epoch"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    with pytest.raises(ValueError, match="log_with entries must be tensorboard or wandb"):
        _config("tiny-sd-ddpo-jpeg", tmp_path, log_with=["mlflow"])


def test_ddpo_resume_restores_the_tracker_exactly(tmp_path, monkeypatch):
    """DDPO interrupted after epoch 2 and resumed: the per-prompt tracker's histories come back from
    the checkpoint, so epoch 3 normalises (and trains) as in the uninterrupted run."""
    _, values = get_preset("tiny-sd-ddpo-jpeg")
    # one prompt: every epoch adds to its history, so epoch 3's advantages depend on epochs 1-2
    over = dict(epochs=3, num_inference_steps=1, prompts=[values["prompts"][_randint(0, 3)]], tracker_min_count=2,
                tracker_buffer_size=16, seed=_randint(0, 10**6), lr_scheduler="linear")
    straight = DDPOTrainer(_config("tiny-sd-ddpo-jpeg", tmp_path / "a", **over), progress=False)
    straight.train()
    DDPOTrainer(_config("tiny-sd-ddpo-jpeg", tmp_path / "b", **over), progress=False).train(2)
    resumed = DDPOTrainer(_config("tiny-sd-ddpo-jpeg", tmp_path / "b", **over), resume=True, progress=False)
    assert resumed.resumed_from == 2 and len(next(iter(resumed.tracker.state_dict()["history"].values()))) == 8
    (rec,) = resumed.train()
    _assert_same_weights(resumed.trained_weights(), straight.trained_weights())
    assert resumed.tracker.state_dict() == straight.tracker.state_dict()
    assert torch.equal(resumed.last_batch["advantages"], straight.last_batch["advantages"])
    assert rec["loss"] == straight.history[2]["loss"]
    # the control: resumed without the tracker's histories, epoch 3 normalises differently
    monkeypatch.setattr(DDPOTrainer, "load_extra_state", lambda self, states: None)
    (tmp_path / "b" / "checkpoints" / "epoch-000003").rename(tmp_path / "b" / "epoch-000003")
    blank = DDPOTrainer(_config("tiny-sd-ddpo-jpeg", tmp_path / "b", **over), resume=True, progress=False)
    assert blank.resumed_from == 2
    blank.train()
    assert not torch.equal(blank.last_batch["advantages"], straight.last_batch["advantages"])


def test_ddpo_prompts_file(tmp_path):
    words = ["red", "blue", "green", "tiny", "big", "round", "square", "striped"]
    prompts = [" ".join(words[i] for i in torch.randint(len(words), (3,)).tolist()) + f" {k}" for k in range(5)]
    path = tmp_path / "prompts.txt"
    path.write_text("\n\n".join(f"  {p}\t" for p in prompts) + "\n   \n")  # blank and whitespace lines between
    cfg = _config("tiny-sd-ddpo-jpeg", tmp_path, prompts=[], prompts_file=str(path), num_inference_steps=1,
                  save_every=0, prompts_per_epoch=3)
    tr = DDPOTrainer(cfg, progress=False)
    assert tr.prompts == prompts
    (rec,) = tr.train(1)
    assert rec["optimizer_steps"] >= 1 and set(tr.last_batch["prompts"]) <= set(prompts)
    both = DDPOTrainer(dataclasses.replace(cfg, prompts=["a cat"]), progress=False)
    assert both.prompts == ["a cat", *prompts]  # prompts, then the file's
    with pytest.raises(FileNotFoundError, match="prompts_file"):
        DDPOTrainer(dataclasses.replace(cfg, prompts_file=str(tmp_path / "missing.txt")), progress=False)


def test_ddpo_inner_epochs_repeat_the_ppo_pass(tmp_path):
    over = dict(epochs=1, num_inference_steps=1, save_every=0, seed=_randint(0, 10**6), prompts_per_epoch=2)
    runs = {}
    for inner in (1, 2):
        tr = DDPOTrainer(_config("tiny-sd-ddpo-jpeg", tmp_path / str(inner), inner_epochs=inner, **over),
                         progress=False)
        steps = _record_steps(tr)
        (rec,) = tr.train()
        runs[inner] = (tr, rec, steps)
    (one, rec1, steps1), (two, rec2, steps2) = runs[1], runs[2]
    assert rec1["reward_mean"] == rec2["reward_mean"]  # the same samples
    assert rec2["optimizer_steps"] == 2 * rec1["optimizer_steps"] == 2 * one._optimizer_steps_per_epoch(0)
    assert len(steps2) == 2 * len(steps1)
    # the first PPO pass is the inner_epochs=1 run, step for step; the second one trains on
    for a, b in zip(steps1, steps2):
        _assert_same_weights(a["grads"], b["grads"])
    w1, w2 = one.trained_weights(), two.trained_weights()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_ddpo_gradient_accumulation_is_the_mean_over_minibatches(tmp_path):
    """gradient_accumulation_steps=2 takes half the optimizer steps (rounded up), and each step's
    gradient is the mean of its minibatches' gradients: equal to the gradient of one minibatch of
    twice the train_batch_size, also for a shorter last group. lr=0 keeps the weights (so the PPO
    ratio is 1 and the clip cannot bind) and makes every step's gradient comparable; the clip of the
    gradient norm is off, since it applies per optimizer step."""
    over = dict(epochs=1, num_inference_steps=1, save_every=0, seed=_randint(0, 10**6), lr=0.0, max_grad_norm=1e9,
                prompts_per_epoch=3, group_size=2)  # 6 samples: minibatches of 2 -> 3, of 4 -> 2
    runs = {}
    for tbs, gas in ((2, 1), (2, 2), (4, 1)):
        tr = DDPOTrainer(_config("tiny-sd-ddpo-jpeg", tmp_path / f"{tbs}-{gas}", train_batch_size=tbs,
                                 gradient_accumulation_steps=gas, **over), progress=False)
        steps = _record_steps(tr)
        (rec,) = tr.train()
        assert rec["clip_fraction"] == 0 and rec["optimizer_steps"] == len(steps) == tr._optimizer_steps_per_epoch(0)
        runs[tbs, gas] = [s["grads"] for s in steps]
    single, accumulated, doubled = runs[2, 1], runs[2, 2], runs[4, 1]
    assert (len(single), len(accumulated), len(doubled)) == (3, 2, 2)
    expected = [{k: (single[0][k] + single[1][k]) / 2 for k in single[0]}, single[2]]
    for got, want, big in zip(accumulated, expected, doubled):
        for k in got:
            scale = want[k].abs().max().item() + 1e-12
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * scale)
            torch.testing.assert_close(got[k], big[k], rtol=1e-5, atol=1e-5 * scale)
    assert any(single[0][k].abs().max() > 0 for k in single[0])  # there was something to compare


def test_trainer_kinds_are_declared_once():
    from diffrl.trainers import KINDS, TRAINER_CLASSES
    from diffrl.trainers.cli_train import TRAINERS
    from diffrl.trainers.presets import PRESETS

    assert tuple(KINDS) == TRAINERS and set(TRAINER_CLASSES) == set(KINDS)
    for name, spec in KINDS.items():
        assert spec.trainer.kind == name and spec.trainer.config_class is spec.config
        assert TRAINER_CLASSES[name] == (spec.config, spec.trainer)
    assert {p["trainer"] for p in PRESETS.values()} <= set(KINDS)

    class Mine(GRPOTrainer):  # a user's subclass keeps its base's kind
        pass

    assert Mine.kind == "grpo" and Mine.config_class is GRPOConfig


def test_an_objective_from_outside_plugs_into_the_loop(tmp_path):
    """An objective the library does not know (PPO's loss, counted): the loop asks for its order once per
    inner epoch and for ``terms`` losses per minibatch, and the stats it returns reach the record."""
    from diffrl.trainers.objectives import PPOObjective

    calls = {"order": 0, "loss": []}

    class Counted(PPOObjective):
        def order(self, state, inner):
            calls["order"] += 1
            return super().order(state, inner)

        def loss(self, state, sub, idx, term):
            loss, stats = super().loss(state, sub, idx, term)
            calls["loss"].append((len(idx), term))
            return loss, {**stats, "counted": torch.tensor(float(term))}

    class Trainer(GRPOTrainer):
        objective_class = Counted

    inner, tbs = _randint(1, 3), _randint(1, 3)
    cfg = _config("tiny-sd3-jpeg", tmp_path, epochs=1, num_inference_steps=3, save_every=0, inner_epochs=inner,
                  train_batch_size=tbs, timestep_fraction=2 / 3)
    tr = Trainer(cfg, progress=False)
    (rec,) = tr.train()
    B = cfg.prompts_per_epoch * cfg.group_size
    n_terms = max(1, int(3 * cfg.timestep_fraction))
    assert calls["order"] == inner
    assert len(calls["loss"]) == inner * math.ceil(B / tbs) * n_terms
    assert sorted({t for _, t in calls["loss"]}) == list(range(n_terms))
    assert rec["counted"] == pytest.approx(sum(range(n_terms)) / n_terms)
    assert isinstance(tr.objective, Counted) and tr.kind == "grpo"

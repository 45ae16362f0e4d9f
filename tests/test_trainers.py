"""GRPOTrainer / DDPOTrainer / ``diffrl train`` on the tiny random-weight presets (CPU, seconds each).

Kept small on purpose (2 prompts x group 2, 2 steps, 32 px): the point is the loop's bookkeeping
(what is trained, what is frozen, exact resume, the files written), not learning.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffrl.cli import main
from diffrl.ops import group_advantages
from diffrl.trainers import (DDPOConfig, DDPOTrainer, GRPOConfig, GRPOTrainer, NonFiniteError, get_preset,
                             latest_checkpoint, load_checkpoint, load_config)

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
    for key in ("reward_mean", "reward_std", "loss", "clip_fraction", "approx_kl", "kl", "adv_mean", "adv_std",
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
    deadline = time.monotonic() + 120
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


_WORKER = r"""
import sys, torch
from diffrl.trainers import GRPOTrainer, GRPOConfig, get_preset, load_config
_, values = get_preset("tiny-sd3-jpeg")
values.update(num_inference_steps=1, output_dir=sys.argv[1], epochs=1, prompts_per_epoch=4, save_every=0)
tr = GRPOTrainer(load_config(GRPOConfig, base=values), progress=False)
tr.train()
torch.save({"batch": tr.last_batch, "weights": tr.trained_weights(), "world": tr.world,
            "wrapped": tr.model is not tr.raw_model}, f"{sys.argv[1]}/rank{tr.rank}.pt")
"""


@pytest.mark.slow
def test_two_processes_gloo_agree_with_gathered_advantages(tmp_path):
    """Two CPU processes (gloo, DDP through accelerate): each samples its share of the prompts, the
    advantages are those of the gathered batch, and the ranks end with identical weights."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
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

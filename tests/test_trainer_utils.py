"""Trainer building blocks: configs (YAML + overrides, type checks), atomic checkpoints, metrics log."""

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffrl.trainers import (DDPOConfig, GRPOConfig, MetricsLog, apply_overrides, latest_checkpoint, load_checkpoint,
                             load_config, save_checkpoint)
from diffrl.trainers.checkpoint import list_checkpoints


# ---- configs ----

def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""
        lr: 1e-4            # YAML 1.1 reads this as a string: the field's type makes it a float
        group_size: 8
        prompts: [a cat, a dog]
        reward: {jpeg_compressibility: 1.0}
        sde_window: [0, 4]
    """))
    cfg = load_config(GRPOConfig, path, overrides=["--epochs", "3", "kl_coef=0.04", "reward.clip_score=0.5",
                                                   "--use-lora=false", "adam_betas=[0.8, 0.99]"])
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.group_size == 8 and cfg.epochs == 3 and cfg.kl_coef == pytest.approx(0.04)
    assert cfg.prompts == ["a cat", "a dog"]
    assert cfg.reward == {"jpeg_compressibility": 1.0, "clip_score": 0.5}
    assert cfg.sde_window == [0, 4] and cfg.use_lora is False and cfg.adam_betas == (0.8, 0.99)
    # untouched fields keep their defaults
    assert cfg.noise_level == GRPOConfig().noise_level


def test_bad_configs_name_the_key(tmp_path):
    with pytest.raises(KeyError, match="group_size"):
        apply_overrides(GRPOConfig(), ["group_sise=4"])
    with pytest.raises(ValueError, match="'epochs' expects int"):
        apply_overrides(GRPOConfig(), ["epochs=2.5"])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        apply_overrides(GRPOConfig(), ["group_size=1"])
    with pytest.raises(ValueError, match="sde_window"):
        apply_overrides(GRPOConfig(num_inference_steps=4), ["sde_window=[2, 9]"])
    with pytest.raises(ValueError, match="sde_type"):
        apply_overrides(GRPOConfig(), ["sde_type=ode"])
    with pytest.raises(ValueError, match="no value"):
        apply_overrides(GRPOConfig(), ["--epochs"])
    with pytest.raises(KeyError, match="noise_level"):
        apply_overrides(DDPOConfig(), ["noise_level=0.5"])  # a GRPO-only key
    with pytest.raises(ValueError, match="lr_scheduler must be constant, linear or cosine, got 'step'"):
        apply_overrides(GRPOConfig(), ["lr_scheduler=step"])
    with pytest.raises(ValueError, match="lr_warmup_steps must be >= 0"):
        apply_overrides(DDPOConfig(), ["lr_warmup_steps=-1"])
    with pytest.raises(ValueError, match="inner_epochs must be >= 1"):
        apply_overrides(DDPOConfig(), ["inner_epochs=0"])
    with pytest.raises(ValueError, match="log_with entries must be tensorboard or wandb"):
        apply_overrides(GRPOConfig(), ["log_with=[tensorboard, mlflow]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(GRPOConfig, bad)


def test_lr_factor_warmup_then_decay_to_zero():
    from diffrl.trainers.base import lr_factor

    warmup = int(torch.randint(0, 6, ()))
    decay = 2 * int(torch.randint(1, 20, ()))  # even: the decay's midpoint is a step
    total = warmup + decay
    for schedule in ("constant", "linear", "cosine"):
        f = lr_factor(schedule, warmup, total)
        assert [f(s) for s in range(warmup)] == pytest.approx([(k + 1) / warmup for k in range(warmup)])
        after = [f(s) for s in range(warmup, total + 3)]  # past the end (a resumed run with fewer epochs): stays
        if schedule == "constant":
            assert after == [1.0] * len(after)
            continue
        assert after[0] == 1.0 and after[decay // 2] == pytest.approx(0.5) and after[decay - 1] > 0
        assert after[decay:] == [0.0] * 3 and all(a >= b for a, b in zip(after, after[1:]))
        if schedule == "linear":
            assert after[:decay] == pytest.approx([1 - k / decay for k in range(decay)])
        else:
            assert after[:decay] == pytest.approx([(1 + math.cos(math.pi * k / decay)) / 2 for k in range(decay)])
    with pytest.raises(ValueError, match="lr_scheduler must be constant, linear or cosine"):
        lr_factor("exponential", warmup, total)


# ---- checkpoints ----

def _weights():
    return {"lora.A": torch.randn(4, 8), "lora.B": torch.randn(8, 4, dtype=torch.bfloat16)}


def test_checkpoint_round_trip_restores_rng_and_state(tmp_path):
    weights = _weights()
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, 3, weights=weights, states={"optimizer": opt.state_dict()},
                           meta={"global_step": 17})
    after = (random.random(), np.random.rand(), torch.rand(3))  # what the RNGs give after the save
    random.random(), np.random.rand(), torch.rand(5)  # move them on
    ck = load_checkpoint(path)
    assert (random.random(), np.random.rand()) == after[:2] and torch.equal(torch.rand(3), after[2])
    assert ck["meta"]["epoch"] == 3 and ck["meta"]["global_step"] == 17
    for k, v in weights.items():
        assert torch.equal(ck["weights"][k], v) and ck["weights"][k].dtype == v.dtype
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["states"]["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_keep_last_and_latest(tmp_path):
    for epoch in range(5):
        save_checkpoint(tmp_path, epoch, weights=_weights(), keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["epoch-000003", "epoch-000004"]
    assert latest_checkpoint(tmp_path).name == "epoch-000004"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_a_killed_write_leaves_the_last_good_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, weights=_weights())
    # a child process dies in the middle of writing epoch 2 (after the weights, before state.json)
    code = textwrap.dedent(f"""
        import os, torch, diffrl.trainers.checkpoint as ck
        real = torch.save
        def dying_save(obj, f, *a, **k):
            real(obj, f, *a, **k)
            os._exit(9)
        ck.torch.save = dying_save
        ck.save_checkpoint({str(tmp_path)!r}, 2, weights={{"w": torch.ones(3)}}, states={{"opt": {{"x": 1}}}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == 9
    assert any(p.name.startswith(".tmp-epoch-000002") for p in tmp_path.iterdir())  # the torn write
    assert latest_checkpoint(tmp_path).name == "epoch-000001"  # never seen as a checkpoint
    load_checkpoint(latest_checkpoint(tmp_path), restore_rng=False)
    save_checkpoint(tmp_path, 2, weights=_weights())  # the next save cleans the leftovers
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert latest_checkpoint(tmp_path).name == "epoch-000002"


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "epoch-000001").mkdir()
    with pytest.raises(FileNotFoundError, match="state.json"):
        load_checkpoint(tmp_path / "epoch-000001")


# ---- metrics ----

def test_metrics_log_resume_drops_later_epochs(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for e in range(4):
        log.write({"epoch": e, "reward_mean": torch.tensor(0.5 + e), "loss": float("nan") if e == 2 else 0.1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "rew')  # a line cut by a kill
    resumed = MetricsLog(tmp_path / "metrics.jsonl", resume_after_epoch=1)
    assert [r["epoch"] for r in resumed.read()] == [0, 1]
    resumed.write({"epoch": 2, "loss": 0.2})
    recs = resumed.read()
    assert [r["epoch"] for r in recs] == [0, 1, 2] and recs[1]["reward_mean"] == 1.5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)
    with pytest.raises(ValueError, match="epoch"):
        resumed.write({"loss": 1.0})
    assert os.path.getsize(tmp_path / "metrics.jsonl") > 0
    assert MetricsLog(tmp_path / "metrics.jsonl").read() == []  # a fresh run starts a new log

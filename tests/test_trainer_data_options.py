"""The data source's options (#21): per-prompt metadata from a ``.jsonl`` prompts file, scoring overlapped
with sampling (bit-identical to the plain path), and the held-out evaluation (``eval/reward``) every
``eval_every`` epochs. Tiny random-weight SD3 pipelines on the CPU, seconds each."""

import json
import threading
import time

import pytest
import torch

from diffrl.rewards import JpegIncompressibility
from diffrl.trainers import DDPOConfig, DDPOTrainer, GRPOConfig, GRPOTrainer, get_preset, load_config


def _config(out, preset="tiny-sd3-jpeg", **over):
    kind, values = get_preset(preset)
    values.update(num_inference_steps=2, output_dir=str(out), save_every=0, **over)
    return load_config(GRPOConfig if kind == "grpo" else DDPOConfig, base=values)


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Recording:
    """JPEG incompressibility that records each call's size and thread (and can sleep)."""

    def __init__(self, sleep=0.0):
        self.inner, self.sleep, self.calls = JpegIncompressibility(), sleep, []
        self.heads = self.inner.heads

    def __call__(self, images, prompts):
        t0 = time.perf_counter()
        time.sleep(self.sleep)
        out = self.inner(images, prompts)
        self.calls.append((len(prompts), threading.current_thread() is threading.main_thread(), t0,
                           time.perf_counter(), torch.is_grad_enabled()))
        return out


# ---- overlapped scoring ---------------------------------------------------------------------------------

@pytest.mark.parametrize("trainer_cls,preset", [(GRPOTrainer, "tiny-sd3-jpeg"), (DDPOTrainer, "tiny-sd-ddpo-jpeg")])
def test_overlapped_scoring_equals_the_plain_path(tmp_path, trainer_cls, preset):
    """Same seeds, overlap on and off: the same rewards, advantages, losses and weights after 2 epochs."""
    runs = {}
    for overlap in (False, True):
        reward = _Recording()
        cfg = _config(tmp_path / str(overlap), preset, epochs=2, prompts_per_epoch=3, sample_batch_size=2,
                      overlap_scoring=overlap)
        tr = trainer_cls(cfg, reward=reward, progress=False)
        tr.train()
        runs[overlap] = tr, reward
    (plain, r_plain), (over, r_over) = runs[False], runs[True]
    # plain: one call on the epoch's 6 images; overlapped: one per sampler call (1 prompt x 2 images), off thread
    assert [c[:2] for c in r_plain.calls] == [(6, True)] * 2
    assert [c[:2] for c in r_over.calls] == [(2, False)] * 6 and not any(c[4] for c in r_over.calls)
    for a, b in zip(plain.history, over.history):
        for k in ("reward_mean", "reward_std", "reward/jpeg_kb", "adv_mean", "adv_std", "loss", "global_step"):
            assert a[k] == b[k], k
    assert torch.equal(plain.last_batch["rewards"], over.last_batch["rewards"])
    assert torch.equal(plain.last_batch["advantages"], over.last_batch["advantages"])
    assert _same_weights(plain.trained_weights(), over.trained_weights())


def test_overlapped_scoring_runs_beside_the_next_sampler_call(tmp_path):
    reward = _Recording(sleep=0.4)
    cfg = _config(tmp_path, epochs=1, prompts_per_epoch=2, sample_batch_size=2, overlap_scoring=True)
    tr = GRPOTrainer(cfg, reward=reward, progress=False)
    spans, sample = [], tr.sampler.sample

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = sample(*a, **kw)
        spans.append((t0, time.perf_counter()))
        return out

    tr.sampler.sample = timed
    (rec,) = tr.train()
    assert len(spans) == 2 and len(reward.calls) == 2
    (s1, e1), (r0, f0) = spans[1], reward.calls[0][2:4]
    assert r0 < e1 and s1 < f0, "the first call's scoring did not overlap the second sampler call"
    assert rec["time_reward"] < 0.4 + 0.4  # only the wait after the last sampler call


def test_overlapped_reward_errors_reach_the_trainer(tmp_path):
    def broken(images, prompts):
        raise RuntimeError("reward server said no")

    cfg = _config(tmp_path, epochs=1, prompts_per_epoch=2, sample_batch_size=2, overlap_scoring=True)
    tr = GRPOTrainer(cfg, reward=broken, progress=False)
    with pytest.raises(RuntimeError, match="reward server said no"):
        tr.train()
    assert tr.epoch == 0


# ---- per-prompt metadata ----------------------------------------------------------------------------

def _jsonl(path, prompts, targets):
    lines = [json.dumps({"prompt": p, "tag": "counting", "include": [{"class": "cat", "count": int(t)}],
                         "target": float(t)}) for p, t in zip(prompts, targets)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped
    return path


@pytest.mark.parametrize("overlap", [False, True])
def test_jsonl_metadata_reaches_the_reward(tmp_path, overlap):
    prompts = [f"a photo of {k} cats" for k in range(5)]
    targets = torch.randint(1, 9, (5,)).tolist()
    path = _jsonl(tmp_path / "prompts.jsonl", prompts, targets)

    def by_target(images, prompts, metadata=None):  # the reward is the metadata's target (-1: none)
        t = torch.tensor([-1.0 if m is None else m["target"] for m in metadata])
        return {"reward": t + 0 * images.mean((1, 2, 3))}

    cfg = _config(tmp_path / "run", prompts=["a dog"], prompts_file=str(path), epochs=2, prompts_per_epoch=4,
                  sample_batch_size=2, overlap_scoring=overlap)
    tr = GRPOTrainer(cfg, reward=by_target, progress=False)
    assert tr.prompts == ["a dog", *prompts]
    assert tr.prompt_metadata[0] is None and [m["target"] for m in tr.prompt_metadata[1:]] == targets
    assert tr.prompt_metadata[1]["include"] == [{"class": "cat", "count": targets[0]}]
    want = {"a dog": -1.0, **dict(zip(prompts, map(float, targets)))}
    tr.train()
    got = tr.last_batch
    assert got["rewards"].tolist() == [want[p] for p in got["prompts"]]
    assert len(set(got["prompts"])) > 1


def test_rewards_without_metadata_ignore_it(tmp_path):
    path = _jsonl(tmp_path / "prompts.jsonl", ["a cat", "two cats"], [1, 2])
    reward = _Recording()  # (images, prompts) only
    tr = GRPOTrainer(_config(tmp_path / "run", prompts=[], prompts_file=str(path), epochs=1), reward=reward,
                     progress=False)
    (rec,) = tr.train()
    assert len(reward.calls) == 1 and rec["optimizer_steps"] >= 1


@pytest.mark.parametrize("text,match", [('{"prompt": "a cat"}\n{"text": "b"}\n', r"prompts.jsonl:2: .*\"prompt\""),
                                        ('{"prompt": "a cat"}\nnot json\n', r"prompts.jsonl:2: not a JSON object"),
                                        ('["a cat"]\n', r"prompts.jsonl:1: ")])
def test_bad_jsonl_prompts_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        GRPOTrainer(_config(tmp_path / "run", prompts=[], prompts_file=str(path)), progress=False)


# ---- held-out evaluation ----------------------------------------------------------------------------

def test_eval_reward_is_the_deterministic_pipeline_output_scored(tmp_path):
    eval_prompts = ["a red circle", "a blue square", "a green triangle"]
    cfg = _config(tmp_path, epochs=3, eval_every=2, eval_prompts=eval_prompts, sample_batch_size=2)
    tr = GRPOTrainer(cfg, progress=False)
    recs = tr.train()
    assert ["eval/reward" in r for r in recs] == [False, True, False]
    grids = tmp_path / "grids"
    assert (grids / "epoch-000002.png").is_file() and not (grids / "epoch-000001.png").exists()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["eval/reward"] == recs[1]["eval/reward"]
    # the current policy (after 3 epochs) sampled by the pipeline itself, no noise, the same initial noise
    again = tr.evaluate(3)
    gens = [tr._generator(0, 3, i) for i in range(3)]
    with torch.no_grad():
        imgs = tr.pipe(eval_prompts, num_inference_steps=2, guidance_scale=cfg.guidance_scale, height=32, width=32,
                       generator=gens, output_type="pt").images
    want = JpegIncompressibility()(imgs.float(), eval_prompts)
    # (equal here; the sampler's batches of 2 against the pipeline's 3 may move a pixel's rounding: ~1 byte)
    assert again["eval/reward"] == pytest.approx(want["reward"].mean().item(), rel=1e-3)
    assert again["eval/jpeg_kb"] == pytest.approx(want["jpeg_kb"].mean().item(), rel=1e-3)
    assert tr.evaluate(3) == again  # deterministic: the same weights give the same numbers
    assert again["eval/reward"] != recs[1]["eval/reward"]  # (the weights moved between epochs 2 and 3)


def test_evaluation_does_not_change_training(tmp_path):
    runs = []
    for every in (0, 1):
        tr = GRPOTrainer(_config(tmp_path / str(every), epochs=2, eval_every=every), progress=False)
        tr.train()
        runs.append(tr)
    assert [r["loss"] for r in runs[0].history] == [r["loss"] for r in runs[1].history]
    assert _same_weights(runs[0].trained_weights(), runs[1].trained_weights())
    assert all("eval/reward" in r for r in runs[1].history)


def test_eval_prompts_file_with_metadata(tmp_path):
    path = _jsonl(tmp_path / "eval.jsonl", ["a cat", "two cats", "three cats"], [1, 2, 3])
    seen = []

    def by_target(images, prompts, metadata=None):
        seen.append(metadata)
        t = torch.tensor([1.0 if m is None else m["target"] for m in metadata]) if metadata else \
            torch.ones(len(prompts))
        return {"reward": t + 0 * images.mean((1, 2, 3))}

    cfg = _config(tmp_path / "run", epochs=1, eval_every=1, eval_prompts=["a dog"], eval_prompts_file=str(path))
    tr = GRPOTrainer(cfg, reward=by_target, progress=False)
    (rec,) = tr.train()
    assert tr.eval_prompts == ["a dog", "a cat", "two cats", "three cats"]
    assert rec["eval/reward"] == pytest.approx((1 + 1 + 2 + 3) / 4)
    assert seen[-1][0] is None and seen[-1][3]["target"] == 3

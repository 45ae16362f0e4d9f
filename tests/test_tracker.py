"""PerPromptStatTracker: DDPO's semantics (bounded history, min_count fall-back to batch statistics),
Flow-GRPO's variant (unbounded, global std, cleared per epoch), exact zeros, checkpointing."""

from __future__ import annotations

import io
from collections import deque

import numpy as np
import pytest
import torch

from diffrl import PerPromptStatTracker


class DDPOTracker:
    """DDPO's tracker as its research code computes it (a loop over prompts, numpy statistics)."""

    def __init__(self, buffer_size, min_count, eps=1e-6, std="group"):
        self.buffer_size, self.min_count, self.eps, self.std = buffer_size, min_count, eps, std
        self.stats = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            pr = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = deque(maxlen=self.buffer_size)
            self.stats[prompt].extend(pr)
            if len(self.stats[prompt]) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards)
            else:
                mean, std = np.mean(self.stats[prompt]), np.std(self.stats[prompt])
            if self.std == "global":
                std = np.std(rewards)
            advantages[prompts == prompt] = (pr - mean) / (std + self.eps)
        return advantages


def batches(n, B, prompts, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        p = [prompts[i] for i in rng.integers(0, len(prompts), B)]
        yield p, rng.normal(size=B) * 2 + rng.normal()


@pytest.mark.parametrize("buffer_size,min_count,std", [(16, 16, "group"), (8, 4, "group"), (None, 0, "global"),
                                                       (5, 1, "group"), (32, 8, "global")])
def test_matches_ddpo_tracker_over_many_batches(buffer_size, min_count, std):
    prompts = [f"a photo of {i} cats" for i in range(7)]
    mine = PerPromptStatTracker(buffer_size, min_count, std=std)
    theirs = DDPOTracker(buffer_size, min_count, std=std)
    # 24 rewards over 7 prompts: some batches hold more rewards of a prompt than buffer_size = 5
    for p, r in batches(12, 24, prompts):
        got = mine.update(p, torch.tensor(r, dtype=torch.float32))
        want = theirs.update(p, torch.tensor(r, dtype=torch.float32).double().numpy())
        assert got.dtype == torch.float32 and got.shape == (24,)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    for k in prompts:
        if k in mine:
            assert mine.history(k) == list(theirs.stats[k])


def test_history_is_bounded_and_ordered():
    t = PerPromptStatTracker(buffer_size=3, min_count=1)
    t.update(["a", "b", "a"], [1.0, 2.0, 3.0])
    t.update(["a", "a"], [4.0, 5.0])
    assert t.history("a") == [3.0, 4.0, 5.0]  # the 3 most recent, oldest first
    assert t.history("b") == [2.0]
    assert t.history("never seen") == []
    assert len(t) == 2 and "a" in t and "c" not in t
    s = t.get_stats()
    assert s["a"]["count"] == 3 and s["a"]["mean"] == 4.0 and s["a"]["std"] == pytest.approx(np.std([3, 4, 5]))
    t.clear()
    assert len(t) == 0 and t.history("a") == []


def test_min_count_fall_back_to_the_batch():
    t = PerPromptStatTracker(buffer_size=10, min_count=3, eps=0.0)
    r = np.array([1.0, 2.0, 6.0, 7.0])
    got = t.update(["a", "a", "b", "b"], r).numpy()
    np.testing.assert_allclose(got, (r - r.mean()) / r.std(), rtol=1e-6)  # both prompts new: batch stats
    r2 = np.array([3.0, 10.0, 20.0])
    got = t.update(["a", "b", "b"], r2).numpy()
    ha = np.array([1.0, 2.0, 3.0])  # "a" reached min_count: its own history
    np.testing.assert_allclose(got[0], (3.0 - ha.mean()) / ha.std(), rtol=1e-6)
    hb = np.array([6.0, 7.0, 10.0, 20.0])
    np.testing.assert_allclose(got[1:], (r2[1:] - hb.mean()) / hb.std(), rtol=1e-6)


def test_equal_rewards_give_exact_zero_never_nan():
    for eps in (1e-6, 0.0):
        t = PerPromptStatTracker(buffer_size=None, min_count=0, eps=eps)
        for _ in range(3):
            got = t.update(["p"] * 5 + ["q"], torch.tensor([0.1] * 5 + [7.0]))
            assert torch.equal(got, torch.zeros(6)), got
    # a single-sample batch with eps = 0 (std 0 everywhere)
    assert torch.equal(PerPromptStatTracker(4, 2, eps=0.0).update(["x"], [3.0]), torch.zeros(1))


def test_clip_and_tensor_prompt_ids_and_device():
    t = PerPromptStatTracker(buffer_size=8, min_count=0, clip=0.5)
    got = t.update(torch.tensor([3, 3, 9, 9]), torch.tensor([0.0, 10.0, 1.0, 2.0]))
    assert got.abs().max() <= 0.5 and got.device.type == "cpu"
    assert t.history(3) == [0.0, 10.0]


def test_state_dict_round_trip_gives_identical_updates():
    prompts = [f"p{i}" for i in range(5)]
    a = PerPromptStatTracker(buffer_size=6, min_count=3)
    seq = list(batches(8, 12, prompts, seed=3))
    for p, r in seq[:4]:
        a.update(p, r)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = PerPromptStatTracker(buffer_size=6, min_count=3)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for p, r in seq[4:]:
        assert torch.equal(a.update(p, r), b.update(p, r))
    assert a.state_dict() == b.state_dict()
    # a smaller buffer keeps the most recent rewards
    c = PerPromptStatTracker(buffer_size=2, min_count=1)
    c.load_state_dict(a.state_dict())
    assert all(c.history(k) == a.history(k)[-2:] for k in prompts if k in a)


def test_bad_input():
    with pytest.raises(ValueError, match="buffer_size"):
        PerPromptStatTracker(buffer_size=0)
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=4, min_count=8)
    with pytest.raises(ValueError, match="std"):
        PerPromptStatTracker(std="batch")
    with pytest.raises(ValueError, match="eps"):
        PerPromptStatTracker(eps=-1.0)
    t = PerPromptStatTracker(4, 1)
    with pytest.raises(ValueError, match="prompts for"):
        t.update(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite"):
        t.update(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"\[B\]"):
        t.update(["a", "b"], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="history"):
        t.load_state_dict({"stats": {}})
    assert len(t) == 0  # a rejected update leaves no trace

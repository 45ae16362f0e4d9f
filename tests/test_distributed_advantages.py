"""Advantages across processes: two CPU processes on the gloo backend, groups split across ranks,
uneven batch sizes; each rank gets exactly its rows of the single-process result."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffrl
from diffrl.distributed import distributed_group_advantages, distributed_win_rate, gather_rewards, prompt_group_ids

WORLD = 2
PROMPTS = ["a red cube", "two blue spheres", "a green cone left of a cat", "an empty table"]


def global_batch():
    """13 rows: 4 prompts, each group split over both ranks; rank 0 holds 5 rows, rank 1 8."""
    g = torch.Generator().manual_seed(1234)
    rows = [PROMPTS[i % len(PROMPTS)] for i in range(13)]
    perm = torch.randperm(13, generator=g).tolist()
    rows = [rows[i] for i in perm]
    rewards = torch.randn(13, 2, generator=g)
    rewards[[i for i, p in enumerate(rows) if p == "an empty table"]] = 0.25  # a tied group across ranks
    return rows, rewards, [(0, 5), (5, 13)]


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows, rewards, spans = global_batch()
        lo, hi = spans[rank]
        ids = prompt_group_ids(rows[lo:hi])
        r = rewards[lo:hi]
        be = "cpp" if diffrl.ops.backend_status("cpp")[0] else "torch"
        res = {
            "ids": ids,
            "group": distributed_group_advantages(r[:, 0], ids, backend=be),
            "global": distributed_group_advantages(r[:, 0], ids, std="global", backend=be),
            "heads": distributed_group_advantages(r, ids, reward_weights=[1.0, 0.5], combine="normalize_each",
                                                  num_steps=3, backend=be),
            "sizes_given": distributed_group_advantages(r[:, 0], ids, sizes=[5, 8], backend=be),
            "win": distributed_win_rate(r[:, 1], ids, backend=be),
        }
        all_r, all_ids, start, stop = gather_rewards(r, ids)
        res["gathered"] = (all_r, all_ids, start, stop)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "rdzv"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_each_rank_gets_its_rows_of_the_global_result(rank_results):
    rows, rewards, spans = global_batch()
    ids = prompt_group_ids(rows)
    be = "cpp" if diffrl.ops.backend_status("cpp")[0] else "torch"
    full = {
        "group": diffrl.group_advantages(rewards[:, 0], ids, backend=be),
        "global": diffrl.group_advantages(rewards[:, 0], ids, std="global", backend=be),
        "heads": diffrl.group_advantages(rewards, ids, reward_weights=[1.0, 0.5], combine="normalize_each",
                                         num_steps=3, backend=be),
        "win": diffrl.win_rate(rewards[:, 1], ids, backend=be),
    }
    full["sizes_given"] = full["group"]
    for rank, (lo, hi) in enumerate(spans):
        res = rank_results[rank]
        assert torch.equal(res["ids"], ids[lo:hi]), "prompt ids must agree across processes"
        for k, v in full.items():
            assert torch.equal(res[k], v[lo:hi]), f"rank {rank}: {k}"
        all_r, all_ids, start, stop = res["gathered"]
        assert torch.equal(all_r, rewards) and torch.equal(all_ids, ids) and (start, stop) == (lo, hi)
    # per-rank normalisation (what many scripts do) is wrong here: the groups span both ranks
    local = diffrl.group_advantages(rewards[:5, 0], ids[:5], backend=be)
    assert not torch.allclose(local, full["group"][:5])
    tied = torch.tensor([p == "an empty table" for p in rows])
    assert torch.equal(full["group"][tied], torch.zeros(int(tied.sum())))


def test_without_a_process_group_it_is_the_local_computation():
    assert not dist.is_initialized()
    r, ids = torch.randn(6), torch.tensor([0, 1, 0, 1, 2, 2])
    assert torch.equal(distributed_group_advantages(r, ids, std="global"),
                       diffrl.group_advantages(r, ids, std="global"))
    assert gather_rewards(r, ids)[2:] == (0, 6)
    with pytest.raises(ValueError, match="group_ids"):
        gather_rewards(r, ids[:5])


def test_prompt_group_ids_are_stable_and_non_negative():
    ids = prompt_group_ids(["a cat", "a dog", "a cat"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1] and (ids >= 0).all()
    want = int.from_bytes(hashlib.blake2b(b"a cat", digest_size=8).digest(), "little") >> 1
    assert int(ids[0]) == want  # no per-process salt (unlike Python's hash)
    with pytest.raises(TypeError):
        prompt_group_ids("a cat")

"""The trainers under FSDP2 (``fully_shard`` through accelerate), on two CPU processes (gloo).

accelerate turns FSDP on only for GPUs and other accelerators: on the CPU it makes the run
data-parallel. The worker below switches its state to FSDP by hand after building the Accelerator;
from there on the model, the optimizer and the reference go through accelerate's own FSDP2
preparation (``fully_shard``, DTensor parameters), as under ``accelerate launch`` with an FSDP2
config on GPUs. What a GPU run adds (NCCL, bf16 mixed precision, CPU offload) is not covered here.
"""

import inspect
import json
from types import SimpleNamespace

import pytest
import torch

from two_ranks import assert_close_dicts, images, launch_two_ranks, wait_all

from diffrl.trainers import GRPOConfig, GRPOTrainer, get_preset, latest_checkpoint, load_checkpoint, load_config
from diffrl.trainers.fsdp import uses_fsdp2

# full fine-tuning with the KL to a frozen copy (sharded too) and an EMA; 2 ranks x 2 prompts x group 2
_OVER = dict(num_inference_steps=1, epochs=2, prompts_per_epoch=4, save_every=1, keep_last=2, use_lora=False,
             lr=1e-4, kl_coef=0.01, ema_decay=0.5, eval_every=2)


_WORKER = r"""
import json, sys, torch
from diffrl.trainers import GRPOTrainer, GRPOConfig, get_preset, load_config
exec(sys.argv[4])  # images()
mode, out = sys.argv[1], sys.argv[2]
_, values = get_preset("tiny-sd3-jpeg")
values.update(json.loads(sys.argv[3]), output_dir=out)
cfg = load_config(GRPOConfig, base=values)
acc = None
if mode == "fsdp":
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    # each transformer block its own FSDP unit (the model's _no_split_modules), the rest in the root
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True)
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)
    # accelerate makes a CPU run data-parallel (MULTI_CPU); FSDP by hand, in both shared states
    # (AcceleratorState() copies PartialState's type each time it is built)
    PartialState().distributed_type = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    tr = GRPOTrainer(cfg, accelerator=acc, progress=False)
    tr.train(1)  # checkpoint epoch 1, then a fresh trainer resumes from it: shards cut from full tensors
    tr = GRPOTrainer(cfg, accelerator=acc, resume=True, progress=False)
    assert tr.resumed_from == 1
    from torch.distributed.tensor import DTensor
    info = {"fsdp": tr.parallel.name == "FSDP", "sharded": all(isinstance(p, DTensor) for p in tr.trainable.values()),
            "reference_sharded": all(isinstance(p, DTensor) for p in tr.reference.parameters())}
else:
    tr = GRPOTrainer(cfg, progress=False)
    info = {"fsdp": tr.parallel.name == "FSDP", "wrapped": tr.model is not tr.raw_model}
tr.train()
copy = lambda w: {k: v.clone() for k, v in w.items()}  # without FSDP they are views of the parameters
# straight after the epoch-2 grid, whose forwards left the FSDP root unsharded (a state_dict() call,
# as in trained_weights(), would reshard it): the EMA must be sampled, not stale trained weights
with tr.ema_weights():
    ema_inside = copy(tr.trained_weights())
    ema_images = images(tr)  # (leaves the root unsharded again, with the EMA)
trained_images = images(tr)  # the trained weights again after the block
weights = copy(tr.trained_weights())
if tr.rank == 0:
    torch.save({"weights": weights, "ema_inside": ema_inside, "ema_images": ema_images,
                "trained_images": trained_images, "info": info}, f"{out}/rank0.pt")
"""


def _launch(tmp_path, mode):
    out = tmp_path / mode
    out.mkdir()
    return out, launch_two_ranks(_WORKER, [mode, out, json.dumps(_OVER), inspect.getsource(images)],
                                 {"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_fsdp2_two_processes_match_ddp_and_write_full_checkpoints(tmp_path):
    """FSDP2 on 2 gloo processes, full fine-tuning, interrupted after epoch 1 and resumed: the same
    weights, EMA and optimizer state as a DDP run of the same config (the same samples and, up to
    float rounding, the same gradients); the checkpoint holds full tensors that a single-process
    trainer loads."""
    (fsdp_out, fsdp_procs), (ddp_out, ddp_procs) = _launch(tmp_path, "fsdp"), _launch(tmp_path, "ddp")
    wait_all(fsdp_procs + ddp_procs)
    f, d = (torch.load(o / "rank0.pt", weights_only=False) for o in (fsdp_out, ddp_out))
    assert f["info"] == {"fsdp": True, "sharded": True, "reference_sharded": True}
    assert d["info"] == {"fsdp": False, "wrapped": True}
    recs = {m: [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()]
            for m, o in (("fsdp", fsdp_out), ("ddp", ddp_out))}
    assert [r["epoch"] for r in recs["fsdp"]] == [1, 2]
    for rf, rd in zip(recs["fsdp"], recs["ddp"]):
        assert rf["samples"] == 8 and rf["optimizer_steps"] == rd["optimizer_steps"] >= 1
        assert rf["reward_mean"] == rd["reward_mean"]  # same weights to float rounding -> same images
        assert rf["loss"] == pytest.approx(rd["loss"], rel=1e-4, abs=1e-7)

    # the trained weights: those of the DDP run, and far from the initial ones
    assert_close_dicts(f["weights"], d["weights"], "weights")
    fresh = GRPOTrainer(load_config(GRPOConfig, base={**get_preset("tiny-sd3-jpeg")[1], **_OVER,
                                                      "output_dir": str(tmp_path / "fresh")}), progress=False)
    initial = fresh.trained_weights()
    assert f["weights"].keys() == initial.keys()
    assert max((f["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4

    # the checkpoints: the format of an unsharded run, full tensors, close to DDP's
    cf, cd = (load_checkpoint(latest_checkpoint(o / "checkpoints"), restore_rng=False) for o in (fsdp_out, ddp_out))
    assert cf["meta"]["epoch"] == 2 and cf["states"].keys() == cd["states"].keys()
    assert {k: v.shape for k, v in cf["weights"].items()} == {k: v.shape for k, v in initial.items()}
    assert_close_dicts(cf["states"]["ema"], cd["states"]["ema"], "checkpoint ema")
    # ema_weights(): the EMA inside the block, the trained weights (those saved) back after it
    assert all(torch.equal(f["ema_inside"][k], v) for k, v in cf["states"]["ema"].items())
    assert all(torch.equal(cf["weights"][k], f["weights"][k]) for k in initial)
    assert any(not torch.equal(f["ema_inside"][k], f["weights"][k]) for k in initial)
    of, od = cf["states"]["optimizer"], cd["states"]["optimizer"]
    assert of["param_groups"] == od["param_groups"] and of["state"].keys() == od["state"].keys()
    for i in od["state"]:
        assert of["state"][i]["exp_avg"].shape == od["state"][i]["exp_avg"].shape
        assert_close_dicts(of["state"][i], od["state"][i], f"optimizer state {i}")

    # a single-process trainer resumes from the FSDP checkpoint and samples what the FSDP ranks
    # sampled, with the trained weights and inside ema_weights()
    single = GRPOTrainer(load_config(GRPOConfig, base={**get_preset("tiny-sd3-jpeg")[1], **_OVER,
                                                       "output_dir": str(fsdp_out)}), resume=True, progress=False)
    assert single.resumed_from == 2 and single.parallel.name != "FSDP"
    assert all(torch.equal(single.trained_weights()[k], f["weights"][k]) for k in initial)
    trained_images = images(single)
    with single.ema_weights():
        ema_images = images(single)
    assert (ema_images - trained_images).abs().max() > 1e-4  # the comparisons below can tell them apart
    torch.testing.assert_close(f["ema_images"], ema_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(f["trained_images"], trained_images, rtol=0, atol=1e-6)
    assert (fsdp_out / "grids" / "epoch-000002.png").is_file()


def test_unsupported_set_ups_are_clear_errors(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    def acc(kind, **kw):  # what the trainer reads of an accelerator before it loads anything
        return SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2, distributed_type=kind,
                               **kw)

    cfg = GRPOConfig(prompts=["a"], pretrained="tiny:sd3", prompts_per_epoch=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="FSDP1 is not supported"):
        GRPOTrainer(cfg, accelerator=acc(DistributedType.FSDP, is_fsdp2=False))
    # under FSDP each model call is a collective: the ranks must sample equal shares
    with pytest.raises(ValueError, match=r"prompts_per_epoch \(3\) must be a multiple of the number of processes"):
        GRPOTrainer(GRPOConfig(prompts=["a"], pretrained="tiny:sd3", prompts_per_epoch=3, output_dir=str(tmp_path)),
                    accelerator=acc(DistributedType.FSDP, is_fsdp2=True))
    assert uses_fsdp2(acc(DistributedType.FSDP, is_fsdp2=True))
    assert not uses_fsdp2(acc(DistributedType.MULTI_CPU))
    assert not uses_fsdp2(acc(DistributedType.DEEPSPEED))  # (tests/test_trainers_deepspeed.py)
    # `accelerate launch --use_fsdp` on a CPU: accelerate runs data-parallel, which is said
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.warns(UserWarning, match="asked for FSDP but runs without it"):
        assert not uses_fsdp2(acc(DistributedType.MULTI_CPU))

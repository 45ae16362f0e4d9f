"""The trainers under DeepSpeed ZeRO (through accelerate), on two CPU processes (gloo).

accelerate turns DeepSpeed on only for GPUs and other accelerators: with ``cpu=True`` it makes the
run data-parallel. The worker below builds the Accelerator with a DeepSpeedPlugin and switches its
state to DeepSpeed by hand; from there on ``accelerator.prepare`` builds a real DeepSpeed engine
(``deepspeed.initialize``, ZeRO optimizer) on DeepSpeed's CPU accelerator, which is what the trainer
drives. Each DeepSpeed run is compared with a DDP run of the same config and seeds. What a GPU run
adds (NCCL, bf16/fp16 through DeepSpeed's config, offload) is not covered here.
"""

import importlib.util
import inspect
import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from diffrl.trainers import GRPOConfig, GRPOTrainer, get_preset, latest_checkpoint, load_checkpoint, load_config

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed, in the dev extra)")

# full fine-tuning with the KL to a frozen copy and an EMA; 2 ranks x 2 prompts x group 2; a linear
# schedule with warm-up, so that a step too many or too few shows in the lr
_FULL = dict(num_inference_steps=1, epochs=2, prompts_per_epoch=4, save_every=1, keep_last=2, use_lora=False,
             lr=1e-4, kl_coef=0.01, ema_decay=0.5, lr_scheduler="linear", lr_warmup_steps=1, max_grad_norm=0.05)
# LoRA with the KL to the base weights (adapters off), two minibatches per step, and a NaN loss on
# one rank in epoch 2 (injected by the worker): the step is skipped on both ranks
_LORA = dict(num_inference_steps=2, epochs=2, prompts_per_epoch=4, save_every=1, keep_last=2, use_lora=True,
             lr=3e-3, kl_coef=0.01, train_batch_size=1, gradient_accumulation_steps=2, lr_scheduler="cosine")


def images(tr):
    """The eval prompts sampled with fixed noise, as floats."""
    c = tr.config
    with torch.no_grad():
        return tr.sampler.sample(list(c.eval_prompts), num_images_per_prompt=1,
                                 num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                                 height=c.resolution, width=c.resolution,
                                 generator=torch.Generator().manual_seed(0)).images


_WORKER = r"""
import json, sys, torch
from diffrl.trainers import GRPOTrainer, GRPOConfig, get_preset, load_config
exec(sys.argv[4])  # images()
mode, out, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
nan_at = over.pop("_nan_at", None)  # (epoch, call) of a NaN loss on rank 1
_, values = get_preset("tiny-sd3-jpeg")
values.update(over, output_dir=out)
cfg = load_config(GRPOConfig, base=values)

class Trainer(GRPOTrainer):
    calls = 0
    def minibatch_loss(self, state, sub, idx, term):
        loss, stats = super().minibatch_loss(state, sub, idx, term)
        Trainer.calls += 1
        if nan_at is not None and self.rank == 1 and [self.epoch + 1, Trainer.calls] == nan_at:
            loss = loss * float("nan")
        return loss, stats
    def run_epoch(self, epoch):
        Trainer.calls = 0
        return super().run_epoch(epoch)

acc = None
if mode.startswith("zero"):
    import deepspeed  # DeepSpeed's CPU accelerator (no GPU here)
    # its shared-memory all-reduce (for inference) is compiled with ninja on first use (~80 s); ZeRO
    # training does not use it
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType
    plugin = DeepSpeedPlugin(zero_stage=int(mode[-1]))
    acc = Accelerator(cpu=True, deepspeed_plugin=plugin)
    # accelerate makes a CPU run data-parallel (MULTI_CPU); DeepSpeed by hand, in both shared states,
    # as AcceleratorState does it on a GPU (the plugin told the mixed precision and selected)
    PartialState().distributed_type = DistributedType.DEEPSPEED
    state = AcceleratorState()
    plugin.set_mixed_precision("no")
    plugin.select(_from_accelerator_state=True)
    state.distributed_type, state.deepspeed_plugins = DistributedType.DEEPSPEED, plugin
    tr = Trainer(cfg, accelerator=acc, progress=False)
    tr.train(1)  # checkpoint epoch 1, then a fresh trainer (a new engine) resumes from it
    tr = Trainer(cfg, accelerator=acc, resume=True, progress=False)
    assert tr.resumed_from == 1
    info = {"zero": tr.zero, "engine": type(tr.model).__name__}
else:
    tr = Trainer(cfg, progress=False)
    info = {"zero": tr.zero, "wrapped": tr.model is not tr.raw_model}
tr.train()
copy = lambda w: {k: v.detach().clone() for k, v in w.items()}
with tr.ema_weights() if tr.ema is not None else __import__("contextlib").nullcontext():
    ema_inside = copy(tr.trained_weights())
weights = copy(tr.trained_weights())
frozen = {k: v.detach().clone() for k, v in tr.raw_model.state_dict().items() if k not in tr.trainable}
frozen.update({f"vae.{k}": v.clone() for k, v in tr.pipe.vae.state_dict().items()})
if tr.rank == 0:
    torch.save({"weights": weights, "ema_inside": ema_inside, "trained_images": images(tr), "frozen": frozen,
                "info": info}, f"{out}/rank0.pt")
"""


def _launch(tmp_path, mode, over):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / mode
    out.mkdir()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, mode, str(out), json.dumps(over),
                                       inspect.getsource(images)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return out, procs


def _wait(procs):
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-4000:]


def _close(a, b, what, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")


def _run_pair(tmp_path, mode, over):
    (z_out, z_procs), (d_out, d_procs) = _launch(tmp_path, mode, over), _launch(tmp_path, "ddp", over)
    _wait(z_procs + d_procs)
    z, d = (torch.load(o / "rank0.pt", weights_only=False) for o in (z_out, d_out))
    recs = {m: [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()]
            for m, o in ((mode, z_out), ("ddp", d_out))}
    return z_out, d_out, z, d, recs


def _fresh(tmp_path, over, name="fresh", **kw):
    return GRPOTrainer(load_config(GRPOConfig, base={**get_preset("tiny-sd3-jpeg")[1], **over,
                                                     "output_dir": str(tmp_path / name)}), progress=False, **kw)


@needs_deepspeed
@pytest.mark.slow
def test_zero2_full_finetuning_matches_ddp_resumes_and_writes_full_checkpoints(tmp_path):
    """ZeRO-2 on 2 gloo processes, full fine-tuning with the KL reference, an EMA and an LR schedule,
    interrupted after epoch 1 and resumed by a fresh trainer (a new engine): the weights, EMA, optimizer
    state and LR of a DDP run of the same config; the checkpoint is in the single-process format and a
    single-process trainer loads it."""
    z_out, d_out, z, d, recs = _run_pair(tmp_path, "zero2", _FULL)
    assert z["info"] == {"zero": 2, "engine": "DeepSpeedEngine"}
    assert d["info"] == {"zero": None, "wrapped": True}
    assert [r["epoch"] for r in recs["zero2"]] == [1, 2]
    for rz, rd in zip(recs["zero2"], recs["ddp"]):
        assert rz["optimizer_steps"] == rd["optimizer_steps"] >= 1 and rz["skipped_updates"] == 0
        assert rz["lr"] == rd["lr"]  # the schedule advanced exactly as under DDP
        assert rz["reward_mean"] == rd["reward_mean"]
        assert rz["loss"] == pytest.approx(rd["loss"], rel=1e-4, abs=1e-7)
        assert rz["grad_norm"] == pytest.approx(rd["grad_norm"], rel=1e-4)
        assert rz["grad_norm"] > _FULL["max_grad_norm"]  # so clipping was active (in DeepSpeed's engine)

    _close(z["weights"], d["weights"], "weights")
    initial = _fresh(tmp_path, _FULL).trained_weights()
    assert z["weights"].keys() == initial.keys()
    assert max((z["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    _close(z["frozen"], d["frozen"], "frozen", rtol=0, atol=0)  # the VAE (and buffers) untouched

    cz, cd = (load_checkpoint(latest_checkpoint(o / "checkpoints"), restore_rng=False) for o in (z_out, d_out))
    assert cz["meta"]["epoch"] == 2 and cz["states"].keys() == cd["states"].keys()
    assert {k: v.shape for k, v in cz["weights"].items()} == {k: v.shape for k, v in initial.items()}
    _close(cz["states"]["ema"], cd["states"]["ema"], "checkpoint ema")
    assert all(torch.equal(z["ema_inside"][k], v) for k, v in cz["states"]["ema"].items())
    assert all(torch.equal(cz["weights"][k], z["weights"][k]) for k in initial)
    oz, od = cz["states"]["optimizer"], cd["states"]["optimizer"]
    assert oz["param_groups"] == od["param_groups"] and oz["state"].keys() == od["state"].keys()
    for i in od["state"]:
        assert oz["state"][i].keys() == od["state"][i].keys()
        _close(oz["state"][i], od["state"][i], f"optimizer state {i}")
    assert cz["states"]["lr_scheduler"] == cd["states"]["lr_scheduler"]

    # a single-process trainer resumes from the DeepSpeed checkpoint and samples what rank 0 sampled
    single = _fresh(tmp_path, _FULL, name="zero2", resume=True)
    assert single.resumed_from == 2 and single.zero is None
    assert all(torch.equal(single.trained_weights()[k], z["weights"][k]) for k in initial)
    torch.testing.assert_close(z["trained_images"], images(single), rtol=0, atol=1e-6)


@needs_deepspeed
@pytest.mark.slow
def test_zero1_lora_skips_a_nan_step_like_ddp(tmp_path):
    """ZeRO-1, LoRA with the KL to the adapters-off base, accumulation over two minibatches, and a NaN
    loss on one rank in epoch 2: that step is skipped on both ranks (weights, moments and LR untouched),
    as under DDP; the base weights do not move; the run resumes from its checkpoint to DDP's weights."""
    over = {**_LORA, "_nan_at": [2, 1]}
    z_out, d_out, z, d, recs = _run_pair(tmp_path, "zero1", over)
    assert z["info"] == {"zero": 1, "engine": "DeepSpeedEngine"}
    for rz, rd in zip(recs["zero1"], recs["ddp"]):
        assert (rz["optimizer_steps"], rz["skipped_updates"], rz["lr"]) == \
            (rd["optimizer_steps"], rd["skipped_updates"], rd["lr"])
    assert [r["skipped_updates"] for r in recs["zero1"]] == [0, 1]
    assert recs["zero1"][1]["optimizer_steps"] >= 1
    _close(z["weights"], d["weights"], "weights")
    initial = _fresh(tmp_path, _LORA).trained_weights()
    assert max((z["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    assert z["frozen"].keys() == d["frozen"].keys() and len(z["frozen"]) > len(initial)
    _close(z["frozen"], d["frozen"], "base weights", rtol=0, atol=0)
    fresh = _fresh(tmp_path, _LORA, name="base")
    base = {k: v for k, v in fresh.raw_model.state_dict().items() if k not in fresh.trainable}
    assert all(torch.equal(z["frozen"][k], v) for k, v in base.items())  # LoRA: the base never moved
    cz, cd = (load_checkpoint(latest_checkpoint(o / "checkpoints"), restore_rng=False) for o in (z_out, d_out))
    oz, od = cz["states"]["optimizer"], cd["states"]["optimizer"]
    assert oz["param_groups"] == od["param_groups"]
    for i in od["state"]:
        _close(oz["state"][i], od["state"][i], f"optimizer state {i}")


def test_unsupported_deepspeed_set_ups_are_clear_errors(tmp_path):
    from accelerate.utils import DistributedType

    def acc(zero: dict):  # what the trainer reads of an accelerator before it loads anything
        plugin = SimpleNamespace(zero_stage=zero.get("stage"), deepspeed_config={"zero_optimization": zero})
        return SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2,
                               distributed_type=DistributedType.DEEPSPEED,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    cfg = GRPOConfig(prompts=["a"], pretrained="tiny:sd3", prompts_per_epoch=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ZeRO stage 3 is not supported.*ZeRO stages 1 and 2, or FSDP2"):
        GRPOTrainer(cfg, accelerator=acc({"stage": 3}))
    with pytest.raises(ValueError, match=r"ZeRO stage 0 is not supported.*run without DeepSpeed"):
        GRPOTrainer(cfg, accelerator=acc({"stage": 0}))
    with pytest.raises(ValueError, match="offload_optimizer is not supported"):
        GRPOTrainer(cfg, accelerator=acc({"stage": 2, "offload_optimizer": {"device": "cpu"}}))

    from diffrl.trainers.deepspeed import configure

    def plugin_acc(ds):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))

    ds = {"gradient_clipping": "auto", "bf16": {"enabled": True}}
    configure(plugin_acc(ds), cfg)
    assert ds == {"gradient_clipping": cfg.max_grad_norm, "train_micro_batch_size_per_gpu": cfg.train_batch_size,
                  "gradient_accumulation_steps": 1, "bf16": {"enabled": True, "check_grad_overflow": True}}
    with pytest.raises(ValueError, match=r"gradient_clipping=0.5 but the diffrl config implies 1.0 \(max_grad_norm"):
        configure(plugin_acc({"gradient_clipping": 0.5}), cfg)

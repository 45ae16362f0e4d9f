"""The trainers under DeepSpeed ZeRO (through accelerate), on two CPU processes (gloo).

accelerate turns DeepSpeed on only for GPUs and other accelerators: with ``cpu=True`` it makes the
run data-parallel. The worker below builds the Accelerator with a DeepSpeedPlugin and switches its
state to DeepSpeed by hand; from there on ``accelerator.prepare`` builds a real DeepSpeed engine
(``deepspeed.initialize``, ZeRO optimizer) on DeepSpeed's CPU accelerator, which is what the trainer
drives. Each DeepSpeed run (ZeRO-1, 2 and 3) is compared with a DDP run of the same config and seeds.
What a GPU run adds (NCCL, bf16/fp16 through DeepSpeed's config, offload) is not covered here.
"""

import importlib.util
import inspect
import json
from types import SimpleNamespace

import pytest
import torch

from two_ranks import assert_close_dicts, images, launch_two_ranks, wait_all

from diffrl.trainers import GRPOConfig, GRPOTrainer, get_preset, latest_checkpoint, load_checkpoint, load_config

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install deepspeed, in the dev extra)")

# full fine-tuning with the KL to a frozen copy and an EMA; 2 ranks x 2 prompts x group 2; a linear
# schedule with warm-up, so that a step too many or too few shows in the lr
_FULL = dict(num_inference_steps=1, epochs=2, prompts_per_epoch=4, save_every=1, keep_last=2, use_lora=False,
             lr=1e-4, kl_coef=0.01, ema_decay=0.5, lr_scheduler="linear", lr_warmup_steps=1, max_grad_norm=0.05)
# LoRA with the KL to the base weights (adapters off), an EMA, two minibatches per step, and a NaN loss
# on one rank in epoch 2 (injected by the worker): the step is skipped on both ranks
_LORA = dict(num_inference_steps=2, epochs=2, prompts_per_epoch=4, save_every=1, keep_last=2, use_lora=True,
             lr=3e-3, kl_coef=0.01, ema_decay=0.5, train_batch_size=1, gradient_accumulation_steps=2,
             lr_scheduler="cosine")


_WORKER = r"""
import json, sys, torch
from diffrl.trainers import GRPOTrainer, GRPOConfig, get_preset, load_config
from diffrl.trainers.objectives import PPOObjective
exec(sys.argv[4])  # images()
mode, out, over = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
nan_at = over.pop("_nan_at", None)  # (epoch, call) of a NaN loss on rank 1
zero_opts = over.pop("_zero", {})  # extra zero_optimization entries
_, values = get_preset("tiny-sd3-jpeg")
values.update(over, output_dir=out)
cfg = load_config(GRPOConfig, base=values)

class NaNObjective(PPOObjective):
    def loss(self, state, sub, idx, term):
        loss, stats = super().loss(state, sub, idx, term)
        tr = self.trainer
        Trainer.calls += 1
        if nan_at is not None and tr.rank == 1 and [tr.epoch + 1, Trainer.calls] == nan_at:
            loss = loss * float("nan")
        return loss, stats

class Trainer(GRPOTrainer):
    calls = 0
    objective_class = NaNObjective
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
    plugin.deepspeed_config["zero_optimization"].update(zero_opts)
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
    info = {"zero": tr.parallel.zero_stage, "engine": type(tr.model).__name__,
            "partitioned": all(hasattr(p, "ds_id") for p in tr.trainable.values())}
else:
    tr = Trainer(cfg, progress=False)
    info = {"zero": tr.parallel.zero_stage, "wrapped": tr.model is not tr.raw_model}
tr.train()
copy = lambda w: {k: v.detach().clone() for k, v in w.items()}
# (every rank samples and gathers: under ZeRO-3 each model call and each gather is a collective)
ema_inside = ema_images = None
if tr.ema is not None:
    with tr.ema_weights():
        ema_inside = copy(tr.trained_weights())
        ema_images = images(tr)
trained_images = images(tr)  # the trained weights again after the block
weights = copy(tr.trained_weights())
frozen = copy(tr.parallel.whole({k: v for k, v in tr.raw_model.state_dict(keep_vars=True).items()
                             if k not in tr.trainable}))
frozen.update({f"vae.{k}": v.clone() for k, v in tr.pipe.vae.state_dict().items()})
if tr.rank == 0:
    torch.save({"weights": weights, "ema_inside": ema_inside, "ema_images": ema_images,
                "trained_images": trained_images, "frozen": frozen, "info": info}, f"{out}/rank0.pt")
"""


def _launch(tmp_path, mode, over):
    out = tmp_path / mode
    out.mkdir()
    return out, launch_two_ranks(_WORKER, [mode, out, json.dumps(over), inspect.getsource(images)],
                                 {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})


def _same_optimizer_and_schedule(cz, cd):
    """The optimizer state (per parameter) and LR schedule of a DeepSpeed checkpoint match the DDP run's."""
    oz, od = cz["states"]["optimizer"], cd["states"]["optimizer"]
    assert oz["param_groups"] == od["param_groups"] and oz["state"].keys() == od["state"].keys()
    for i in od["state"]:
        assert oz["state"][i].keys() == od["state"][i].keys()
        assert_close_dicts(oz["state"][i], od["state"][i], f"optimizer state {i}")
    assert cz["states"]["lr_scheduler"] == cd["states"]["lr_scheduler"]


def _run(tmp_path, modes, over):
    """Runs of ``over`` in each mode, side by side: {mode: (output dir, rank 0's results, metrics records)}."""
    launched = {m: _launch(tmp_path, m, over) for m in modes}
    wait_all([p for _, procs in launched.values() for p in procs])
    return {m: (o, torch.load(o / "rank0.pt", weights_only=False),
                [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()])
            for m, (o, _) in launched.items()}


def _run_pair(tmp_path, mode, over):
    runs = _run(tmp_path, [mode, "ddp"], over)
    (z_out, z, z_recs), (d_out, d, d_recs) = runs[mode], runs["ddp"]
    return z_out, d_out, z, d, {mode: z_recs, "ddp": d_recs}


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
    assert z["info"] == {"zero": 2, "engine": "DeepSpeedEngine", "partitioned": False}
    assert d["info"] == {"zero": None, "wrapped": True}
    assert [r["epoch"] for r in recs["zero2"]] == [1, 2]
    for rz, rd in zip(recs["zero2"], recs["ddp"]):
        assert rz["optimizer_steps"] == rd["optimizer_steps"] >= 1 and rz["skipped_updates"] == 0
        assert rz["lr"] == rd["lr"]  # the schedule advanced exactly as under DDP
        assert rz["reward_mean"] == rd["reward_mean"]
        assert rz["loss"] == pytest.approx(rd["loss"], rel=1e-4, abs=1e-7)
        assert rz["grad_norm"] == pytest.approx(rd["grad_norm"], rel=1e-4)
        assert rz["grad_norm"] > _FULL["max_grad_norm"]  # so clipping was active (in DeepSpeed's engine)

    assert_close_dicts(z["weights"], d["weights"], "weights")
    initial = _fresh(tmp_path, _FULL).trained_weights()
    assert z["weights"].keys() == initial.keys()
    assert max((z["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    assert_close_dicts(z["frozen"], d["frozen"], "frozen", rtol=0, atol=0)  # the VAE (and buffers) untouched

    cz, cd = (load_checkpoint(latest_checkpoint(o / "checkpoints"), restore_rng=False) for o in (z_out, d_out))
    assert cz["meta"]["epoch"] == 2 and cz["states"].keys() == cd["states"].keys()
    assert {k: v.shape for k, v in cz["weights"].items()} == {k: v.shape for k, v in initial.items()}
    assert_close_dicts(cz["states"]["ema"], cd["states"]["ema"], "checkpoint ema")
    assert all(torch.equal(z["ema_inside"][k], v) for k, v in cz["states"]["ema"].items())
    assert all(torch.equal(cz["weights"][k], z["weights"][k]) for k in initial)
    _same_optimizer_and_schedule(cz, cd)

    # a single-process trainer resumes from the DeepSpeed checkpoint and samples what rank 0 sampled
    single = _fresh(tmp_path, _FULL, name="zero2", resume=True)
    assert single.resumed_from == 2 and single.parallel.zero_stage is None
    assert all(torch.equal(single.trained_weights()[k], z["weights"][k]) for k in initial)
    torch.testing.assert_close(z["trained_images"], images(single), rtol=0, atol=1e-6)


@needs_deepspeed
@pytest.mark.slow
def test_zero1_and_zero3_lora_skip_a_nan_step_like_ddp(tmp_path):
    """ZeRO-1 and ZeRO-3, LoRA with the KL to the adapters-off base, an EMA, accumulation over two
    minibatches, and a NaN loss on one rank in epoch 2: that step is skipped on both ranks (weights,
    moments and LR untouched), as under DDP; the base weights do not move; the runs resume from their
    checkpoints to DDP's weights, EMA and optimizer state. ZeRO-3 with its default persistence threshold:
    the tiny model's parameters stay gathered between forwards, so ema_weights() must drop those copies
    (its images are DDP's)."""
    runs = _run(tmp_path, ["zero1", "zero3", "ddp"], {**_LORA, "_nan_at": [2, 1]})
    d_out, d, d_recs = runs["ddp"]
    initial = _fresh(tmp_path, _LORA).trained_weights()
    fresh = _fresh(tmp_path, _LORA, name="base")
    base = {k: v for k, v in fresh.raw_model.state_dict().items() if k not in fresh.trainable}
    cd = load_checkpoint(latest_checkpoint(d_out / "checkpoints"), restore_rng=False)
    for mode, (z_out, z, z_recs) in runs.items():
        if mode == "ddp":
            continue
        assert z["info"] == {"zero": int(mode[-1]), "engine": "DeepSpeedEngine", "partitioned": mode == "zero3"}
        for rz, rd in zip(z_recs, d_recs):
            assert (rz["optimizer_steps"], rz["skipped_updates"], rz["lr"]) == \
                (rd["optimizer_steps"], rd["skipped_updates"], rd["lr"])
        assert [r["skipped_updates"] for r in z_recs] == [0, 1]
        assert z_recs[1]["optimizer_steps"] >= 1
        assert_close_dicts(z["weights"], d["weights"], f"{mode} weights")
        assert max((z["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
        assert z["frozen"].keys() == d["frozen"].keys() and len(z["frozen"]) > len(initial)
        assert_close_dicts(z["frozen"], d["frozen"], f"{mode} base weights", rtol=0, atol=0)
        assert all(torch.equal(z["frozen"][k], v) for k, v in base.items())  # LoRA: the base never moved
        assert_close_dicts(z["ema_inside"], d["ema_inside"], f"{mode} ema")
        # (epoch 2 skipped a step, so it is not checkpointed: the newest checkpoint is epoch 1's)
        cz = load_checkpoint(latest_checkpoint(z_out / "checkpoints"), restore_rng=False)
        assert cz["meta"]["epoch"] == cd["meta"]["epoch"] == 1
        assert_close_dicts(cz["states"]["ema"], cd["states"]["ema"], f"{mode} checkpoint ema")
        oz, od = cz["states"]["optimizer"], cd["states"]["optimizer"]
        assert oz["param_groups"] == od["param_groups"]
        for i in od["state"]:
            assert_close_dicts(oz["state"][i], od["state"][i], f"{mode} optimizer state {i}")
        assert (d["ema_images"] - d["trained_images"]).abs().max() > 1e-4
        for what in ("ema_images", "trained_images"):
            torch.testing.assert_close(z[what], d[what], rtol=0, atol=1e-5,
                                       msg=lambda m, w=f"{mode} {what}": f"{w}: {m}")


# ZeRO-3: the full fine-tuning run above with no parameter kept gathered between forwards (persistence
# threshold 0): every forward (sampling included) gathers, and the EMA swap and the resume write partitions;
# an image grid after epoch 2 (sampled on both ranks)
_FULL3 = {**_FULL, "eval_every": 2, "_zero": {"stage3_param_persistence_threshold": 0}}


@needs_deepspeed
@pytest.mark.slow
def test_zero3_full_finetuning_matches_ddp_resumes_and_writes_full_checkpoints(tmp_path):
    """ZeRO-3 (partitioned parameters) on 2 gloo processes, full fine-tuning with the KL reference, an
    EMA and an LR schedule, interrupted after epoch 1 and resumed by a fresh trainer: the weights, EMA,
    optimizer state and LR of the DDP run; the pipeline's own denoiser samples (every rank joins each
    call), inside ema_weights() too; a single-process trainer loads the checkpoint and samples the same."""
    z_out, d_out, z, d, recs = _run_pair(tmp_path, "zero3", _FULL3)
    assert z["info"] == {"zero": 3, "engine": "DeepSpeedEngine", "partitioned": True}
    for rz, rd in zip(recs["zero3"], recs["ddp"]):
        assert rz["optimizer_steps"] == rd["optimizer_steps"] >= 1 and rz["skipped_updates"] == 0
        assert rz["lr"] == rd["lr"]
        assert rz["reward_mean"] == pytest.approx(rd["reward_mean"], rel=1e-5, abs=1e-6)
        assert rz["loss"] == pytest.approx(rd["loss"], rel=1e-4, abs=1e-7)
        assert rz["grad_norm"] == pytest.approx(rd["grad_norm"], rel=1e-4)

    assert_close_dicts(z["weights"], d["weights"], "weights")
    initial = _fresh(tmp_path, _FULL).trained_weights()
    assert {k: v.shape for k, v in z["weights"].items()} == {k: v.shape for k, v in initial.items()}
    assert max((z["weights"][k] - initial[k]).abs().max().item() for k in initial) > 1e-4
    assert_close_dicts(z["frozen"], d["frozen"], "frozen", rtol=0, atol=0)

    cz, cd = (load_checkpoint(latest_checkpoint(o / "checkpoints"), restore_rng=False) for o in (z_out, d_out))
    assert cz["meta"]["epoch"] == 2 and cz["states"].keys() == cd["states"].keys()
    assert all(torch.equal(cz["weights"][k], z["weights"][k]) for k in initial)
    assert_close_dicts(cz["states"]["ema"], cd["states"]["ema"], "checkpoint ema")
    assert all(torch.equal(z["ema_inside"][k], v) for k, v in cz["states"]["ema"].items())
    assert any(not torch.equal(z["ema_inside"][k], z["weights"][k]) for k in initial)
    _same_optimizer_and_schedule(cz, cd)

    single = _fresh(tmp_path, _FULL, name="zero3", resume=True)
    assert single.resumed_from == 2 and single.parallel.zero_stage is None
    trained_images = images(single)
    with single.ema_weights():
        ema_images = images(single)
    assert (ema_images - trained_images).abs().max() > 1e-4  # the comparisons below can tell them apart
    torch.testing.assert_close(z["trained_images"], trained_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(z["ema_images"], ema_images, rtol=0, atol=1e-6)
    assert (z_out / "grids" / "epoch-000002.png").is_file()


def test_unsupported_deepspeed_set_ups_are_clear_errors(tmp_path):
    from accelerate.utils import DistributedType

    from diffrl.trainers.deepspeed import configure, zero_stage

    def acc(zero: dict):  # what the trainer reads of an accelerator before it loads anything
        plugin = SimpleNamespace(zero_stage=zero.get("stage"), deepspeed_config={"zero_optimization": zero})
        return SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2,
                               distributed_type=DistributedType.DEEPSPEED,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    cfg = GRPOConfig(prompts=["a"], pretrained="tiny:sd3", prompts_per_epoch=2, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ZeRO stage 0 is not supported.*run without DeepSpeed.*stages 1, 2 and 3"):
        GRPOTrainer(cfg, accelerator=acc({"stage": 0}))
    assert zero_stage(acc({"stage": 3})) == 3  # (run in test_zero3_full_finetuning_...)
    # under ZeRO-3 each model call gathers the parameters (a collective): the ranks must sample equal shares
    with pytest.raises(ValueError, match=r"under ZeRO-3 prompts_per_epoch \(3\) must be a multiple of the number"):
        GRPOTrainer(GRPOConfig(prompts=["a"], pretrained="tiny:sd3", prompts_per_epoch=3, output_dir=str(tmp_path)),
                    accelerator=acc({"stage": 3}))
    with pytest.raises(ValueError, match="offload_optimizer is not supported"):
        GRPOTrainer(cfg, accelerator=acc({"stage": 2, "offload_optimizer": {"device": "cpu"}}))


    def plugin_acc(ds):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds)))

    ds = {"gradient_clipping": "auto", "bf16": {"enabled": True}}
    configure(plugin_acc(ds), cfg)
    assert ds == {"gradient_clipping": cfg.max_grad_norm, "train_micro_batch_size_per_gpu": cfg.train_batch_size,
                  "gradient_accumulation_steps": 1, "bf16": {"enabled": True, "check_grad_overflow": True}}
    # the entries accelerate would derive from config.hidden_size (diffusers models have none): DeepSpeed's defaults
    ds = {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto", "reduce_bucket_size": 1000,
                                "stage3_param_persistence_threshold": "auto"}}
    configure(plugin_acc(ds), cfg)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 50_000_000,
                                       "reduce_bucket_size": 1000, "stage3_param_persistence_threshold": 100_000}
    with pytest.raises(ValueError, match=r"gradient_clipping=0.5 but the diffrl config implies 1.0 \(max_grad_norm"):
        configure(plugin_acc({"gradient_clipping": 0.5}), cfg)

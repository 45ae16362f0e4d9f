"""Whole GRPO epochs: time per epoch (sampling, reward, PPO update) and peak memory of ``GRPOTrainer``.

Models (``--shapes``):

tiny-sd3    the tiny random-weight SD3 pipeline (``tiny:sd3``), fp32, 64 px (CPU default)
sd3-medium  an SD3-medium-shaped random transformer (24 joint blocks, width 1536, ~2 B parameters) with
            tiny text towers and VAE (``diffrl.models.tiny.sd3_medium_pipeline``), bf16 weights with
            bf16 autocast, LoRA rank 32 on the attention projections, 512 px (CUDA default; ``--sizes``
            sets the image side, ``DIFFRL_BENCH_SD3_LAYERS=1`` shrinks it for a smoke test)

One epoch: P prompts x G images (CFG 4.5, T = 10 SDE steps, noise level 0.7, every step recorded),
JPEG-incompressibility reward, group advantages, one PPO pass over every recorded step in minibatches
of ``train_batch_size`` with CFG in the training forward (as Flow-GRPO trains), KL to the adapter-free
reference. The first epoch is a warm-up (allocator, cuDNN / kernel selection) and is reported as such;
the table shows every epoch, the median of the later ones is what to quote. Peak memory is
``torch.cuda.max_memory_allocated`` over the epoch (weights included).
"""

from __future__ import annotations

import os
import statistics
import tempfile

import torch

OP = "trainer"


def _config(model: str, size: int, quick: bool, out_dir: str, device_type: str):
    from diffrl.trainers import GRPOConfig  # noqa: PLC0415

    big = model == "sd3-medium"
    prompts = [f"a photo of object number {i}" for i in range(16)]
    return GRPOConfig(
        pretrained="tiny:sd3", prompts=prompts, resolution=size, num_inference_steps=10, guidance_scale=4.5,
        epochs=2 if quick else 3, prompts_per_epoch=(4 if quick else 8) if big else 4, group_size=4,
        sample_batch_size=16 if big else 8, train_batch_size=4, noise_level=0.7, clip_range=1e-4,
        kl_coef=0.04, lr=1e-4, lora_rank=32 if big else 4, lora_alpha=64 if big else 8,
        mixed_precision="bf16" if big else "no", save_every=0, keep_last=1, output_dir=out_dir,
        device="cuda" if device_type == "cuda" else "cpu", reward={"jpeg_incompressibility": 1.0})


def run(ctx) -> list[dict]:
    from diffrl.trainers import GRPOTrainer  # noqa: PLC0415

    dev = ctx.device.type
    models = ctx.shapes or (("sd3-medium",) if dev == "cuda" else ("tiny-sd3",))
    rows = []
    for model in models:
        size = (ctx.sizes or (512 if model == "sd3-medium" else 64,))[0]
        with tempfile.TemporaryDirectory() as out_dir:
            cfg = _config(model, size, ctx.quick, out_dir, dev)
            pipe = None
            if model == "sd3-medium":
                from diffrl.models.tiny import sd3_medium_pipeline  # noqa: PLC0415

                layers = int(os.environ.get("DIFFRL_BENCH_SD3_LAYERS", "24"))
                pipe = sd3_medium_pipeline(dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
                                           device=ctx.device, num_layers=layers)
            trainer = GRPOTrainer(cfg, pipeline=pipe, progress=False)
            n_train = sum(p.numel() for p in getattr(trainer.pipe, trainer.denoiser_name).parameters()
                          if p.requires_grad)
            records = []
            for epoch in range(1, cfg.epochs + 1):
                rec = trainer.run_epoch(epoch)
                records.append(rec)
                ctx.log(f"  [{model} {size}px] epoch {epoch}: {rec['time_epoch']:.2f} s (sample "
                        f"{rec['time_sample']:.2f}, reward {rec['time_reward']:.2f}, train {rec['time_train']:.2f}); "
                        f"peak {rec['peak_memory_mb']} MB")
            del trainer, pipe
            if dev == "cuda":
                torch.cuda.empty_cache()
        steady = [r["time_epoch"] for r in records[1:]] or [records[0]["time_epoch"]]
        for r in records:
            rows.append({
                "case": model, "px": size, "images": r["samples"], "steps": cfg.num_inference_steps,
                "epoch": r["epoch"] if r["epoch"] > 1 else "1 (warm-up)", "epoch_s": round(r["time_epoch"], 3),
                "sample_s": round(r["time_sample"], 3), "reward_s": round(r["time_reward"], 3),
                "train_s": round(r["time_train"], 3), "peak_mem_mb": r["peak_memory_mb"],
                "optimizer_steps": r.get("optimizer_steps"), "trained_params": n_train,
                "reward_mean": round(r["reward_mean"], 4), "loss": r.get("loss"),
                "median_epoch_s_after_warmup": round(statistics.median(steady), 3),
            })
    return rows

#!/usr/bin/env python
"""Pre-trains diffrl's built-in shapes base model (:mod:`diffrl.models.shapes_model`) from scratch on CPU.

Data: an infinite stream of freshly rendered (prompt, image) pairs -- ``random_prompt`` draws a prompt
of the grammar, ``render`` draws it at 32x32 with a fresh layout seed; no dataset files. The prompts of
the held-out evaluation set (``--eval-prompts`` prompts from ``random_prompt(random.Random(EVAL_SEED +
i))``) are excluded from training (compared by ``Scene.key``, so "A left of B" also excludes "B right
of A"): the reported accuracy is on prompts the model never saw.

Objective: rectified flow, ``x_t = (1 - t) x0 + t eps`` with x0 the image in [-1, 1]. The model
returns the velocity ``v = eps - x0`` (what samplers use); by default (``prediction="x0"``) the network
predicts x0 and ``v = (x_t - x0_hat) / t``, trained with the MSE on x0. t is logit-normal(0, 1) (SD3's
choice: more weight on mid noise levels, where layout and counts are decided). The prompt is replaced
by "" with probability ``--cfg-dropout`` so the model also learns the null condition for classifier-free
guidance. AdamW with linear warmup and cosine decay; an EMA of the weights is what gets evaluated and saved.

The run stops after ``--steps`` steps or ``--max-minutes`` of wall time, whichever comes first, or
early once the held-out accuracy reaches ``--stop-at-accuracy`` (the base model is meant to be
*imperfect*, so that RL fine-tuning has something to fix). Every ``--eval-every`` steps it samples the
held-out prompts (fixed seeds, ``--eval-steps`` Euler steps, CFG ``--eval-cfg``) and scores them with
:class:`diffrl.rewards.ShapesReward`.

Outputs: the pipeline folder (``save_pretrained``, safetensors) in ``--output-dir`` (default
``runs/shapes_base``; the packaged model is ``py/diffrl/models/shapes_base``) and ``train_log.json``
beside it (config, steps, wall time, loss curve, eval history, final eval).

GPU: ``--device cuda --workers N`` renders the batches in N background processes;
``scripts/gpu_train_shapes.sh`` trains several candidates side by side on one lent GPU.

The shipped model (``py/diffrl/models/shapes_base``, see its README.md) came from one such run: patch 4,
batch 256, 6.3 min on an H100, held-out accuracy 0.34. Earlier runs on a 2-core CPU (17-22 min,
patch 8 and 4, velocity and x0 prediction) reached loss ~0.05 but held-out accuracy 0.00: on a CPU
this script is a smoke test, not a way to get a usable model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "py"))  # run from a checkout without installing

from diffrl.models.shapes import (COLORS, Scene, near_miss_scene, parse_prompt, random_prompt,  # noqa: E402
                                  render_batch)
from diffrl.models.shapes_eval import evaluate, heldout_prompts, save_grid  # noqa: E402
from diffrl.models.shapes_model import build_pipeline  # noqa: E402
from diffrl.rewards import ShapesReward  # noqa: E402

DEFAULT_OUT = ROOT / "runs" / "shapes_base"  # never the packaged folder by default: copy a run there by hand


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--max-minutes", type=float, default=22.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--patch-size", type=int, default=4, help="4 -> 64 tokens (the shipped model); 8 -> 16 tokens")
    p.add_argument("--sample-size", type=int, default=32, help="image side in px (16 or 32)")
    p.add_argument("--caption-noise", type=float, default=0.0,
                   help="fraction of training images that show a near-miss of their caption's scene (one colour, "
                        "shape or count changed, or the relation reversed), as slightly wrong web captions do")
    p.add_argument("--caption-swap", type=float, default=0.0,
                   help="fraction of training images whose colours are all shifted by one fixed permutation of the "
                        "colours (red drawn as the next colour, ...): a systematic caption error, a habit the model "
                        "learns next to the skill")
    p.add_argument("--conv-channels", type=int, default=0, help="conv stem/head width (0: plain patchify)")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts for the periodic evals")
    p.add_argument("--final-eval-prompts", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-cfg", type=float, default=4.0)
    p.add_argument("--stop-at-accuracy", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="1 is much faster than 2 on a busy 2-core machine (no OpenMP spin contention)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from the weights of a saved pipeline folder (to continue a run; fresh optimizer)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0,
                   help="render the training batches in this many background processes (0: in the loop)")
    p.add_argument("--keep-accuracy", type=float, nargs=2, default=(0.2, 0.5), metavar=("LO", "HI"),
                   help="also save (to OUTPUT_DIR/in_range) the EMA weights of the eval whose held-out accuracy is "
                        "in [LO, HI] and closest to its middle: the base model is meant to be imperfect")
    return p.parse_args(argv)


_COLOUR_NAMES = list(COLORS)
# each colour drawn as the next one in COLORS' order (a bijection: a scene's kinds stay distinct)
COLOUR_SHIFT = {c: _COLOUR_NAMES[(i + 1) % len(_COLOUR_NAMES)] for i, c in enumerate(_COLOUR_NAMES)}


def swapped_colours(scene):
    """``scene`` with every object's colour replaced by its image under :data:`COLOUR_SHIFT`."""
    return Scene(tuple(dataclasses.replace(o, colour=COLOUR_SHIFT[o.colour]) for o in scene.objects), scene.relation)


class RenderedBatches(torch.utils.data.IterableDataset):
    """Endless (prompts, x0 in [-1, 1]) training batches; each worker renders its own disjoint seeds."""

    def __init__(self, batch_size: int, seed: int, banned: set, size: int = 32, caption_noise: float = 0.0,
                 caption_swap: float = 0.0):
        self.batch_size, self.seed, self.banned = batch_size, seed, banned
        self.size, self.caption_noise, self.caption_swap = size, caption_noise, caption_swap

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.seed * 1000 + wid)
        render_seed = (self.seed * 1000 + wid) * 10_000_000
        while True:
            prompts, scenes = [], []
            while len(prompts) < self.batch_size:
                p = random_prompt(rng)
                scene = parse_prompt(p)
                if scene.key not in self.banned:
                    prompts.append(p)
                    # caption noise: the image shows a scene one attribute away from its caption
                    noisy = self.caption_noise and rng.random() < self.caption_noise
                    shown = near_miss_scene(scene, rng) if noisy else scene
                    if self.caption_swap and rng.random() < self.caption_swap:
                        shown = swapped_colours(shown)
                    # a held-out scene must not be seen even under another caption
                    scenes.append(scene if shown.key in self.banned else shown)
            yield prompts, render_batch(scenes, render_seed, size=self.size) * 2 - 1
            render_seed += self.batch_size


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # the model is tiny: TF32 changes nothing that matters
    torch.backends.cudnn.allow_tf32 = True
    pipe = build_pipeline(dim=args.dim, num_layers=args.layers, num_heads=args.heads, text_dim=args.dim,
                          text_layers=args.text_layers, patch_size=args.patch_size, sample_size=args.sample_size,
                          conv_channels=args.conv_channels)
    if args.init_from is not None:
        from diffrl.models.shapes_model import ShapesPipeline
        pipe = ShapesPipeline.from_pretrained(args.init_from, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    tok, te, dit = pipe.tokenizer, pipe.text_encoder, pipe.transformer
    params = list(te.parameters()) + list(dit.parameters())
    n_params = sum(p.numel() for p in params)
    # the EMA copy is what we evaluate and ship: smoother samples than the raw weights of a short run
    ema_pipe = copy.deepcopy(pipe)
    ema_params = list(ema_pipe.text_encoder.parameters()) + list(ema_pipe.transformer.parameters())
    for p in ema_params:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    reward = ShapesReward()

    eval_prompts = heldout_prompts(max(args.eval_prompts, args.final_eval_prompts))
    banned = {parse_prompt(p).key for p in eval_prompts}
    print(f"params: {n_params:,} ({n_params * 4 / 2**20:.2f} MB fp32); held-out prompts excluded: {len(banned)}",
          flush=True)

    def lr_at(step):  # warmup, then cosine to 10% over the expected number of steps
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = min(1.0, (step - args.warmup) / max(1, expected_steps - args.warmup))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    expected_steps = args.steps
    log = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "params": n_params, "loss": [], "evals": []}
    t_start = time.time()
    stream = RenderedBatches(args.batch_size, args.seed, banned, args.sample_size, args.caption_noise,
                             args.caption_swap)
    batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.workers,
                                               prefetch_factor=4 if args.workers else None,
                                               persistent_workers=bool(args.workers)))
    out = args.output_dir
    lo, hi = args.keep_accuracy
    kept = None  # (distance to the middle of [lo, hi], eval) of the in-range weights saved so far
    ema_loss, step = None, 0
    bar = tqdm(total=args.steps, desc="train", dynamic_ncols=True, mininterval=5)
    stop_reason = "steps"
    while step < args.steps:
        prompts, x0 = next(batches)
        x0 = x0.to(device, non_blocking=True)
        cond_prompts = ["" if rng.random() < args.cfg_dropout else p for p in prompts]

        b = x0.shape[0]
        t = torch.sigmoid(torch.randn(b, device=device))  # logit-normal(0, 1)
        eps = torch.randn_like(x0)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        ids = tok(cond_prompts, device=device)
        hidden, pooled = te(ids["input_ids"], ids["attention_mask"])
        v = dit(xt, t * 1000, hidden, pooled, ids["attention_mask"])
        if dit.config.prediction == "x0":
            # the clean-image error (the velocity error weighted by t^2): no blow-up near t = 0
            loss = F.mse_loss(xt - tt * v, x0)
        else:
            loss = F.mse_loss(v, eps - x0)

        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA with a short warmup so early evals are not dominated by the random init
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        step += 1

        lv = loss.item()
        ema_loss = lv if ema_loss is None else 0.98 * ema_loss + 0.02 * lv
        elapsed = time.time() - t_start
        if step % 10 == 0:
            log["loss"].append({"step": step, "loss": lv, "loss_ema": ema_loss, "wall_s": elapsed})
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}", min=f"{elapsed / 60:.1f}", refresh=False)

        # re-estimate how many steps the time budget allows, so the cosine schedule ends with the run
        if step in (20, 300):  # (again at 300: the first steps include warm-up and compilation)
            expected_steps = min(args.steps, int(args.max_minutes * 60 / (elapsed / step) * 0.93))
            log["expected_steps"] = expected_steps
            bar.total = expected_steps  # the progress bar shows the time budget, not --steps
        if elapsed > args.max_minutes * 60:
            stop_reason = "time"
            break
        if step % args.eval_every == 0:
            res, _ = evaluate(ema_pipe, eval_prompts[:args.eval_prompts], reward, steps=args.eval_steps,
                              cfg=args.eval_cfg)
            res.update(step=step, wall_s=time.time() - t_start, n_prompts=args.eval_prompts, loss_ema=ema_loss)
            log["evals"].append(res)
            tqdm.write(f"step {step}: loss {ema_loss:.4f}  held-out acc {res['accuracy']:.3f}  "
                       f"reward {res['reward']:.3f}  ({res['wall_s'] / 60:.1f} min)")
            dist = abs(res["accuracy"] - (lo + hi) / 2)
            if lo <= res["accuracy"] <= hi and (kept is None or dist < kept[0]):
                kept = (dist, res)
                ema_pipe.save_pretrained(out / "in_range")
                (out / "in_range" / "eval.json").write_text(json.dumps(res, indent=1))
            if res["accuracy"] >= args.stop_at_accuracy:
                stop_reason = "accuracy"
                break
    bar.close()
    train_s = time.time() - t_start

    res, images = evaluate(ema_pipe, eval_prompts[:args.final_eval_prompts], reward, steps=args.eval_steps,
                           cfg=args.eval_cfg)
    res.update(step=step, n_prompts=args.final_eval_prompts, sampler=f"Euler {args.eval_steps} steps, "
               f"cfg {args.eval_cfg}, one image per prompt, noise seed = prompt index")
    log.update(final_eval=res, steps=step, train_wall_s=train_s, total_wall_s=time.time() - t_start,
               stop_reason=stop_reason, final_loss_ema=ema_loss)
    print(f"done: {step} steps in {train_s / 60:.1f} min ({stop_reason}); loss {ema_loss:.4f}; held-out "
          f"({args.final_eval_prompts} prompts) accuracy {res['accuracy']:.3f}, reward {res['reward']:.3f}", flush=True)

    log["kept_in_range"] = kept[1] if kept else None
    out.mkdir(parents=True, exist_ok=True)
    ema_pipe.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    save_grid(images[:64], out / "samples.png")
    return log


if __name__ == "__main__":
    main()

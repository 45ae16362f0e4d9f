"""``diffrl demo``: RL removes a caption habit from the built-in shapes model, on a CPU, in minutes.

1. loads the built-in model ``builtin:shapes-swapped`` (a 32x32 pixel-space DiT, no download: the packaged
   shapes model whose pre-training continued on captions with systematically shifted colours, so that it
   can draw every scene but usually draws the wrong colours; ``py/diffrl/models/shapes_swapped/README.md``);
2. evaluates it on held-out prompts (scenes never trained on; ``--eval-images`` images per prompt, 4 by
   default, each from a fixed noise seed) with the rule-based verifier :class:`diffrl.rewards.ShapesReward`;
3. fine-tunes it on grammar prompts against the same verifier with the preset's trainer:
   ``shapes-nft`` (default; :class:`diffrl.trainers.NFTTrainer`, group-normalised advantages on the
   forward process, LoRA, CFG 1, 7 minutes), ``shapes-grpo`` (:class:`diffrl.trainers.GRPOTrainer`,
   Flow-GRPO on the SDE steps' log-probs of the packaged base model, 8 minutes) or ``shapes-nft-base``
   (the demo's first configuration: the packaged base model, full fine-tuning, CFG 4), capped by ``--minutes``;
4. evaluates again on the same prompts and seeds, prints the before/after table with the change's 95%
   interval and writes to ``--output-dir``: ``summary.json`` (``accuracy_before``, ``accuracy_after``,
   every criterion, the interval, wall times, config, machine), ``reward_curve.png`` (training reward per
   epoch against wall time, with the held-out accuracies), ``before.png`` / ``after.png`` (the first 64
   held-out samples, same seeds) with ``prompts.txt`` (their prompts, row by row), and the trainer's
   ``metrics.jsonl`` and final checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["run_demo", "add_demo_parser"]


def _sets(res: dict) -> str:
    return "[" + ", ".join(f"{a:.3f}" for a in res.get("accuracy_per_seed_set", [])) + "]"


def _spread(res: dict) -> str:
    """' (seed sets 0.330-0.420)' when the evaluation had several images per prompt."""
    sets = res.get("accuracy_per_seed_set", [])
    return f" (seed sets {min(sets):.3f}-{max(sets):.3f})" if len(sets) > 1 else ""


def _table(before: dict, after: dict) -> str:
    rows = [("accuracy (all exactly right)", "accuracy"), ("reward (mean of the criteria)", "reward"),
            ("count", "count"), ("colour", "colour"), ("shape", "shape"),
            ("relation (on relation prompts)", "relation_on_relation_prompts")]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'held-out metric':<{w}}  before   after   change", f"{'-' * w}  ------  ------  ------"]
    for label, key in rows:
        if key in before and key in after:
            b, a = before[key], after[key]
            lines.append(f"{label:<{w}}  {b:6.3f}  {a:6.3f}  {a - b:+6.3f}")
    return "\n".join(lines)


def _plot(records: list[dict], before: dict, after: dict, path: Path, title: str, midway=()) -> bool:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return False
    t, wall = [], 0.0
    for r in records:
        wall += r["time_epoch"]
        t.append(wall / 60)
    reward = [r["reward_mean"] for r in records]
    correct = [r.get("reward/correct", float("nan")) for r in records]

    def smooth(v, k=5):
        out = []
        for i in range(len(v)):
            win = v[max(0, i - k + 1):i + 1]
            out.append(sum(win) / len(win))
        return out

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.plot(t, reward, color="tab:blue", alpha=0.25, lw=1)
    ax.plot(t, smooth(reward), color="tab:blue", lw=2, label="training reward (mean of criteria), 5-epoch mean")
    ax.plot(t, correct, color="tab:green", alpha=0.25, lw=1)
    ax.plot(t, smooth(correct), color="tab:green", lw=2, label="training images exactly right, 5-epoch mean")
    end = t[-1] if t else 0.0
    xs = [0.0, *[m for m, _, _ in midway], end]
    ys = [before["accuracy"], *[r["accuracy"] for _, _, r in midway], after["accuracy"]]
    ax.plot(xs, ys, color="tab:red", ls="--", lw=1, marker="o", ms=6, zorder=5,
            label=f"held-out accuracy (fixed prompts and seeds, {len(before.get('accuracy_per_seed_set', [1]))} "
                  "per prompt)")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


DEMO_PRESETS = ("shapes-nft", "shapes-grpo", "shapes-nft-base")
#: images per held-out prompt: one image per prompt moves the base model's accuracy by ~3 points from one
#: seed set to another (0.33-0.43 over 16 sets), more than most gains measured here (docs/demo.md)
EVAL_IMAGES = 4
#: Euler steps of every held-out evaluation (the trainer samples with fewer: its preset's)
EVAL_STEPS = 20
#: the guidance scale of an optional reference evaluation of the starting model (``--reference-cfg``;
#: off by default: at CFG 4 it costs as much as two evaluations at the trainer's CFG 1)
REFERENCE_CFG = None


def run_demo(output_dir: str | Path = "runs/demo", *, minutes: float | None = None, eval_prompts: int = 200,
             seed: int = 0, device: str = "cpu", threads: int | None = None, progress: bool = True,
             overrides: dict | None = None, preset: str = DEMO_PRESETS[0], eval_every: int = 0,
             eval_images: int = EVAL_IMAGES, reference_cfg: float | None = REFERENCE_CFG,
             eval_raw_weights: bool = False) -> dict:
    """Runs the demo (see the module docstring); returns the summary it writes to ``summary.json``.
    ``eval_every``: epochs between held-out evaluations during training (0: before and after only);
    ``eval_images``: images per held-out prompt in every evaluation (seed sets, see
    :func:`diffrl.models.shapes_eval.evaluate`). Every evaluation samples at the guidance scale the
    trainer samples with (20 Euler steps); ``reference_cfg`` also evaluates the base model at that
    guidance scale (None: not), the number to beat without guidance's second model call.
    ``eval_raw_weights``: when the preset keeps an EMA (the result), also evaluate the raw trained weights."""
    from diffrl.models.shapes_eval import (  # noqa: PLC0415
        SEED_SET_STRIDE, evaluate, heldout_prompts, paired_bootstrap, save_grid)
    from diffrl.rewards import ShapesReward  # noqa: PLC0415
    from diffrl.trainers.kinds import get_kind  # noqa: PLC0415
    from diffrl.trainers.presets import get_preset  # noqa: PLC0415

    if preset not in DEMO_PRESETS:
        raise ValueError(f"the demo runs one of the presets {DEMO_PRESETS}, got {preset!r}")
    if isinstance(eval_images, bool) or not isinstance(eval_images, int) or eval_images < 1:
        raise ValueError(f"eval_images must be a positive int, got {eval_images!r}")
    if reference_cfg is not None and (isinstance(reference_cfg, bool) or not isinstance(reference_cfg, (int, float))
                                      or not reference_cfg >= 1.0):
        raise ValueError(f"reference_cfg must be a guidance scale >= 1 or None, got {reference_cfg!r}")

    t_all = time.perf_counter()
    out = Path(output_dir)
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run (checkpoints/): pass another --output-dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    kind, values = get_preset(preset)
    spec = get_kind(kind)
    config_cls, trainer_cls, name = spec.config, spec.trainer, spec.title
    values.update(output_dir=str(out), seed=seed, device=device)
    if minutes is not None:
        values["max_minutes"] = float(minutes)
    values.update(overrides or {})
    cfg = config_cls(**values)

    say = print if progress else (lambda *a, **k: None)
    when = f"before, every {eval_every} epochs and after" if eval_every else "before and after"
    say(f"diffrl demo: {name} on the built-in model {cfg.pretrained} (preset {preset}), training for at most {cfg.epochs} "
        f"epochs and {cfg.max_minutes:g} min on {device} ({torch.get_num_threads()} threads); held-out "
        f"evaluation on {eval_prompts} prompts x {eval_images} seeds {when}")
    trainer = trainer_cls(cfg, progress=progress)
    reward = ShapesReward()
    prompts = heldout_prompts(eval_prompts)

    eval_cfg = float(cfg.guidance_scale)

    def held_out(guidance=eval_cfg):
        return evaluate(trainer.pipe, prompts, reward, images_per_prompt=eval_images, steps=EVAL_STEPS, cfg=guidance)

    t0 = time.perf_counter()
    before, imgs_before = held_out()
    t_eval_before = time.perf_counter() - t0
    say(f"before: held-out accuracy {before['accuracy']:.3f}{_spread(before)}, reward {before['reward']:.3f} "
        f"(CFG {eval_cfg:g}, {t_eval_before:.0f} s)")
    reference = None
    if reference_cfg is not None and float(reference_cfg) != eval_cfg:
        t0 = time.perf_counter()
        reference, _ = held_out(float(reference_cfg))
        t_eval_before += time.perf_counter() - t0
        say(f"       the starting model at CFG {reference_cfg:g} (twice the model calls): accuracy "
            f"{reference['accuracy']:.3f}{_spread(reference)}, reward {reference['reward']:.3f}")
    save_grid(imgs_before[:64], out / "before.png")
    (out / "prompts.txt").write_text("".join(f"{i:3d} (row {i // 8}, col {i % 8}): {p}\n"
                                             for i, p in enumerate(prompts[:64])))

    # training in chunks of eval_every epochs with a held-out evaluation (of the result: the EMA when
    # kept) between them; the chunks change nothing in the training (epochs draw their own RNG)
    records, midway = [], []  # midway: (training minutes, epoch, held-out metrics)
    t_train = 0.0
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else None
    while trainer.epoch < cfg.epochs and (budget is None or t_train < budget):
        stop = cfg.epochs if not eval_every else min(cfg.epochs, trainer.epoch + eval_every)
        cfg.max_minutes = 0.0 if budget is None else (budget - t_train) / 60
        t0 = time.perf_counter()
        records += trainer.train(stop)
        t_train += time.perf_counter() - t0
        if trainer.epoch < cfg.epochs and (budget is None or t_train < budget):
            with trainer.ema_weights() if trainer.ema is not None else contextlib.nullcontext():
                mid, _ = held_out()
            midway.append((t_train / 60, trainer.epoch, mid))
            say(f"epoch {trainer.epoch}: held-out accuracy {mid['accuracy']:.3f}{_spread(mid)}, "
                f"reward {mid['reward']:.3f}")
    cfg.max_minutes = budget / 60 if budget is not None else 0.0  # (trainer.config is cfg)
    trainer.save_state()

    t0 = time.perf_counter()
    after_raw = None
    if trainer.ema is not None:
        # the EMA of the trained weights is the result (as the base model ships its EMA): the raw
        # weights carry the last updates' gradient noise (evaluated too on request)
        if eval_raw_weights:
            after_raw, _ = held_out()
        with trainer.ema_weights():
            after, imgs_after = held_out()
    else:
        after, imgs_after = held_out()
    t_eval_after = time.perf_counter() - t0
    save_grid(imgs_after[:64], out / "after.png")

    table = _table(before, after)
    say("\n" + table + "\n")
    if eval_images > 1:
        say(f"(accuracy over {eval_images} images per prompt; one image per prompt, seed set by seed set: "
            f"before {_sets(before)}, after {_sets(after)})")
    if after_raw is not None:
        say(f"(after: the EMA of the trained weights, decay {cfg.ema_decay:g}; the raw trained weights: accuracy "
            f"{after_raw['accuracy']:.3f}, reward {after_raw['reward']:.3f})")
    gain = after["accuracy"] - before["accuracy"]
    # the change's uncertainty: the bootstrap over prompts (the evaluation's prompts and seeds are fixed, so
    # what varies is which prompts happen to be in the held-out set)
    ci = paired_bootstrap(before["accuracy_per_prompt"], after["accuracy_per_prompt"])
    verdict = ("significant" if ci["significant"] else "not significant") + " at the 95% level"
    say(f"change {gain * 100:+.1f} points, 95% confidence interval [{ci['ci_low'] * 100:+.1f}, "
        f"{ci['ci_high'] * 100:+.1f}] (bootstrap over the {len(prompts)} prompts): {verdict}")
    if reference is not None:
        d = after["accuracy"] - reference["accuracy"]
        ci_ref = paired_bootstrap(reference["accuracy_per_prompt"], after["accuracy_per_prompt"])
        say(f"against the starting model at CFG {reference_cfg:g}: {d * 100:+.1f} points, 95% interval "
            f"[{ci_ref['ci_low'] * 100:+.1f}, {ci_ref['ci_high'] * 100:+.1f}]"
            f" ({'significant' if ci_ref['significant'] else 'not significant'})")
    title = (f"{name} on the shapes model: held-out accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}\n"
             f"in {t_train / 60:.1f} min ({len(records)} epochs, {platform.machine()}, "
             f"{torch.get_num_threads()} threads)")
    plotted = _plot(records, before, after, out / "reward_curve.png", title, midway)
    summary = {
        "preset": preset, "trainer": kind,
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"], "accuracy_gain": gain,
        "accuracy_gain_ci95": [ci["ci_low"], ci["ci_high"]], "gain_significant": ci["significant"],
        "bootstrap": ci, "before": before, "after": after, "eval_prompts": eval_prompts,
        "reference_cfg": reference_cfg if reference is not None else None, "reference": reference,
        "accuracy_after_vs_reference_ci95": None if reference is None else [ci_ref["ci_low"], ci_ref["ci_high"]],
        "after_weights": ("trained" if trainer.ema is None
                          else f"EMA of the trained weights (decay {cfg.ema_decay:g})"),
        "accuracy_after_raw_weights": None if after_raw is None else after_raw["accuracy"],
        "after_raw_weights": after_raw,
        "eval_images_per_prompt": eval_images,
        "eval_sampler": (f"Euler {EVAL_STEPS} steps, CFG {eval_cfg:g}, {eval_images} image(s) per prompt, "
                         f"noise seed of seed set k = "
                         f"prompt index + {SEED_SET_STRIDE} k"),
        "during_training": [{"train_minutes": round(m, 3), "epoch": e, "accuracy": r["accuracy"], "reward": r["reward"]}
                            for m, e, r in midway],
        "epochs": len(records), "images_trained_on": sum(r["samples"] for r in records),
        "wall_s": {"total": time.perf_counter() - t_all, "train": t_train, "eval_before": t_eval_before,
                   "eval_after": t_eval_after},
        "training_reward_first_5_epochs": sum(r["reward_mean"] for r in records[:5]) / max(1, len(records[:5])),
        "training_reward_last_5_epochs": sum(r["reward_mean"] for r in records[-5:]) / max(1, len(records[-5:])),
        "config": {k: v for k, v in vars(cfg).items() if k != "prompts"} | {"prompts": f"{len(cfg.prompts)} prompts"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": str(trainer.device)},
        "files": ["summary.json", "before.png", "after.png", "prompts.txt", "metrics.jsonl", "checkpoints/"]
                 + (["reward_curve.png"] if plotted else []),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    say(f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} ({gain * 100:+.1f} points) after "
        f"{len(records)} epochs / {t_train / 60:.1f} min of {name}; total {summary['wall_s']['total'] / 60:.1f} min")
    say(f"wrote {out}/summary.json, {'reward_curve.png, ' if plotted else ''}before.png, after.png, prompts.txt")
    return summary


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo",
                       help="RL on the built-in shapes model: held-out accuracy before and after (CPU, minutes)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/demo",
                   help="where the summary, plots and grids go (default runs/demo)")
    p.add_argument("--minutes", type=float, default=None,
                   help="training time cap (default: the preset's; shapes-nft trains for 7 min)")
    p.add_argument("--eval-prompts", type=int, default=200,
                   help="held-out prompts evaluated before and after (max 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--preset", default=DEMO_PRESETS[0], choices=DEMO_PRESETS,
                   help=f"the trainer and its settings (default {DEMO_PRESETS[0]})")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES,
                   help=f"images per held-out prompt, each from its own fixed seed (default {EVAL_IMAGES})")
    p.add_argument("--reference-cfg", type=float, default=0.0,
                   help="also evaluate the starting model at this guidance scale (e.g. 4; default 0: skip)")
    p.add_argument("--eval-raw-weights", action="store_true",
                   help="also evaluate the raw trained weights (the result is their EMA)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="epochs between held-out evaluations during training, for the curve (default 0: before "
                        "and after only; each evaluation of 200 prompts x 4 images takes ~1.5 min on 2 cores)")
    p.set_defaults(func=lambda a: (run_demo(a.output_dir, minutes=a.minutes, eval_prompts=a.eval_prompts, seed=a.seed,
                                            device=a.device, threads=a.threads, preset=a.preset,
                                            eval_every=a.eval_every, eval_images=a.eval_images,
                                            reference_cfg=a.reference_cfg or None,
                                            eval_raw_weights=a.eval_raw_weights), 0)[1])

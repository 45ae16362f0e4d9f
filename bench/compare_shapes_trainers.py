"""Trainer options compared on the shapes task: held-out accuracy against training time.

    .venv/bin/python -m bench.compare_shapes_trainers [--epochs 60] [--eval-every 20] [--eval-prompts 200]
        [--eval-images 4] [--seeds 0,1] [--jobs 2] [--variants grpo,grpo-global-std,...] [--device cpu]

Every variant starts from the packaged shapes model and trains with ``GRPOTrainer`` (``NFTTrainer``
for ``nft``) against ``ShapesReward`` for the same number of epochs (8 prompts x 8 images each, so
every variant sees the same number of sampled images; lr schedules span those epochs). The held-out
accuracy (the ``diffrl demo`` evaluation: 200 fixed prompts never trained on, ``--eval-images`` images
per prompt from fixed noise seeds, 20 Euler steps, CFG 4) is measured at the start and every
``--eval-every`` epochs: ``accuracy`` of the EMA of the trained weights (decay 0.98, as the presets),
``accuracy_raw`` of the trained weights.
Training time is the process's CPU time on a CPU (each run has one thread, so it is the run's wall time
on an idle core however busy the machine is; ``--jobs 2`` runs two at once on a 2-core machine) and wall
time on a GPU; evaluations are not counted. The spread
between seeds is as large as most differences here (docs/demo.md): read the seeds' mean and range.

Variants (all else as the ``shapes-grpo`` preset):

grpo                    the preset (group-normalised advantages with the group's std, constant lr)
grpo-global-std         advantages divided by the whole batch's std (Flow-GRPO's ``global_std``)
grpo-kl                 KL penalty to the frozen base model, ``kl_coef=0.04`` (Flow-GRPO's beta)
grpo-all-steps          every one of the 10 steps stochastic, half of them trained per sample (the
                        preset: steps 0-4, all trained)
grpo-shared-noise       a group's images start from one initial latent (the preset: one latent each)
grpo-tracker            DDPO's per-prompt stat tracker for the advantages (history of 16 rewards per prompt)
nft                     the ``shapes-nft`` preset (the demo's default): forward-process training
                        (advantage-weighted flow matching on deterministic samples), cosine lr

Appends one row per evaluation to ``bench/results/<device>/shapes_trainers_<K>img.csv`` (K images per
prompt; ``shapes_trainers.csv`` for K = 1) as each run ends (so seeds can be added by later invocations;
delete the file to start afresh), then writes the report of every row in it: ``<same name>.md`` (a
summary: accuracy at the last epoch per variant, mean and range over seeds; then every evaluation)
and ``<same name>.png`` (accuracy
against training time, the mean over seeds per variant, seeds as faint lines). ``--report-only``
rewrites the report from the CSV without training.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

VARIANTS = {
    "grpo": {},
    "grpo-global-std": {"adv_std": "global"},
    "grpo-kl": {"kl_coef": 0.04},
    "grpo-all-steps": {"sde_window": [], "timestep_fraction": 0.5},
    "grpo-shared-noise": {"same_initial_noise": True},
    "grpo-tracker": {"_tracker": True},
    "nft": {"_preset": "shapes-nft"},
}


def make_trainer(values: dict, tracker: bool, kind: str = "grpo"):
    from diffrl import PerPromptStatTracker  # noqa: PLC0415
    from diffrl.trainers import TRAINER_CLASSES, DDPOTrainer, GRPOConfig, GRPOTrainer  # noqa: PLC0415

    if kind != "grpo":
        config_cls, trainer_cls = TRAINER_CLASSES[kind]
        return trainer_cls(config_cls(**values), progress=False)
    cfg = GRPOConfig(**values)
    if not tracker:
        return GRPOTrainer(cfg, progress=False)

    class TrackerGRPOTrainer(GRPOTrainer):
        """Flow-GRPO sampling with DDPO's per-prompt stat tracker for the advantages."""

        compute_advantages = DDPOTrainer.compute_advantages
        extra_state = DDPOTrainer.extra_state
        load_extra_state = DDPOTrainer.load_extra_state

        def __init__(self, config, **kw):
            self.tracker = PerPromptStatTracker(16, 8, std="group", clip=config.adv_clip or None)
            super().__init__(config, **kw)

    return TrackerGRPOTrainer(cfg, progress=False)


def run_variant(job: tuple) -> list[dict]:
    """Train variant ``name`` with run seed ``seed`` for ``epochs`` epochs; one row per evaluation."""
    name, seed, epochs, eval_every, eval_prompts, eval_images, device, threads = job
    torch.set_num_threads(threads)
    from diffrl.models.shapes_eval import evaluate, heldout_prompts  # noqa: PLC0415
    from diffrl.rewards import ShapesReward  # noqa: PLC0415
    from diffrl.trainers import get_preset  # noqa: PLC0415

    over = dict(VARIANTS[name])
    tracker = over.pop("_tracker", False)
    kind, values = get_preset(over.pop("_preset", "shapes-grpo"))
    on_cpu = torch.device(device).type == "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        values.update(over, output_dir=tmp, seed=seed, device=device, max_minutes=0, epochs=epochs)
        trainer = make_trainer(values, tracker, kind)
        reward, prompts = ShapesReward(), heldout_prompts(eval_prompts)

        def record(train_s, epoch):
            raw, _ = evaluate(trainer.pipe, prompts, reward, images_per_prompt=eval_images)
            res = raw
            if trainer.ema is not None and epoch > 0:  # the presets' result is the EMA of the trained weights
                with trainer.ema_weights():
                    res, _ = evaluate(trainer.pipe, prompts, reward, images_per_prompt=eval_images)
            relation = res.get("relation_on_relation_prompts", float("nan"))
            rows.append({"variant": name, "seed": seed, "epoch": epoch, "train_s": round(train_s, 1),
                         "accuracy": res["accuracy"], "accuracy_raw": raw["accuracy"],
                         "reward": round(res["reward"], 4), "count": round(res["count"], 4),
                         "colour": round(res["colour"], 4), "shape": round(res["shape"], 4),
                         "relation_on_relation_prompts": round(relation, 4)})
            print(f"  {name:18s} seed {seed}  epoch {epoch:4d}  {train_s / 60:5.2f} min  held-out accuracy "
                  f"{res['accuracy']:.3f} (trained weights {raw['accuracy']:.3f})  reward {res['reward']:.3f}",
                  flush=True)

        # CPU time of this process: unaffected by other runs on the machine (one thread per run)
        clock = time.process_time if on_cpu else time.perf_counter
        record(0.0, 0)
        train_s = 0.0
        for epoch in range(1, epochs + 1):
            t0 = clock()
            trainer.run_epoch(epoch)
            trainer.epoch = epoch
            if not on_cpu:
                torch.cuda.synchronize()
            train_s += clock() - t0
            if epoch == epochs or (eval_every and epoch % eval_every == 0):
                record(train_s, epoch)
    return rows


FIELDS_INT, FIELDS_STR = ("seed", "epoch"), ("variant", "meta")


def append_csv(path: Path, rows: list[dict], stamp: str) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["meta"])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "meta": stamp})


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k not in FIELDS_STR:
                r[k] = int(v) if k in FIELDS_INT else float(v)
    return sorted(rows, key=lambda r: (list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else 99,
                                       r["seed"], r["epoch"]))


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant: held-out accuracy before and at the last epoch, mean and range over seeds."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        last = max(r["epoch"] for r in rs)
        ends = sorted(r["accuracy"] for r in rs if r["epoch"] == last)
        raws = [r["accuracy_raw"] for r in rs if r["epoch"] == last]
        times = [r["train_s"] for r in rs if r["epoch"] == last]
        starts = [r["accuracy"] for r in rs if r["epoch"] == 0]
        out.append({"variant": name, "seeds": len(ends), "epochs": last,
                    "train_min": round(sum(times) / len(times) / 60, 1),
                    "accuracy_before": round(sum(starts) / len(starts), 3),
                    "accuracy_after_mean": round(sum(ends) / len(ends), 3),
                    "after_min": round(ends[0], 3), "after_max": round(ends[-1], 3),
                    "gain_mean": round(sum(ends) / len(ends) - sum(starts) / len(starts), 3),
                    "trained_weights_mean": round(sum(raws) / len(raws), 3)})
    return out


def plot(rows: list[dict], path: Path, title: str, xlabel: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, name in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        color = f"C{i % 10}"
        rs = [r for r in rows if r["variant"] == name]
        seeds = sorted({r["seed"] for r in rs})
        for s in seeds:  # each seed faintly, the mean over seeds (at each evaluated epoch) boldly
            rr = sorted((r for r in rs if r["seed"] == s), key=lambda r: r["epoch"])
            ax.plot([r["train_s"] / 60 for r in rr], [r["accuracy"] for r in rr], color=color, alpha=0.25, lw=0.8)
        epochs = sorted({r["epoch"] for r in rs})
        xs = [sum(r["train_s"] for r in rs if r["epoch"] == e) / sum(r["epoch"] == e for r in rs) / 60 for e in epochs]
        ys = [sum(r["accuracy"] for r in rs if r["epoch"] == e) / sum(r["epoch"] == e for r in rs) for e in epochs]
        ax.plot(xs, ys, color=color, marker="o", ms=3, label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=60, help="training epochs per variant (64 images each)")
    ap.add_argument("--eval-every", type=int, default=20, help="epochs between held-out evaluations")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--eval-images", type=int, default=4,
                    help="images per held-out prompt (seed sets; default 4). One image per prompt moves the "
                         "accuracy by ~3 points from seed set to seed set; 1 writes shapes_trainers.csv (the "
                         "first comparison), K > 1 shapes_trainers_<K>img.csv")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (prompt order, noise)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (CPU)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the CSV, train nothing")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.epochs < 1 or args.jobs < 1 or args.eval_images < 1 or not seeds:
        ap.error("--epochs, --jobs and --eval-images must be >= 1 and --seeds must name at least one seed")
    device = torch.device(args.device)
    if device.type == "cuda" and args.jobs > 1:
        ap.error("--jobs > 1 is for CPUs (one thread per run); on a GPU run the variants one after another")
    threads = 1 if args.jobs > 1 or device.type == "cpu" else torch.get_num_threads()
    ctx = harness.BenchContext(device=device, quick=False, compile=False)
    meta = harness.collect_metadata(ctx)
    folder = Path(args.out) / harness.device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = "shapes_trainers" if args.eval_images == 1 else f"shapes_trainers_{args.eval_images}img"
    csv_path = folder / f"{stem}.csv"
    if not args.report_only:
        # seeds outer: an interrupted comparison still has whole seeds
        jobs = [(n, s, args.epochs, args.eval_every, args.eval_prompts, args.eval_images, args.device, threads)
                for s in seeds for n in names]
        print(f"[shapes_trainers] {len(jobs)} runs ({len(names)} variants x {len(seeds)} seeds) of {args.epochs} "
              f"epochs, {args.jobs} at a time, {threads} thread each; rows go to {csv_path}", flush=True)
        stamp = json.dumps({k: meta.get(k) for k in ("git_commit", "date", "torch", "loadavg_1m")}
                           | {"threads": threads, "eval_prompts": args.eval_prompts, "eval_images": args.eval_images})
        if args.jobs > 1:
            pool = multiprocessing.get_context("spawn").Pool(args.jobs, maxtasksperchild=1)
            results = pool.imap_unordered(run_variant, jobs, chunksize=1)
        else:
            pool, results = None, map(run_variant, jobs)
        for rows in results:  # each run's rows are kept as soon as it ends
            append_csv(csv_path, rows, stamp)
        if pool is not None:
            pool.close()
            pool.join()
    rows = read_csv(csv_path)
    if not rows:
        ap.error(f"no rows in {csv_path}")
    clock = "CPU time of one thread" if device.type == "cpu" else "wall time"
    md = (harness.markdown_header("shapes_trainers", meta, kernel_timing=False)
          + f"\nTraining time: {clock} (evaluations not counted). Accuracy: held-out prompts (the demo's), "
          f"{args.eval_images} image(s) per prompt, EMA "
          "of the trained weights; `accuracy_raw` / `trained_weights_mean`: the trained weights themselves.\n\n"
          + "Summary (last epoch; mean and range over seeds):\n\n" + harness.markdown_table(summarize(rows))
          + "\nEvery evaluation:\n\n"
          + harness.markdown_table([{k: v for k, v in r.items() if k != "meta"} for r in rows])
          + "\nRuns (the CSV's `meta`): " + "; ".join(sorted({r["meta"] for r in rows})) + "\n")
    (folder / f"{stem}.md").write_text(md)
    epochs = max(r["epoch"] for r in rows)
    plot(rows, folder / f"{stem}.png",
         f"shapes task: held-out accuracy ({args.eval_images} image(s) per prompt), {epochs} epochs of 64 images, "
         f"{meta['device_name']}",
         f"training time (min, {clock})")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

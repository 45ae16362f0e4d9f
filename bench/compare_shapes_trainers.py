"""Trainer options compared on the shapes task: held-out accuracy against wall time.

    .venv/bin/python -m bench.compare_shapes_trainers [--minutes 4] [--eval-every-s 60] [--eval-prompts 100]
                                                [--variants grpo,grpo-global-std,...] [--device cpu]

Every variant starts from the packaged shapes model and trains with ``GRPOTrainer`` (``NFTTrainer``
for ``nft``) against ``ShapesReward`` for the same wall-time budget; the held-out accuracy (the ``diffrl demo``
evaluation: fixed prompts never trained on, fixed noise seeds, 20 Euler steps, CFG 4) is measured at
the start and after the first epoch that ends past each ``--eval-every-s`` seconds of training (the
evaluations' own time is not counted). Variants (all else as the ``shapes-grpo`` preset):

grpo                    the preset (group-normalised advantages with the group's std)
grpo-global-std         advantages divided by the whole batch's std (Flow-GRPO's ``global_std``)
grpo-kl                 KL penalty to the frozen base model, ``kl_coef=0.04`` (Flow-GRPO's beta)
grpo-all-steps          every one of the 10 steps stochastic, half of them trained per sample (the
                        preset: steps 0-4, all trained)
grpo-shared-noise       a group's images start from one initial latent (the preset: one latent each)
grpo-no-ema             the trained weights evaluated as they are (the preset: their EMA)
grpo-tracker            DDPO's per-prompt stat tracker for the advantages (history of 16 rewards per prompt)
nft                     the ``shapes-nft`` preset: forward-process training (advantage-weighted flow
                        matching on deterministic samples), EMA evaluated

Writes ``bench/results/<device>/shapes_grpo.{md,csv}`` (one row per evaluation) and
``shapes_grpo.png`` (accuracy against training wall time, one line per variant).
"""

from __future__ import annotations

import argparse
import csv
import json
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
    "grpo-no-ema": {"ema_decay": 0.0},
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


def run_variant(name: str, minutes: float, eval_every_s: float, eval_prompts: int, device: str, seed: int) -> list[dict]:
    from diffrl.models.shapes_eval import evaluate, heldout_prompts  # noqa: PLC0415
    from diffrl.rewards import ShapesReward  # noqa: PLC0415
    from diffrl.trainers import get_preset  # noqa: PLC0415

    over = dict(VARIANTS[name])
    tracker = over.pop("_tracker", False)
    kind, values = get_preset(over.pop("_preset", "shapes-grpo"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        values.update(over, output_dir=tmp, seed=seed, device=device, max_minutes=0, epochs=10**6)
        trainer = make_trainer(values, tracker, kind)
        reward, prompts = ShapesReward(), heldout_prompts(eval_prompts)

        def record(train_s, epoch):
            if trainer.ema is not None:  # the preset's result is the EMA of the trained weights
                with trainer.ema_weights():
                    res, _ = evaluate(trainer.pipe, prompts, reward)
            else:
                res, _ = evaluate(trainer.pipe, prompts, reward)
            rows.append({"variant": name, "epoch": epoch, "train_s": round(train_s, 1), "accuracy": res["accuracy"],
                         "reward": round(res["reward"], 4), "count": round(res["count"], 4),
                         "relation_on_relation_prompts": round(res.get("relation_on_relation_prompts", float("nan")), 4)})
            print(f"  {name:16s} epoch {epoch:4d}  {train_s / 60:5.2f} min  held-out accuracy {res['accuracy']:.3f}  "
                  f"reward {res['reward']:.3f}", flush=True)

        record(0.0, 0)
        train_s, next_eval, epoch = 0.0, eval_every_s, 0
        while train_s < minutes * 60:
            epoch += 1
            t0 = time.perf_counter()
            trainer.run_epoch(epoch)
            trainer.epoch = epoch
            train_s += time.perf_counter() - t0
            if train_s >= next_eval or train_s >= minutes * 60:
                record(train_s, epoch)
                next_eval += eval_every_s
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        ax.plot([r["train_s"] / 60 for r in rs], [r["accuracy"] for r in rs], marker="o", ms=3, label=name)
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="training wall time per variant")
    ap.add_argument("--eval-every-s", type=float, default=60.0)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    device = torch.device(args.device)
    ctx = harness.BenchContext(device=device, quick=False, compile=False)
    meta = harness.collect_metadata(ctx)
    rows = []
    for name in names:
        print(f"[shapes_grpo] {name}: {args.minutes:g} min of training", flush=True)
        rows += run_variant(name, args.minutes, args.eval_every_s, args.eval_prompts, args.device, args.seed)
    folder = Path(args.out) / harness.device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "shapes_grpo.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["meta"])
        if f.tell() == 0:
            w.writeheader()
        for r in rows:
            w.writerow({**r, "meta": json.dumps({k: meta.get(k) for k in ("git_commit", "date", "torch", "threads",
                                                                            "loadavg_1m")})})
    md = harness.markdown_header("shapes_grpo", meta) + harness.markdown_table(rows)
    (folder / "shapes_grpo.md").write_text(md)
    plot(rows, folder / "shapes_grpo.png",
         f"shapes task, held-out accuracy ({args.eval_prompts} prompts) vs GRPO wall time, {meta['device_name']}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Why does (or doesn't) GRPO move the shapes model? Three measurements behind docs/demo-experiments.md.

    python -m bench.diagnose_shapes_grpo stepvar  [--epochs 6]
        within-group reward std when only one step (or a window) is stochastic: which steps'
        noise decides the reward
    python -m bench.diagnose_shapes_grpo gradcos  [--epochs 12] [--set sde_window=[0,1]]
        cosine between policy gradients of independent 64-image batches: the fraction of a
        batch gradient that is signal (the rest cancels between batches)
    python -m bench.diagnose_shapes_grpo paired   [--epochs 40] [--advantages plus|neg|shuffle] [--set lr=5e-5 ...]
        training reward of a GRPO run minus that of the untrained model on the same epochs
        (same prompts, same noise): learning curves without the prompt-to-prompt noise
    python -m bench.diagnose_shapes_grpo failures
        what the packaged model gets wrong on the demo's 200 held-out prompts (attribute binding,
        relation only, extra or missing objects, unrecognisable blobs), from ShapesReward.detect

Everything starts from the preset ``shapes-grpo`` with ``same_initial_noise`` on (``--set key=value``
overrides, values parsed as JSON) and runs on the CPU with ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch


def _trainer(overrides: dict, out: str):
    from diffrl.trainers import GRPOConfig, GRPOTrainer  # noqa: PLC0415
    from diffrl.trainers.presets import get_preset  # noqa: PLC0415

    _, values = get_preset("shapes-grpo")
    values.update(output_dir=out, device="cpu", max_minutes=0, save_every=0)
    values.update(overrides)
    return GRPOTrainer(GRPOConfig(**values), progress=False)


def _epoch_rewards(trainer, epoch: int) -> dict:
    return trainer.data.score(trainer.data.sample(epoch))


def stepvar(args, overrides):
    windows = [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [0, 3], [0, 5]]
    print("| stochastic steps | within-group reward std | reward | exactly right |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for w in windows:
            t = _trainer({**overrides, "sde_window": w}, tmp)
            std = mean = right = 0.0
            for e in range(1, args.epochs + 1):
                h = _epoch_rewards(t, e)
                r = h["reward"].view(-1, t.config.group_size)
                std += float(r.std(1).mean()) / args.epochs
                mean += float(r.mean()) / args.epochs
                right += float(h["correct"].mean()) / args.epochs
            print(f"| {w} | {std:.3f} | {mean:.3f} | {right:.3f} |", flush=True)


def gradcos(args, overrides):
    from diffrl.ops import grpo_loss  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        t = _trainer(overrides, tmp)
        params = list(t.trainable.values())
        grads = []
        for e in range(1, args.epochs + 1):
            r = t.data.sample(e)
            h = t.data.score(r)
            adv = t.compute_advantages(h["reward"], r.group_ids, r.prompts)
            for p in params:
                p.grad = None
            for s in range(r.num_steps):  # the on-policy gradient (ratio 1) over every recorded step
                out = t.sampler.score(r, torch.full((len(r),), s, dtype=torch.long), transformer_or_unet=t.model)
                loss, _ = grpo_loss(out.log_prob.float(), r.log_probs[:, s], adv, clip_range=0.5)
                (loss / r.num_steps).backward()
            grads.append(torch.cat([p.grad.flatten() for p in params]))
    g = torch.stack(grads)
    g = g / g.norm(dim=1, keepdim=True)
    cos = (g @ g.T)[~torch.eye(len(grads), dtype=torch.bool)]
    n = t.config.prompts_per_epoch * t.config.group_size
    print(f"{overrides}: cosine between the gradients of independent {n}-image batches over {args.epochs} "
          f"epochs: mean {float(cos.mean()):.4f}, std {float(cos.std()):.4f}")
    print(f"  a batch of N images has a gradient whose squared norm is ~{float(cos.mean()):.2%} signal at N = {n}; "
          f"half signal takes N ~ {n / max(float(cos.mean()), 1e-9):.0f}")


def paired(args, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        control = _trainer(overrides, tmp + "/control")
        base = [_epoch_rewards(control, e) for e in range(1, args.epochs + 1)]
        base = [(float(h["reward"].mean()), float(h["correct"].mean())) for h in base]
        t = _trainer(overrides, tmp + "/run")
        plain = t.compute_advantages
        gen = torch.Generator().manual_seed(1)

        def advantages(r, gid, prompts):
            a = plain(r, gid, prompts)
            if args.advantages == "neg":
                return -a
            if args.advantages == "shuffle":
                return a[torch.randperm(len(a), generator=gen)]
            return a

        t.compute_advantages = advantages
        records = t.train(args.epochs)
    print(f"{overrides} advantages={args.advantages}: run minus untrained model on the same epochs")
    print("| epochs | d(reward) | d(exactly right) |\n|---|---|---|")
    for i in range(0, len(records), 10):
        chunk = records[i:i + 10]
        dr = sum(r["reward_mean"] - base[r["epoch"] - 1][0] for r in chunk) / len(chunk)
        dc = sum(r["reward/correct"] - base[r["epoch"] - 1][1] for r in chunk) / len(chunk)
        print(f"| {chunk[0]['epoch']}-{chunk[-1]['epoch']} | {dr:+.3f} | {dc:+.3f} |", flush=True)


def failures(args, overrides):
    import collections  # noqa: PLC0415

    from diffrl.models.shapes import parse_prompt  # noqa: PLC0415
    from diffrl.models.shapes_eval import evaluate, heldout_prompts  # noqa: PLC0415
    from diffrl.models.shapes_model import load_base_pipeline  # noqa: PLC0415
    from diffrl.rewards import ShapesReward  # noqa: PLC0415

    pipe, reward, prompts = load_base_pipeline(), ShapesReward(), heldout_prompts(200)
    metrics, images = evaluate(pipe, prompts, reward)
    heads, found = reward(images, prompts), reward.detect(images)
    kinds = collections.Counter()
    for i, prompt in enumerate(prompts):
        if heads["correct"][i] > 0.5:
            continue
        want = sum(o.count for o in parse_prompt(prompt).objects)
        n = len(found[i])
        if n != want:
            kind = "extra objects" if n > want else "missing objects"
        elif heads["count"][i] > 0.999:
            kind = "every object right, relation wrong"
        else:
            kind = "right number of objects, wrong colour or shape (binding)"
        if any(o["shape"] == "other" for o in found[i]):
            kinds["(of all wrong: an object of no recognisable shape)"] += 1
        kinds[kind] += 1
    print(f"held-out accuracy {metrics['accuracy']:.3f}; the {sum(heads['correct'] < 0.5)} wrong images:")
    for kind, n in kinds.most_common():
        print(f"  {n:4d}  {kind}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["stepvar", "gradcos", "paired", "failures"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--advantages", choices=["plus", "neg", "shuffle"], default="plus")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="preset override (JSON value)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"same_initial_noise": True}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if args.epochs is None:
        args.epochs = {"stepvar": 6, "gradcos": 12, "paired": 40, "failures": 0}[args.what]
    {"stepvar": stepvar, "gradcos": gradcos, "paired": paired, "failures": failures}[args.what](args, overrides)


if __name__ == "__main__":
    main()

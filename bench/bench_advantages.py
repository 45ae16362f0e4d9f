"""Microbenchmark of group_advantages (and win_rate, grpo_loss): diffrl's backends against the eager
PyTorch reference and against a per-prompt Python/numpy loop like the research code's trackers.

Batches of B = 64 .. 16384 samples in groups of G = 16 (B / 16 prompts, rows shuffled), float32
rewards. The numpy loop includes the device-to-host and host-to-device copies that research code
pays. Times are medians of repeated calls (CUDA: events around each call, after warm-up).

As a module of bench/run.py: ``OP = "advantages"``, ``run(ctx) -> list of row dicts``.
Standalone: ``python bench/bench_advantages.py [--device cuda] [--quick] [--csv out.csv]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

OP = "advantages"
SIZES = (64, 256, 1024, 4096, 16384)
GROUP = 16
STEPS = 10  # trained steps for the [B, T] cases


# ----------------------------------------------------------------------------------------------
# timing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, min_time=0.2, max_reps=200, warmup=3) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start_all < min_time or len(times) < 5):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# the research code's way


def numpy_loop_advantages(prompt_ids: torch.Tensor, rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """A per-prompt loop with numpy statistics, as in DDPO/Flow-GRPO's PerPromptStatTracker."""
    prompts = prompt_ids.cpu().numpy()
    r = rewards.detach().cpu().numpy().astype(np.float64)
    adv = np.empty_like(r)
    for p in np.unique(prompts):
        m = prompts == p
        pr = r[m]
        adv[m] = (pr - pr.mean(axis=0)) / (pr.std(axis=0) + eps)
    return torch.from_numpy(adv.astype(np.float32)).to(rewards.device)


# ----------------------------------------------------------------------------------------------


def _inputs(B, device, seed=0, cols=None):
    g = torch.Generator().manual_seed(seed + B)
    P = max(1, B // GROUP)
    ids = torch.arange(P).repeat_interleave(GROUP)[:B]
    ids = ids[torch.randperm(B, generator=g)] * 7919
    shape = (B,) if cols is None else (B, cols)
    r = torch.randn(shape, generator=g)
    return r.to(device), ids.to(device)


def _row(case, B, impl, ms, base_ms, device, nbytes):
    return {
        "op": OP,
        "case": case,
        "B": B,
        "impl": impl,
        "ms": round(ms, 4),
        "speedup_vs_eager": round(base_ms / ms, 2) if base_ms else None,
        "GB/s": round(nbytes / (ms * 1e-3) / 1e9, 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def run(ctx=None) -> list[dict]:
    """Rows of (case, B, impl, ms, speedup vs eager reference, GB/s). ``ctx`` may give ``device``
    (default: cuda if available), ``quick`` (fewer sizes) and ``sizes``."""
    import diffrl  # noqa: PLC0415
    from diffrl.ops import _dispatch  # noqa: PLC0415
    from diffrl.ops.reference import (  # noqa: PLC0415
        group_advantages_reference,
        grpo_loss_reference,
        win_rate_reference,
    )

    device = torch.device(getattr(ctx, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = getattr(ctx, "sizes", None) or (SIZES[::2] if getattr(ctx, "quick", False) else SIZES)
    candidates = ("cuda", "triton") if device.type == "cuda" else ("cpp",)
    backends = [b for b in candidates if _dispatch.backend_status(b)[0] and _dispatch._runs_on(b, device)]
    rows = []

    for B in sizes:
        # [B] rewards, group std: the common GRPO case
        r, ids = _inputs(B, device)
        nbytes = B * (4 + 8 + 4)  # rewards, ids, advantages
        eager = time_ms(lambda: group_advantages_reference(r, ids), device)
        rows.append(_row("group [B]", B, "eager reference", eager, eager, device, nbytes))
        ms = time_ms(lambda: numpy_loop_advantages(ids, r), device, max_reps=50)
        rows.append(_row("group [B]", B, "numpy per-prompt loop", ms, eager, device, nbytes))
        for b in backends:
            for validate in (True, False):
                ms = time_ms(lambda: diffrl.group_advantages(r, ids, backend=b, validate=validate), device)
                rows.append(_row("group [B]", B, f"diffrl {b}" + ("" if validate else " validate=False"), ms, eager,
                                 device, nbytes))

        # dense [B, T] rewards, normalised per (group, step)
        rd, ids = _inputs(B, device, cols=STEPS)
        nbytes = B * (4 * STEPS + 8 + 4 * STEPS)
        eager = time_ms(lambda: group_advantages_reference(rd, ids, num_steps=STEPS), device)
        rows.append(_row(f"dense [B, {STEPS}]", B, "eager reference", eager, eager, device, nbytes))
        ms = time_ms(lambda: numpy_loop_advantages(ids, rd), device, max_reps=50)
        rows.append(_row(f"dense [B, {STEPS}]", B, "numpy per-prompt loop", ms, eager, device, nbytes))
        for b in backends:
            ms = time_ms(lambda: diffrl.group_advantages(rd, ids, num_steps=STEPS, backend=b, validate=False), device)
            rows.append(_row(f"dense [B, {STEPS}]", B, f"diffrl {b} validate=False", ms, eager, device, nbytes))

        # Pref-GRPO win rate (the reference is pairwise: only up to 4096)
        s, ids = _inputs(B, device)
        nbytes = B * (4 + 8 + 4)
        eager = time_ms(lambda: win_rate_reference(s, ids), device, max_reps=20) if B <= 4096 else None
        if eager:
            rows.append(_row("win_rate [B]", B, "eager reference", eager, eager, device, nbytes))
        for b in backends:
            ms = time_ms(lambda: diffrl.win_rate(s, ids, backend=b, validate=False), device)
            rows.append(_row("win_rate [B]", B, f"diffrl {b} validate=False", ms, eager, device, nbytes))

        # GRPO loss over [B, T], forward + backward
        g = torch.Generator().manual_seed(B)
        lp = (torch.randn(B, STEPS, generator=g) - 30).to(device)
        old = lp + 0.1 * torch.randn(B, STEPS, generator=g).to(device)
        adv = torch.randn(B, generator=g).to(device)
        kl = torch.rand(B, STEPS, generator=g).to(device)
        nbytes = B * STEPS * 4 * 5 + B * 4

        def loss_step(fn):
            x = lp.clone().requires_grad_()
            k = kl.clone().requires_grad_()
            loss, _ = fn(x, k)
            loss.backward()

        eager = time_ms(lambda: loss_step(lambda x, k: grpo_loss_reference(x, old, adv, clip_range=1e-4, kl=k,
                                                                           kl_coef=0.04)), device)
        rows.append(_row(f"grpo_loss fwd+bwd [B, {STEPS}]", B, "eager reference", eager, eager, device, nbytes))
        for b in backends:
            ms = time_ms(lambda: loss_step(lambda x, k: diffrl.grpo_loss(x, old, adv, clip_range=1e-4, kl=k,
                                                                         kl_coef=0.04, backend=b)), device)
            rows.append(_row(f"grpo_loss fwd+bwd [B, {STEPS}]", B, f"diffrl {b}", ms, eager, device, nbytes))
    return rows


def _markdown(rows):
    cols = ["case", "B", "impl", "ms", "speedup_vs_eager", "GB/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    rows = run(args)
    print(f"# {OP} on {rows[0]['device']} (torch {torch.__version__})\n")
    print(_markdown(rows))
    if args.csv:
        import csv  # noqa: PLC0415

        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

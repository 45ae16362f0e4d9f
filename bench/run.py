"""Run the benchmarks: ``python -m bench.run [--quick] [--ops sde_step,...] [--device cpu|cuda] [--no-compile]``.

Discovers every ``bench/bench_<name>.py`` that defines ``OP`` and ``run(ctx)`` (see bench/README.md),
runs the selected ones, prints a markdown table per op and writes
``<out>/<device-slug>/<op>.csv`` (appended) and ``<op>.md`` (``<op>.quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import harness

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> dict[str, object]:
    """{OP: module} for every bench/bench_*.py exposing ``OP`` and ``run``."""
    found = {}
    for info in sorted(pkgutil.iter_modules([str(BENCH_DIR)]), key=lambda i: i.name):
        if not info.name.startswith("bench_"):
            continue
        try:
            mod = importlib.import_module(f"bench.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one broken module must not hide the others
            print(f"bench: cannot import bench/{info.name}.py: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        op, fn = getattr(mod, "OP", None), getattr(mod, "run", None)
        if not isinstance(op, str) or not callable(fn):
            print(f"bench: bench/{info.name}.py has no OP string / run(ctx); skipped", file=sys.stderr)
            continue
        found[op] = mod
    return found


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _csv(text, conv=str):
    return tuple(conv(t.strip()) for t in text.split(",") if t.strip()) if text else None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmark diffrl's ops (see bench/README.md)")
    ap.add_argument("--quick", action="store_true", help="small smoke-size run (< 1 min on a CPU)")
    ap.add_argument("--ops", default=None, help="comma-separated ops (default: every bench/bench_*.py)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--out", default=str(BENCH_DIR / "results"), help="results folder (default bench/results)")
    ap.add_argument("--no-save", action="store_true", help="print only, write no files")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timed repetitions per measurement")
    ap.add_argument("--no-flush-l2", action="store_true", help="CUDA: keep the L2 cache warm between repetitions")
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default trimming/mmap thresholds (see harness.configure_cpu_allocator)")
    ap.add_argument("--dtypes", default=None, help="override dtypes, e.g. fp32,bf16")
    ap.add_argument("--shapes", default=None, help="override latents (bench/shapes.py names), e.g. sd15,sd3")
    ap.add_argument("--batches", default=None, help="override batch sizes, e.g. 1,8")
    ap.add_argument("--sizes", default=None, help="override sizes for ops with their own size axis, e.g. 64,1024")
    ap.add_argument("--list", action="store_true", help="list the discovered ops and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    mods = discover()
    if args.list:
        for op, mod in mods.items():
            print(f"{op:20s} bench/{Path(mod.__file__).name}")
        return 0
    wanted = _csv(args.ops) or tuple(mods)
    unknown = [o for o in wanted if o not in mods]
    if unknown:
        print(f"bench: unknown op(s) {', '.join(unknown)}; available: {', '.join(mods)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    harness.configure_cpu_allocator(not args.default_malloc)
    ctx = harness.BenchContext(
        device=device, quick=args.quick, compile=not args.no_compile, budget_s=args.budget,
        flush_l2=not args.no_flush_l2, dtypes=_csv(args.dtypes, lambda s: _DTYPES[s.lower()]),
        shapes=_csv(args.shapes), batches=_csv(args.batches, int), sizes=_csv(args.sizes, int),
    )
    ctx.meta = harness.collect_metadata(ctx)
    m = ctx.meta
    print(f"bench: {m['device_name']} | torch {m['torch']} | triton {m['triton'] or '-'} | diffrl {m['diffrl']} | "
          f"commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''} | {m['threads']} threads", file=sys.stderr)
    if device.type == "cpu" and isinstance(m["loadavg_1m"], float) and m["loadavg_1m"] > 0.5 * (os.cpu_count() or 1):
        print(f"bench: warning: 1-min load average is {m['loadavg_1m']} on {os.cpu_count()} CPUs: other processes "
              "compete for the cores and the timings will be noisy", file=sys.stderr)

    failed = 0
    t_all = time.perf_counter()
    for op in wanted:
        t0 = time.perf_counter()
        try:
            rows = mods[op].run(ctx)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            print(f"bench: {op} failed", file=sys.stderr)
            failed += 1
            continue
        dt = time.perf_counter() - t0
        print(f"\n{harness.markdown_header(op, m)}{harness.markdown_table(rows)}")
        if not args.no_save and rows:
            csv_path, md_path = harness.write_results(op, rows, m, Path(args.out), device, quick=args.quick)
            print(f"bench: {op}: {len(rows)} rows in {dt:.0f} s -> {md_path}, {csv_path}", file=sys.stderr)
        else:
            print(f"bench: {op}: {len(rows)} rows in {dt:.0f} s", file=sys.stderr)
    print(f"bench: done in {time.perf_counter() - t_all:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

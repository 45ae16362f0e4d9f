"""pytest-benchmark view of the sde_step benchmark (a small set of the same registry cases).

Not part of the test suite (pyproject's testpaths is tests/). Run from the repository root:

    .venv/bin/python -m pytest bench/test_bench_sde_step.py --benchmark-only
    DIFFRL_BENCH_COMPILE=1 ...   also time torch.compile of the reference (slow to compile on a CPU)

The cases come from bench/shapes.py through ``bench_sde_step.cases(quick=True)``; the calls timed
are the ones ``python -m bench.run`` times (``bench_sde_step.make_fn``). On CUDA every timed call
ends with a synchronisation.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from bench import bench_sde_step as B
from bench import harness

pytest.importorskip("pytest_benchmark")

harness.configure_cpu_allocator()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = B.cases(DEVICE.type, quick=True) + B.overhead_cases()
IMPLS = ["eager", "compile", *B.fused_backends(DEVICE)]


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = B.make_inputs(case, DEVICE)
        return cache[case]

    return get


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sde_step(benchmark, inputs, case, impl):
    if impl == "compile" and os.environ.get("DIFFRL_BENCH_COMPILE", "0") in ("", "0"):
        pytest.skip("torch.compile baseline: set DIFFRL_BENCH_COMPILE=1")
    inp = inputs(case)
    fn, grads = B.make_fn(case, impl, inp)

    def call():
        fn()
        harness.sync(DEVICE)

    def setup():
        for t in grads:
            t.grad = None

    # warm up (compiles, first-call allocations) and size the rounds to ~0.3 s
    setup()
    want = B.check(case, fn(), B.make_fn(case, "eager", inp)[0]()) if impl != "eager" else ""
    assert not want, want
    t0 = time.perf_counter()
    for _ in range(3):
        setup()
        call()
    per_call = (time.perf_counter() - t0) / 3
    rounds = int(min(2000, max(5, 0.3 / max(per_call, 1e-6))))
    nbytes = B.bytes_moved(case)
    benchmark.group = f"{case.name} {case.latent} B={case.batch} {harness.dtype_name(case.dtype)} {case.mode}"
    benchmark.extra_info.update(bytes_moved=nbytes, device=harness.device_name(DEVICE))
    benchmark.pedantic(call, setup=setup, rounds=rounds, warmup_rounds=2, iterations=1)
    if benchmark.stats is not None:
        med = benchmark.stats.stats.median
        benchmark.extra_info["gbps"] = round(nbytes / med / 1e9, 3)

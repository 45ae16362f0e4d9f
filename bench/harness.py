"""Shared benchmark harness: timing, peak memory, copy bandwidth, result rows, metadata, CSV + markdown.

Every ``bench/bench_<op>.py`` builds its rows with :func:`result_row` and times with :func:`measure`,
so that all ops report the same columns measured the same way (see bench/README.md).

Timing
    CUDA: a ``triton.testing.do_bench``-like loop: estimate one call from 5 calls, warm up for
    ``warmup_s``, then time each repetition between two CUDA events (the L2 cache is flushed before
    each repetition by zeroing a 256 MB buffer unless ``flush_l2=False``); repetitions fill
    ``budget_s``. CPU: ``time.perf_counter`` around each call after a warm-up, repetitions until
    ``budget_s`` is spent. Both report the median and the 20th/80th percentiles over repetitions.
    ``grad_to_none`` tensors get ``.grad = None`` before every repetition (outside the timed region),
    so that a forward+backward never pays for gradient accumulation.

Peak memory
    The most memory torch's allocator holds during one call above what was allocated before the
    call: outputs and intermediates count, inputs (alive before the call) do not. CUDA:
    ``max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()``
    before. CPU: torch has no CPU allocator statistics, so one call runs under
    ``torch.profiler`` with ``profile_memory=True`` and the peak of the running sum of its
    allocation/free events is taken. This counts tensors only (not the Python heap, not memory a
    library allocates behind torch's back, not allocator caching), which is what differs between
    implementations here.

Copy bandwidth
    :func:`copy_bandwidth` times ``dst.copy_(src)`` of ``nbytes`` on the same device in the same run
    (read ``nbytes`` + write ``nbytes``: GB/s = 2 * nbytes / time). Rows compare an op moving
    ``M`` bytes with a copy of ``M / 2`` bytes, i.e. the same traffic and working-set size: the
    practical roofline for memory-bound ops (caches included, which matters on a CPU).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------------------------
# the context every bench module's run(ctx) receives


@dataclass
class BenchContext:
    """What ``bench/run.py`` hands each ``bench_<op>.run(ctx)``.

    device      torch.device to run on
    quick       small smoke-size run (``--quick``)
    compile     include ``torch.compile`` baselines
    budget_s    time budget of one timing measurement (seconds of repetitions)
    warmup_s    warm-up time before the timed repetitions
    flush_l2    CUDA only: flush the L2 cache before each repetition (cold-cache timings)
    dtypes      optional override of the dtypes a module benchmarks (None: the module's defaults)
    sizes       optional override of the sizes a module benchmarks (None: the module's defaults)
    shapes      optional override: latent names from bench/shapes.py (ops on latents)
    batches     optional override: batch sizes (ops on latents)
    meta        run metadata (device name, versions, commit ...), filled by :func:`collect_metadata`
    """

    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    quick: bool = False
    compile: bool = True
    budget_s: float | None = None
    warmup_s: float | None = None
    flush_l2: bool = True
    dtypes: tuple[torch.dtype, ...] | None = None
    sizes: tuple | None = None
    shapes: tuple[str, ...] | None = None
    batches: tuple[int, ...] | None = None
    meta: dict = field(default_factory=dict)
    verbose: bool = True

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.budget_s is None:
            self.budget_s = (0.1 if self.quick else 0.3) if self.device.type == "cpu" else (0.05 if self.quick else 0.2)
        if self.warmup_s is None:
            self.warmup_s = min(0.1, self.budget_s / 3) if self.device.type == "cpu" else 0.025

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)

    def timing(self, fn: Callable[[], object], **kw) -> Timing:
        kw.setdefault("budget_s", self.budget_s)
        kw.setdefault("warmup_s", self.warmup_s)
        kw.setdefault("flush_l2", self.flush_l2)
        return measure(fn, self.device, **kw)

    def copy_gbps(self, nbytes: int) -> float:
        """Copy bandwidth for an op moving ``nbytes`` in total (a copy of nbytes // 2)."""
        return copy_bandwidth(self.device, max(1, nbytes // 2), budget_s=self.budget_s, warmup_s=self.warmup_s,
                              flush_l2=self.flush_l2)[0]


# ----------------------------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int

    @classmethod
    def from_samples(cls, ms: list[float]) -> Timing:
        return cls(quantile(ms, 0.5), quantile(ms, 0.2), quantile(ms, 0.8), len(ms))


def quantile(xs: Iterable[float], q: float) -> float:
    """Linear-interpolated quantile (as torch.quantile / numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _l2_buffer(device):
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _L2_FLUSH[device]


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    budget_s: float = 0.3,
    warmup_s: float = 0.1,
    min_reps: int = 5,
    max_reps: int = 100_000,
    grad_to_none: Iterable[torch.Tensor] = (),
    flush_l2: bool = True,
    host: bool = False,
) -> Timing:
    """Time ``fn()``: median and 20th/80th percentiles over repetitions, in milliseconds.

    ``host=True`` on CUDA measures the host (CPU) time of one call instead of the device time:
    ``perf_counter`` around ``fn()`` with the device synchronised between repetitions, outside the
    timed region. That is the per-call overhead a sampler pays (Python, validation, dispatch,
    launches), which device-side events hide whenever the GPU is busy when the call is made."""
    device = torch.device(device)
    grads = list(grad_to_none)
    if device.type == "cuda" and not host:
        return _measure_cuda(fn, device, budget_s, warmup_s, min_reps, max_reps, grads, flush_l2)
    return _measure_cpu(fn, budget_s, warmup_s, min_reps, max_reps, grads, lambda: sync(device))


def _measure_cpu(fn, budget_s, warmup_s, min_reps, max_reps, grads, between=lambda: None):
    # warm-up: at least 2 calls (first-call allocations, lazy initialisation), then up to warmup_s
    t_end = time.perf_counter() + warmup_s
    n = 0
    while n < 2 or time.perf_counter() < t_end:
        _clear_grads(grads)
        fn()
        n += 1
    ms = []
    between()
    t_end = time.perf_counter() + budget_s
    while len(ms) < max_reps and (len(ms) < min_reps or time.perf_counter() < t_end):
        _clear_grads(grads)
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
        between()
    _clear_grads(grads)
    return Timing.from_samples(ms)


def _measure_cuda(fn, device, budget_s, warmup_s, min_reps, max_reps, grads, flush_l2):
    cache = _l2_buffer(device) if flush_l2 else None
    with torch.cuda.device(device):
        _clear_grads(grads)
        fn()
        torch.cuda.synchronize()
        # estimate the time of one call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            if cache is not None:
                cache.zero_()
            _clear_grads(grads)
            fn()
        end.record()
        torch.cuda.synchronize()
        est_ms = max(start.elapsed_time(end) / 5, 1e-4)
        n_warmup = max(1, int(warmup_s * 1e3 / est_ms))
        n_rep = max(min_reps, min(max_reps, int(budget_s * 1e3 / est_ms)))
        for _ in range(n_warmup):
            _clear_grads(grads)
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            _clear_grads(grads)
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        _clear_grads(grads)
        return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ----------------------------------------------------------------------------------------------
# CPU allocator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_NOTE = "default"


def configure_cpu_allocator(enable: bool = True) -> str:
    """Keep freed CPU memory in the process (glibc ``mallopt``), as the CUDA caching allocator does.

    With glibc's defaults every tensor above the (dynamic) mmap threshold is mapped and unmapped on
    each call, and the heap top is trimmed once more than 2x that threshold is free, so the next
    call page-faults all its memory in again. That cost lands mostly on implementations with many
    latent-sized intermediates (eager PyTorch: up to 8x slower on a 1 MB latent here) and depends on
    what the process allocated before, i.e. on the order of the cases. Fixing
    ``M_MMAP_THRESHOLD = 32 MiB`` (glibc's maximum) and ``M_TRIM_THRESHOLD = 1 GiB`` makes every
    implementation reuse its memory, as a long-running sampler with jemalloc/tcmalloc does.
    Returns a description for the metadata ("default" when not applied)."""
    global _ALLOCATOR_NOTE
    if not enable or not sys.platform.startswith("linux"):
        return _ALLOCATOR_NOTE
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError):
        ok = False
    if ok:
        _ALLOCATOR_NOTE = "glibc mallopt(M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=1GiB)"
    return _ALLOCATOR_NOTE


def cpu_allocator_note() -> str:
    return _ALLOCATOR_NOTE


# ----------------------------------------------------------------------------------------------
# peak memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's native start/stop lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str,
                      grad_to_none: Iterable[torch.Tensor] = ()) -> int | None:
    """Peak bytes allocated by torch during one call of ``fn`` above what was allocated before it
    (the call's result is dropped inside the measurement). None if it cannot be measured."""
    device = torch.device(device)
    grads = list(grad_to_none)
    _clear_grads(grads)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        _clear_grads(grads)
        return int(peak)
    try:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # noqa: BLE001 - the profiler API is private; degrade to "n/a"
        _clear_grads(grads)
        return None
    _clear_grads(grads)
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


# ----------------------------------------------------------------------------------------------
# copy bandwidth: the roofline of a memory-bound op on this device, measured in the same run

_COPY_CACHE: dict[tuple, tuple[float, Timing]] = {}


def copy_bandwidth(device: torch.device | str, nbytes: int, *, budget_s: float = 0.3, warmup_s: float = 0.1,
                   flush_l2: bool = True) -> tuple[float, Timing]:
    """(GB/s, timing) of ``dst.copy_(src)`` for ``nbytes``-byte buffers on ``device``:
    GB/s = 2 * nbytes / time (read + write). Cached per (device, nbytes) within a process."""
    device = torch.device(device)
    key = (str(device), int(nbytes), flush_l2)
    if key not in _COPY_CACHE:
        src = torch.empty(int(nbytes), dtype=torch.uint8, device=device).fill_(1)  # touch every page
        dst = torch.zeros_like(src)
        t = measure(lambda: dst.copy_(src), device, budget_s=budget_s, warmup_s=warmup_s, flush_l2=flush_l2)
        _COPY_CACHE[key] = (2 * nbytes / (t.median_ms * 1e-3) / 1e9, t)
    return _COPY_CACHE[key]


# ----------------------------------------------------------------------------------------------
# result rows

COLUMNS = [
    "op", "case", "shape", "dtype", "batch", "mode", "impl",
    "median_ms", "p20_ms", "p80_ms", "reps",
    "bytes_moved", "gbps", "copy_gbps", "frac_of_copy", "speedup_vs_eager", "peak_mem_mb", "note",
]

META_COLUMNS = [
    "device_name", "device_type", "threads", "torch", "triton", "diffrl", "cuda", "diffrl_build",
    "git_commit", "git_dirty", "date", "run_id", "quick", "budget_s", "flush_l2", "cpu_malloc", "loadavg_1m", "python",
]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def result_row(*, op: str, case: str, shape, dtype, batch: int, mode: str, impl: str, timing: Timing,
               bytes_moved: int | None, copy_gbps: float | None = None, eager_ms: float | None = None,
               peak_bytes: int | None = None, note: str = "", **extra) -> dict:
    """One result row with the standard columns (extra keyword columns are appended)."""
    gbps = bytes_moved / (timing.median_ms * 1e-3) / 1e9 if bytes_moved else None
    row = {
        "op": op,
        "case": case,
        "shape": "x".join(map(str, shape)) if isinstance(shape, (tuple, list, torch.Size)) else str(shape),
        "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype),
        "batch": batch,
        "mode": mode,
        "impl": impl,
        "median_ms": round(timing.median_ms, 5),
        "p20_ms": round(timing.p20_ms, 5),
        "p80_ms": round(timing.p80_ms, 5),
        "reps": timing.reps,
        "bytes_moved": bytes_moved,
        "gbps": None if gbps is None else round(gbps, 3),
        "copy_gbps": None if copy_gbps is None else round(copy_gbps, 3),
        "frac_of_copy": None if (gbps is None or not copy_gbps) else round(gbps / copy_gbps, 4),
        "speedup_vs_eager": None if not eager_ms else round(eager_ms / timing.median_ms, 3),
        "peak_mem_mb": None if peak_bytes is None else round(peak_bytes / 2**20, 3),
        "note": note,
    }
    row.update(extra)
    return row


# ----------------------------------------------------------------------------------------------
# metadata


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} ({os.cpu_count()} CPUs)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_slug(device: torch.device) -> str:
    """Results folder name: e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2cpu``."""
    device = torch.device(device)
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    name = device_name(device).split(" (")[0]
    return f"cpu-{slug(name)}-{os.cpu_count()}cpu"


def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout, or no git
        return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def collect_metadata(ctx: BenchContext) -> dict:
    import diffrl
    from diffrl import _native

    now = _dt.datetime.now(_dt.timezone.utc)
    bi = _native.build_info()
    build = ",".join(f"{k}={v}" for k, v in sorted(bi.items())) if bi else "no extension"
    meta = {
        "device_name": device_name(ctx.device),
        "device_type": ctx.device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffrl": diffrl.__version__,
        "cuda": torch.version.cuda or "",
        "diffrl_build": build,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": now.isoformat(timespec="seconds"),
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "quick": ctx.quick,
        "budget_s": ctx.budget_s,
        "flush_l2": ctx.flush_l2 if ctx.device.type == "cuda" else "",
        "cpu_malloc": cpu_allocator_note(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
        "python": platform.python_version(),
    }
    return meta


# ----------------------------------------------------------------------------------------------
# output: CSV (appended, one row per result with the metadata columns) and a markdown table


def _fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.4g}" if a < 1000 else f"{v:.0f}"
    return str(v)


# standard columns as shown in the markdown table: (header, formatter of a row)
_MD_COLUMNS = [
    ("case", lambda r: r.get("case")),
    ("shape", lambda r: r.get("shape")),
    ("B", lambda r: r.get("batch")),
    ("dtype", lambda r: r.get("dtype")),
    ("mode", lambda r: r.get("mode")),
    ("impl", lambda r: r.get("impl")),
    ("median ms", lambda r: _fmt(r.get("median_ms"))),
    ("p20-p80 ms", lambda r: f"{_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}"),
    ("MB moved", lambda r: _fmt(r["bytes_moved"] / 1e6) if r.get("bytes_moved") else ""),
    ("GB/s", lambda r: _fmt(r.get("gbps"))),
    ("copy GB/s", lambda r: _fmt(r.get("copy_gbps"))),
    ("% of copy", lambda r: _fmt(100 * r["frac_of_copy"]) if r.get("frac_of_copy") is not None else ""),
    ("x eager", lambda r: _fmt(r.get("speedup_vs_eager"))),
    ("peak MB", lambda r: _fmt(r.get("peak_mem_mb"))),
    ("note", lambda r: "; ".join(x for x in (r.get("note") or "",
                                             f"compiled in {r['compile_s']} s" if r.get("compile_s") else "") if x)),
]


def _is_standard(rows: list[dict]) -> bool:
    return all(k in r for r in rows for k in ("median_ms", "impl", "case"))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no results)\n"
    if _is_standard(rows):
        headers = [h for h, _ in _MD_COLUMNS]
        body = [[str(f(r) if f(r) is not None else "") for _, f in _MD_COLUMNS] for r in rows]
    else:  # a module with its own columns: show them as they are
        headers = list(dict.fromkeys(k for r in rows for k in r))
        body = [[_fmt(r.get(h)) for h in headers] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def markdown_header(op: str, meta: dict, kernel_timing: bool = True) -> str:
    """The report's title and run metadata; ``kernel_timing=False`` leaves out the lines that describe the
    kernel benchmarks' timing and columns (for reports that time something else, e.g. training runs)."""
    dirty = " (dirty tree)" if meta.get("git_dirty") else ""
    parts = [
        f"# {op} on {meta.get('device_name')}",
        "",
        f"- date: {meta.get('date')}, commit {meta.get('git_commit')}{dirty}",
        f"- torch {meta.get('torch')}, triton {meta.get('triton') or '-'}, diffrl {meta.get('diffrl')}"
        + (f", CUDA {meta['cuda']}" if meta.get("cuda") else ""),
        f"- extension: {meta.get('diffrl_build')}",
        (f"- torch threads: {meta.get('threads')}, 1-min load average at start: {meta.get('loadavg_1m')}, "
         f"CPU allocator: {meta.get('cpu_malloc')}"),
    ]
    if kernel_timing:
        parts += [
            f"- timing: median (p20-p80) over repetitions filling {meta.get('budget_s')} s per measurement"
            + (f", L2 flushed before each repetition: {meta.get('flush_l2')}" if meta.get("device_type") == "cuda"
               else ""),
            ("- columns: see bench/README.md (MB moved = minimum bytes the fused op reads + writes; "
             "% of copy = GB/s / copy GB/s of the same traffic; x eager = eager median / this median)"),
        ]
    parts.append("")
    return "\n".join(parts) + "\n"


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """Append ``rows`` (each with the metadata columns) to ``path``; widen the header if needed."""
    full = [{**r, **{k: meta.get(k, "") for k in META_COLUMNS}} for r in rows]
    fields = list(dict.fromkeys([*COLUMNS, *(k for r in full for k in r)]))
    fields = [f for f in fields if any(f in r for r in full)] if not _is_standard(rows) else fields
    existing: list[dict] = []
    old_fields: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if any(k not in old_fields for k in fields):
                existing = list(reader)
    path.parent.mkdir(parents=True, exist_ok=True)
    if old_fields and not existing and all(k in old_fields for k in fields):
        with open(path, "a", newline="") as f:  # plain append
            csv.DictWriter(f, fieldnames=old_fields).writerows(full)
        return
    merged = list(dict.fromkeys([*old_fields, *fields]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=merged)
        w.writeheader()
        w.writerows(existing)
        w.writerows(full)


def write_results(op: str, rows: list[dict], meta: dict, out: Path, device: torch.device,
                  quick: bool = False) -> tuple[Path, Path]:
    """``<out>/<device-slug>/<op>.csv`` (appended) and ``<op>.md`` (this run's table);
    ``--quick`` runs go to ``<op>.quick.csv`` / ``<op>.quick.md`` so they never replace a full run."""
    folder = Path(out) / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{op}.quick" if quick else op
    csv_path, md_path = folder / f"{stem}.csv", folder / f"{stem}.md"
    write_csv(csv_path, rows, meta)
    md_path.write_text(markdown_header(op, meta) + markdown_table(rows))
    return csv_path, md_path

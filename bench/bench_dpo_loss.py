"""Benchmark of ``diffrl.diffusion_dpo_loss`` against eager PyTorch and ``torch.compile`` of the same reference.

Cases: the latents of bench/shapes.py (SD1.5 / SDXL / SD3 / FLUX) x batch sizes (B = preference
pairs) x dtypes, in two modes:

fwd      the loss and its stats from the six predictions/targets (what an evaluation pass calls)
fwd+bwd  the training call: the loss, then the backward into the policy's two predictions

Implementations: ``eager`` = ``diffrl.diffusion_dpo_loss(..., backend="torch")`` (the reference,
``diffrl.ops.reference.diffusion_dpo_loss_reference``), ``compile`` = ``torch.compile`` of that
reference (``fullgraph=True``, compiled once per case), and every fused backend available on the
device (``cpp`` on CPU; ``cuda``, ``cupy``, ``triton`` on GPU; the Triton interpreter is not timed).

Bytes moved (the ``GB/s`` numerator), with N = B * elements per sample and e the element size:
    fwd:     reads the six inputs                                           -> 6 N e
    fwd+bwd: the forward, then the backward reads policy_w, policy_l, target_w, target_l and writes
             the two gradients                                              -> 12 N e
(the per-sample scalars, a few bytes per pair, are left out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench import harness, shapes

OP = "diffusion_dpo_loss"
MODES = ("fwd", "fwd+bwd")
FUSED = ("cpp", "cuda", "cupy", "triton")
BETA = 5000.0  # the official SD1.5 / SDXL setting


@dataclass(frozen=True)
class Case:
    latent: shapes.Latent
    batch: int
    dtype: torch.dtype
    mode: str

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.latent.shape)

    @property
    def numel(self) -> int:
        return self.batch * self.latent.numel

    def __str__(self) -> str:
        return f"{self.latent.name} {self.latent} B={self.batch} {harness.dtype_name(self.dtype)} {self.mode}"


def cases(device_type: str, quick: bool = False, *, latents=None, batches=None, dtypes=None) -> list[Case]:
    lats = [shapes.LATENTS[n] for n in latents] if latents else shapes.latents(quick)
    bs = tuple(batches) if batches else shapes.batches(device_type, quick)
    dts = tuple(dtypes) if dtypes else ((torch.float32,) if quick else (torch.float32, torch.bfloat16))
    return [Case(lat, b, dt, m) for lat in lats for b in bs for dt in dts for m in MODES]


def bytes_moved(case: Case) -> int:
    e = torch.empty((), dtype=case.dtype).element_size()
    return (6 if case.mode == "fwd" else 12) * case.numel * e


def fused_backends(device: torch.device) -> list[str]:
    from diffrl.ops import _dispatch

    out = []
    for b in FUSED:
        if device.type == "cpu" and b == "triton":
            continue  # the interpreter is a correctness path, not a fast one
        if _dispatch.backend_status(b)[0] and _dispatch._runs_on(b, device):
            out.append(b)
    return out


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Policy predictions close to the reference's (as in training), the targets unrelated."""
    g = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return scale * torch.randn(case.shape, generator=g)

    rw, rl, tw, tl = rnd(), rnd(), rnd(), rnd()
    pw, pl = rw + rnd(0.01), rl + rnd(0.01)
    out = [t.to(device=device, dtype=case.dtype) for t in (pw, pl, rw, rl, tw, tl)]
    if case.mode == "fwd+bwd":
        out[0].requires_grad_(True)
        out[1].requires_grad_(True)
    return out


def compile_reference():
    from diffrl.ops.reference import diffusion_dpo_loss_reference

    torch._dynamo.reset()
    return torch.compile(diffusion_dpo_loss_reference, dynamic=False, fullgraph=True)


def make_fn(case: Case, impl: str, inp: list, compiled=None):
    """``(fn, grad_to_none)``: ``fn()`` makes the call (and the backward in fwd+bwd) and returns the loss."""
    import diffrl

    if impl == "compile":
        f = compiled if compiled is not None else compile_reference()

        def call():
            return f(*inp, beta=BETA)
    else:
        backend = "torch" if impl == "eager" else impl

        def call():
            return diffrl.diffusion_dpo_loss(*inp, beta=BETA, backend=backend)

    if case.mode == "fwd":
        def fn():
            return call()[0]

        return fn, ()

    def fn():
        loss, _ = call()
        loss.backward()
        return loss

    return fn, (inp[0], inp[1])


def _fits(case: Case, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return 20 * case.numel * 4 < 0.6 * free  # eager fwd+bwd holds ~20 latent-sized float32 tensors


def bench_case(ctx, case: Case, impls: list[str], *, compile_ok: bool) -> list[dict]:
    device = ctx.device
    inp = make_inputs(case, device)
    nbytes = bytes_moved(case)
    copy = ctx.copy_gbps(nbytes)
    rows, eager_ms, want = [], None, None
    for impl in impls:
        if impl == "compile" and not compile_ok:
            continue
        note, extra = "", {}
        try:
            if impl == "compile":
                t0 = time.perf_counter()
                fn, grads = make_fn(case, impl, inp, compiled=compile_reference())
                for t in grads:
                    t.grad = None
                fn()
                harness.sync(device)
                extra["compile_s"] = round(time.perf_counter() - t0, 2)
            else:
                fn, grads = make_fn(case, impl, inp)
            for t in grads:
                t.grad = None
            got = float(fn())
            if impl == "eager":
                want = got
            elif want is not None and abs(got - want) > 1e-3 * max(1.0, abs(want)):
                note = f"MISMATCH loss {got:.6g} vs eager {want:.6g}"
            timing = ctx.timing(fn, grad_to_none=grads)
            peak = harness.peak_memory_bytes(fn, device, grad_to_none=grads)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking the rest
            ctx.log(f"  {impl}: FAILED {type(exc).__name__}: {exc}")
            rows.append(harness.result_row(op=OP, case=case.latent.name, shape=case.latent.shape, dtype=case.dtype,
                                           batch=case.batch, mode=case.mode, impl=impl,
                                           timing=harness.Timing(float("nan"), float("nan"), float("nan"), 0),
                                           bytes_moved=None, note=f"FAILED {type(exc).__name__}: {exc}"[:200]))
            continue
        if impl == "eager":
            eager_ms = timing.median_ms
        row = harness.result_row(op=OP, case=case.latent.name, shape=case.latent.shape, dtype=case.dtype,
                                 batch=case.batch, mode=case.mode, impl=impl, timing=timing, bytes_moved=nbytes,
                                 copy_gbps=copy, eager_ms=eager_ms, peak_bytes=peak, note=note, **extra)
        rows.append(row)
        ctx.log(f"  {impl:8s} {timing.median_ms:9.4f} ms  {row['gbps'] or 0:8.2f} GB/s  "
                f"x{row['speedup_vs_eager'] or 0:.2f} eager  peak {row['peak_mem_mb']} MB {note}")
    return rows


def run(ctx) -> list[dict]:
    device = ctx.device
    fused = fused_backends(device)
    impls = ["eager", "compile", *fused]
    ctx.log(f"[{OP}] device {device}, fused backends: {', '.join(fused) or 'none'}")
    rows = []
    for case in cases(device.type, ctx.quick, latents=ctx.shapes, batches=ctx.batches, dtypes=ctx.dtypes):
        if case.dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            continue
        if not _fits(case, device):
            ctx.log(f"[{OP}] {case}: skipped, does not fit in free device memory")
            continue
        ctx.log(f"[{OP}] {case}  ({bytes_moved(case) / 1e6:.1f} MB moved)")
        rows += bench_case(ctx, case, impls, compile_ok=bool(ctx.compile and not ctx.quick))
    return rows

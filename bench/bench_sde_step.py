"""Benchmark of ``diffrl.sde_step`` against eager PyTorch and ``torch.compile`` of the same reference.

Modes (the two calls an RL fine-tuning loop makes):

fwd      sampling, what a rollout sampler calls once per denoising step, classifier-free guidance
         fused and the new sample's log-prob returned; the noise is drawn beforehand (RNG cost is
         the same for every implementation and is not part of the op):
         ``sde_step(x, v, coeffs, uncond_output=vu, guidance_scale=4.5, noise=eps, return_mean=False)``
fwd+bwd  scoring a stored rollout in a GRPO training step, with CFG and the KL to a reference model,
         then the backward of ``log_prob.sum() + kl.sum()`` into ``v`` and ``vu`` (the policy's
         outputs; the reference outputs and the samples need no gradient):
         ``sde_step(x, v, coeffs, uncond_output=vu, guidance_scale=4.5, prev_sample=xp,
         ref_output=vr, ref_uncond_output=vru)``

Implementations: ``eager`` = ``diffrl.sde_step(..., backend="torch")`` (the reference, eager),
``compile`` = ``torch.compile(sde_step_reference, dynamic=False, fullgraph=True)`` compiled once per
case, and every fused backend available on the device (``cpp`` on CPU; ``cuda``, ``cupy``, ``triton`` on GPU;
the Triton interpreter is not a performance path and is not timed). Every implementation allocates
its outputs on every call, exactly like the user's call; nothing is preallocated for anyone.

Bytes moved (the ``GB/s`` numerator), with N = B * elements per sample, e = element size, B the batch:
    fwd:     reads x, v, vu, eps and writes x'                      -> 5 N e
             + reads a, c, s and writes log_prob (float32, [B])     -> 16 B
    fwd+bwd: forward reads x, v, vu, xp, vr, vru and writes mean    -> 7 N e
             backward reads the six inputs again (it recomputes, nothing else is saved) and writes
             grad v, grad vu                                         -> 8 N e
             + a, c, s read twice, log_prob and kl written, their two gradients read -> 40 B

Also an ``overhead`` case: a 4x8x8 latent with B = 1, where the time is the per-call cost
(Python, validation, dispatch, launch) that a sampler pays once per step. On CUDA it is timed on
the host (``perf_counter`` around the call, the device synchronised between calls), since device
events hide host time whenever the GPU is busy; every other CUDA case reports device time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench import harness, shapes

OP = "sde_step"
GUIDANCE = 4.5
# a typical stochastic flow-matching step (Flow-GRPO-like): mean = a x + c v, std s
COEFFS = (0.995, -0.05, 0.12)
MODES = ("fwd", "fwd+bwd")
FUSED = ("cpp", "cuda", "cupy", "triton")


@dataclass(frozen=True)
class Case:
    latent: shapes.Latent
    batch: int
    dtype: torch.dtype
    mode: str

    @property
    def name(self) -> str:
        return "overhead" if self.latent.name == "tiny" else self.latent.name

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, *self.latent.shape)

    @property
    def numel(self) -> int:
        return self.batch * self.latent.numel

    def __str__(self) -> str:
        return f"{self.name} {self.latent} B={self.batch} {harness.dtype_name(self.dtype)} {self.mode}"


def default_dtypes(device_type: str, quick: bool) -> tuple[torch.dtype, ...]:
    if quick:
        return (torch.float32,)
    return (torch.float32, torch.bfloat16)


def cases(device_type: str, quick: bool = False, *, latents=None, batches=None, dtypes=None,
          modes=MODES) -> list[Case]:
    """The benchmark cases: latents x batch sizes x dtypes x modes (from bench/shapes.py)."""
    lats = [shapes.LATENTS[n] for n in latents] if latents else shapes.latents(quick)
    bs = tuple(batches) if batches else shapes.batches(device_type, quick)
    dts = tuple(dtypes) if dtypes else default_dtypes(device_type, quick)
    return [Case(lat, b, dt, m) for lat in lats for b in bs for dt in dts for m in modes]


def overhead_cases(modes=MODES) -> list[Case]:
    return [Case(shapes.LATENTS["tiny"], 1, torch.float32, m) for m in modes]


def bytes_moved(case: Case) -> int:
    """Minimum bytes the fused op reads + writes in this mode (see the module docstring)."""
    e = torch.empty((), dtype=case.dtype).element_size()
    n, b = case.numel, case.batch
    if case.mode == "fwd":
        return 5 * n * e + 16 * b
    if case.mode == "fwd+bwd":
        return 15 * n * e + 40 * b
    raise ValueError(case.mode)


def fused_backends(device: torch.device) -> list[str]:
    from diffrl.ops import _dispatch

    out = []
    for b in FUSED:
        if device.type == "cpu" and b == "triton":
            continue  # TRITON_INTERPRET=1 runs Triton kernels in numpy: a correctness path, not a fast one
        if _dispatch.backend_status(b)[0] and _dispatch._runs_on(b, device):
            out.append(b)
    return out


# ----------------------------------------------------------------------------------------------
# inputs and the calls being timed


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """Random inputs on ``device`` (realistic magnitudes: the stored sample is drawn from the step,
    the reference model's outputs are close to the policy's)."""
    import diffrl

    g = torch.Generator().manual_seed(seed)

    def rnd(scale=1.0):
        return (scale * torch.randn(case.shape, generator=g)).to(device=device, dtype=case.dtype)

    coeffs = diffrl.StepCoeffs(*COEFFS).to(device)
    a, c, s = coeffs.expand(case.batch)
    inp = {"coeffs": coeffs, "a": a, "c": c, "s": s, "x": rnd(), "v": rnd(), "vu": rnd()}
    if case.mode == "fwd":
        inp["noise"] = rnd()
    else:
        eps = rnd()
        inp["xp"] = diffrl.sde_step(inp["x"], inp["v"], coeffs, uncond_output=inp["vu"], guidance_scale=GUIDANCE,
                                    noise=eps, backend="torch").prev_sample
        inp["vr"] = inp["v"] + rnd(0.05)
        inp["vru"] = inp["vu"] + rnd(0.05)
        inp["v"].requires_grad_(True)
        inp["vu"].requires_grad_(True)
    return inp


def compile_reference():
    """A fresh ``torch.compile`` of the reference (Dynamo's caches are reset so that each case
    compiles exactly once, for its static shape)."""
    from diffrl.ops.reference import sde_step_reference

    torch._dynamo.reset()
    return torch.compile(sde_step_reference, dynamic=False, fullgraph=True)


def make_fn(case: Case, impl: str, inp: dict, compiled=None):
    """``(fn, grad_to_none)``: ``fn()`` makes the user's call with ``impl`` and returns
    ``(log_prob, kl)`` for the check; in fwd+bwd mode it also runs the backward."""
    import diffrl

    x, v, vu, coeffs = inp["x"], inp["v"], inp["vu"], inp["coeffs"]
    if impl == "compile":
        fn_c = compiled if compiled is not None else compile_reference()
        a, c, s = inp["a"], inp["c"], inp["s"]
        if case.mode == "fwd":
            noise = inp["noise"]

            def fn():
                _, _, lp, _ = fn_c(x, v, a, c, s, uncond_output=vu, guidance_scale=GUIDANCE, noise=noise,
                                   return_mean=False)
                return lp, None

            return fn, ()
        xp, vr, vru = inp["xp"], inp["vr"], inp["vru"]

        def fn():
            _, _, lp, kl = fn_c(x, v, a, c, s, uncond_output=vu, guidance_scale=GUIDANCE, prev_sample=xp,
                                ref_output=vr, ref_uncond_output=vru)
            (lp.sum() + kl.sum()).backward()
            return lp, kl

        return fn, (v, vu)

    backend = "torch" if impl == "eager" else impl
    if case.mode == "fwd":
        noise = inp["noise"]

        def fn():
            out = diffrl.sde_step(x, v, coeffs, uncond_output=vu, guidance_scale=GUIDANCE, noise=noise,
                                  return_mean=False, backend=backend)
            return out.log_prob, None

        return fn, ()
    xp, vr, vru = inp["xp"], inp["vr"], inp["vru"]

    def fn():
        out = diffrl.sde_step(x, v, coeffs, uncond_output=vu, guidance_scale=GUIDANCE, prev_sample=xp,
                              ref_output=vr, ref_uncond_output=vru, backend=backend)
        (out.log_prob.sum() + out.kl.sum()).backward()
        return out.log_prob, out.kl

    return fn, (v, vu)


def check(case: Case, got, want) -> str:
    """'' when ``got`` (log_prob, kl) matches the eager result, else a note for the row."""
    tol = 1e-3 if case.dtype == torch.float32 else 3e-2
    notes = []
    for name, g, w in zip(("log_prob", "kl"), got, want):
        if g is None or w is None:
            continue
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        if not torch.allclose(g, w, rtol=tol, atol=tol):
            notes.append(f"MISMATCH {name} max|diff|={(g - w).abs().max().item():.3g}")
    return "; ".join(notes)


# ----------------------------------------------------------------------------------------------


def _fits(case: Case, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    # eager fwd+bwd holds ~ 30 latent-sized float32 tensors at its peak
    return 30 * case.numel * 4 < 0.6 * free


def bench_case(ctx, case: Case, impls: list[str], *, compile_ok: bool, host: bool = False) -> list[dict]:
    """Rows for one case, eager first (the speed-up baseline). ``host``: time the host side of
    the call (the overhead case; see harness.measure)."""
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
            got = fn()
            if impl == "eager":
                want = got
            elif want is not None:
                note = check(case, got, want)
            del got
            timing = ctx.timing(fn, grad_to_none=grads, host=host)
            peak = harness.peak_memory_bytes(fn, device, grad_to_none=grads)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking the rest
            ctx.log(f"  {impl}: FAILED {type(exc).__name__}: {exc}")
            rows.append(harness.result_row(op=OP, case=case.name, shape=case.latent.shape, dtype=case.dtype,
                                           batch=case.batch, mode=case.mode, impl=impl,
                                           timing=harness.Timing(float("nan"), float("nan"), float("nan"), 0),
                                           bytes_moved=None, note=f"FAILED {type(exc).__name__}: {exc}"[:200]))
            continue
        if impl == "eager":
            eager_ms = timing.median_ms
        row = harness.result_row(op=OP, case=case.name, shape=case.latent.shape, dtype=case.dtype, batch=case.batch,
                                 mode=case.mode, impl=impl, timing=timing, bytes_moved=nbytes, copy_gbps=copy,
                                 eager_ms=eager_ms, peak_bytes=peak, note=note, **extra)
        if host and device.type == "cuda":
            row["note"] = "; ".join(x for x in (note, "host time per call") if x)
        rows.append(row)
        ctx.log(f"  {impl:8s} {timing.median_ms:9.4f} ms  {row['gbps'] or 0:8.2f} GB/s  "
                f"x{row['speedup_vs_eager'] or 0:.2f} eager  peak {row['peak_mem_mb']} MB {note}")
    return rows


def compile_policy(ctx, case: Case) -> bool:
    """Whether a case gets a torch.compile baseline: every case, except with --quick / --no-compile
    (a compile costs ~20 s for the first one in a process on a CPU, then ~1-3 s per case)."""
    return bool(ctx.compile and not ctx.quick)


def run(ctx) -> list[dict]:
    device = ctx.device
    fused = fused_backends(device)
    impls = ["eager", "compile", *fused]
    ctx.log(f"[{OP}] device {device}, fused backends: {', '.join(fused) or 'none'}")
    rows = []
    for case in cases(device.type, ctx.quick, latents=getattr(ctx, "shapes", None),
                      batches=getattr(ctx, "batches", None), dtypes=ctx.dtypes):
        if case.dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            continue
        if not _fits(case, device):
            ctx.log(f"[{OP}] {case}: skipped, does not fit in free device memory")
            continue
        ctx.log(f"[{OP}] {case}  ({bytes_moved(case) / 1e6:.1f} MB moved)")
        rows += bench_case(ctx, case, impls, compile_ok=compile_policy(ctx, case))
    # per-call overhead: the whole call on a latent small enough that nothing else is left
    for case in overhead_cases():
        ctx.log(f"[{OP}] {case}  (per-call overhead)")
        rows += bench_case(ctx, case, impls, compile_ok=compile_policy(ctx, case), host=True)
    return rows

"""Benchmark of ``diffrl.ops.reward_attention`` against SDPA with a padding mask (what transformers
runs for a padded batch) and the eager reference.

Cases (forward only: reward scoring needs no gradient):

text     CLIP's text tower: N prompts padded to 77 tokens, real lengths drawn around 20
         (normal(20, 6) clipped to [4, 77], the length of typical RL prompts), causal, 12 heads of
         64 (ViT-L/14's text width 768). The fused kernels skip the padded tiles.
image    CLIP's image tower: N images of 257 tokens (ViT-L/14 at 224 px: 16 heads of 64; ViT-H/14:
         16 heads of 80, a head dim that is not a power of two), no padding.
cross    N = P x G image-token queries (257 per image) reading the keys/values of their group's
         prompt (P prompts padded to 77, lengths around 20) through ``kv_index``; SDPA needs the
         prompts' keys/values gathered per image (``k[kv_index]``, timed) and a padding mask.

Implementations: ``sdpa+mask`` = ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` with the
boolean [N, 1, Lq, Lk] mask built from the lengths (and causality) as transformers builds it, mask
construction included; ``eager`` = ``reward_attention(..., backend="torch")`` (the reference);
``compile`` = ``torch.compile`` of the reference (not with --quick / --no-compile); and the fused
backends on CUDA (``triton``, ``flash_attn`` where installed; the Triton interpreter on a CPU is
not a performance path and is not timed).

Columns: the standard ones (bench/README.md) with ``bytes_moved`` = q, k, v read and out written at
their *real* lengths (the minimum), no copy-bandwidth ratio (attention is compute-bound), and
``x eager`` against the reference; the CSV adds ``speedup_vs_sdpa`` (also in the note) and
``gflops`` (4 D flops per allowed query-key pair of real tokens, per head, over the median time).
The issue's target: >= 2x sdpa+mask on the text case on a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import harness

OP = "reward_attention"
TEXT_MAX = 77
IMAGE_TOKENS = 257
FUSED = ("triton", "flash_attn")


@dataclass(frozen=True)
class Case:
    name: str  # text | image | cross
    n: int  # query sequences
    m: int  # key/value sequences
    heads: int
    head_dim: int
    lq: int
    lk: int
    causal: bool
    dtype: torch.dtype

    @property
    def shape(self) -> str:
        return f"q{self.n}x{self.heads}x{self.lq}x{self.head_dim}/kv{self.m}x{self.lk}"

    def __str__(self) -> str:
        return f"{self.name} {self.shape} {harness.dtype_name(self.dtype)}"


def default_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    return (torch.float16, torch.bfloat16) if device_type == "cuda" else (torch.float32,)


def cases(device_type: str, quick: bool = False, dtypes=None, sizes=None) -> list[Case]:
    """``sizes`` overrides the number of prompts P (text: N = P; image and cross: N = 8 P images)."""
    dts = tuple(dtypes) if dtypes else default_dtypes(device_type)
    if sizes:
        prompts = tuple(sizes)
    elif device_type == "cuda":
        prompts = (8,) if quick else (8, 64)
    else:
        prompts = (2,) if quick else (2, 8)
    out = []
    for dt in dts:
        for p in prompts:
            out.append(Case("text", p, p, 12, 64, TEXT_MAX, TEXT_MAX, True, dt))
            out.append(Case("image", 8 * p, 8 * p, 16, 64, IMAGE_TOKENS, IMAGE_TOKENS, False, dt))
            if not quick:
                out.append(Case("image-vit-h", 8 * p, 8 * p, 16, 80, IMAGE_TOKENS, IMAGE_TOKENS, False, dt))
            out.append(Case("cross", 8 * p, p, 8, 64, IMAGE_TOKENS, TEXT_MAX, False, dt))
    return out


def prompt_lengths(n: int, generator: torch.Generator) -> torch.Tensor:
    return (20 + 6 * torch.randn(n, generator=generator)).round().clamp(4, TEXT_MAX).long()


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=case.dtype)

    inp = {"q": rnd(case.n, case.heads, case.lq, case.head_dim), "k": rnd(case.m, case.heads, case.lk, case.head_dim),
           "v": rnd(case.m, case.heads, case.lk, case.head_dim), "q_lens": None, "kv_lens": None, "kv_index": None}
    if case.name == "text":
        lens = prompt_lengths(case.n, g).to(device)
        inp["q_lens"] = inp["kv_lens"] = lens
    elif case.name == "cross":
        inp["kv_lens"] = prompt_lengths(case.m, g).to(device)
        inp["kv_index"] = (torch.arange(case.n) // (case.n // case.m)).to(device)
    return inp


def real_pairs(case: Case, inp: dict) -> tuple[int, int, int]:
    """(allowed query-key pairs of real tokens per head, real query rows, real key rows read)."""
    ql = inp["q_lens"].cpu() if inp["q_lens"] is not None else torch.full((case.n,), case.lq)
    kl = inp["kv_lens"].cpu() if inp["kv_lens"] is not None else torch.full((case.m,), case.lk)
    idx = inp["kv_index"].cpu() if inp["kv_index"] is not None else torch.arange(case.n)
    klq = kl[idx]
    if case.causal:  # query i sees min(i + 1, kl) keys
        pairs = sum(int(torch.clamp(torch.arange(int(a)) + 1, max=int(b)).sum()) for a, b in zip(ql, klq))
    else:
        pairs = int((ql * klq).sum())
    return pairs, int(ql.sum()), int(kl.sum())


def bytes_moved(case: Case, inp: dict) -> int:
    e = torch.empty((), dtype=case.dtype).element_size()
    _, q_rows, k_rows = real_pairs(case, inp)
    return (2 * q_rows + 2 * k_rows) * case.heads * case.head_dim * e


def flops(case: Case, inp: dict) -> int:
    return 4 * real_pairs(case, inp)[0] * case.heads * case.head_dim


def sdpa_with_mask(inp: dict, causal: bool):
    """What transformers' sdpa path does for a padded batch: a boolean [N, 1, Lq, Lk] mask."""
    q, k, v = inp["q"], inp["k"], inp["v"]
    if inp["kv_index"] is not None:
        k, v = k[inp["kv_index"]], v[inp["kv_index"]]
    N, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
    mask = None
    if inp["kv_lens"] is not None:
        kl = inp["kv_lens"] if inp["kv_index"] is None else inp["kv_lens"][inp["kv_index"]]
        mask = (torch.arange(Lk, device=q.device)[None, :] < kl[:, None])[:, None, None, :].expand(N, 1, Lq, Lk)
    if causal:
        tri = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        mask = tri[None, None] if mask is None else mask & tri
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def make_fn(case: Case, impl: str, inp: dict, compiled=None):
    from diffrl.ops import reward_attention  # noqa: PLC0415

    kw = {n: inp[n] for n in ("q_lens", "kv_lens", "kv_index")}
    if impl == "sdpa+mask":
        return lambda: sdpa_with_mask(inp, case.causal)
    if impl == "compile":
        return lambda: compiled(inp["q"], inp["k"], inp["v"], causal=case.causal, **kw)
    backend = "torch" if impl == "eager" else impl
    return lambda: reward_attention(inp["q"], inp["k"], inp["v"], causal=case.causal, backend=backend,
                                    validate=False, **kw)


def check(case: Case, inp: dict, got: torch.Tensor, want: torch.Tensor) -> str:
    """'' when the real query rows agree (SDPA computes padded rows too; they are not compared)."""
    tol = 2e-3 if case.dtype == torch.float32 else 3e-2
    ql = inp["q_lens"]
    rows = torch.ones(case.n, case.lq, dtype=torch.bool, device=got.device) if ql is None else \
        torch.arange(case.lq, device=got.device)[None, :] < ql[:, None]
    g, w = got.transpose(1, 2)[rows].double(), want.transpose(1, 2)[rows].double()
    if torch.allclose(g, w, rtol=tol, atol=tol):
        return ""
    return f"MISMATCH max|diff|={(g - w).abs().max().item():.3g}"


def fused_backends(device: torch.device) -> list[str]:
    from diffrl.ops import _dispatch  # noqa: PLC0415

    if device.type != "cuda":
        return []  # the Triton interpreter is a correctness path, not a fast one
    return [b for b in FUSED if _dispatch.backend_status(b)[0] and _dispatch._runs_on(b, device)]


def bench_case(ctx, case: Case, impls: list[str]) -> list[dict]:
    """Rows for one case; every impl is checked against the reference on the real query rows."""
    from diffrl.ops.reference import reward_attention_reference  # noqa: PLC0415

    device = ctx.device
    inp = make_inputs(case, device)
    nbytes, fl = bytes_moved(case, inp), flops(case, inp)
    kw = {n: inp[n] for n in ("q_lens", "kv_lens", "kv_index")}
    with torch.no_grad():
        want = reward_attention_reference(inp["q"], inp["k"], inp["v"], causal=case.causal, **kw)
    measured = []  # (impl, timing, peak, note, extra)
    for impl in impls:
        extra = {}
        try:
            compiled = None
            if impl == "compile":
                torch._dynamo.reset()
                compiled = torch.compile(reward_attention_reference, dynamic=False, fullgraph=True)
                t0 = time.perf_counter()
                make_fn(case, impl, inp, compiled)()
                harness.sync(device)
                extra["compile_s"] = round(time.perf_counter() - t0, 2)
            fn = make_fn(case, impl, inp, compiled)
            with torch.no_grad():
                note = check(case, inp, fn(), want)
                timing = ctx.timing(fn)
                peak = harness.peak_memory_bytes(fn, device)
        except Exception as exc:  # noqa: BLE001 - record the failure, keep benchmarking the rest
            ctx.log(f"  {impl}: FAILED {type(exc).__name__}: {exc}")
            timing = harness.Timing(float("nan"), float("nan"), float("nan"), 0)
            peak, note = None, f"FAILED {type(exc).__name__}: {exc}"[:200]
        measured.append((impl, timing, peak, note, extra))
        ctx.log(f"  {impl:10s} {timing.median_ms:9.4f} ms  {fl / (timing.median_ms * 1e-3) / 1e9:8.1f} GFLOP/s  "
                f"peak {peak} B {note}")
    base = {impl: t.median_ms for impl, t, *_ in measured}
    rows = []
    for impl, timing, peak, note, extra in measured:
        ok = timing.reps > 0
        sp = round(base["sdpa+mask"] / timing.median_ms, 3) if ok and base.get("sdpa+mask") else None
        if sp and impl != "sdpa+mask":
            note = "; ".join(x for x in (note, f"x{sp:.2f} sdpa") if x)
        rows.append(harness.result_row(
            op=OP, case=case.name, shape=case.shape, dtype=case.dtype, batch=case.n, mode="fwd", impl=impl,
            timing=timing, bytes_moved=nbytes if ok else None, eager_ms=base.get("eager") if ok else None,
            peak_bytes=peak, note=note, speedup_vs_sdpa=sp,
            gflops=round(fl / (timing.median_ms * 1e-3) / 1e9, 3) if ok else None, **extra))
    return rows


def run(ctx) -> list[dict]:
    device = ctx.device
    fused = fused_backends(device)
    impls = ["sdpa+mask", "eager", *(["compile"] if ctx.compile and not ctx.quick else []), *fused]
    ctx.log(f"[{OP}] device {device}, fused backends: {', '.join(fused) or 'none'}")
    rows = []
    for case in cases(device.type, ctx.quick, ctx.dtypes, getattr(ctx, "sizes", None)):
        if case.dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            continue
        ctx.log(f"[{OP}] {case}")
        case_impls = [i for i in impls if not (i == "flash_attn" and case.dtype == torch.float32)]
        rows += bench_case(ctx, case, case_impls)
    return rows

"""The ``cupy`` backend: the CUDA kernels of csrc/ compiled at first use by NVRTC through CuPy.

For installs without nvcc (a plain ``pip install`` on a GPU box, a container without the CUDA
toolkit): the very same kernel headers that setup.py compiles with nvcc (``csrc/*_kernels.cuh`` and
the headers they include, which include no host or toolkit header under NVRTC) are compiled here,
one template instantiation at a time, when a launch first needs it. Launches go on torch's current
stream with torch-allocated memory (raw pointers), with the launch geometry of the nvcc host
launchers (``csrc/*.cu``), read from the same headers' constants. Results are bitwise those of the
``cuda`` backend: same source, same floating-point options.

Why not ``cupy.RawModule``: CuPy's cached compile path appends ``-ftz=true`` to every option list
(and NVRTC takes the last one), which flushes subnormals where nvcc does not. So this module drives
CuPy's NVRTC bindings (``cupy.cuda.nvrtc``) itself with nvcc's numerics and loads the binary with
``cupy.cuda.function.Module``.

Caches: compiled binaries per (GPU arch, kernel) in memory and on disk (``$DIFFRL_CACHE_DIR``, by
default ``~/.cache/diffrl``, under ``cupy/``; ``DIFFRL_CACHE_DIR=0`` turns the disk cache off), keyed by
the NVRTC version, the options and a digest of the sources; loaded functions per (device, kernel).

Nothing here imports cupy at import time: ``import diffrl`` never needs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np

# nvcc's numerics (setup.py): no FMA contraction; IEEE division, square root and subnormals, which
# are nvcc's defaults and spelled out because CuPy's own compile path differs (-ftz=true). (nvcc's
# --expt-relaxed-constexpr has no NVRTC spelling, and the kernels do not need it.)
NVRTC_OPTIONS = ("-std=c++17", "--fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true")

_DT = (0, 1, 2)  # diffrl::DType: float32, float16, bfloat16
_BOOL = (False, True)
# kernel -> (header that defines it, the values each template parameter may take)
KERNELS: dict[str, tuple[str, tuple[tuple, ...]]] = {
    "diffrl::sde::forward_kernel": ("sde_step_kernels.cuh", (_DT, _BOOL, _BOOL, _BOOL, _BOOL)),
    "diffrl::sde::finalize_kernel": ("sde_step_kernels.cuh", ()),
    "diffrl::sde::backward_kernel": ("sde_step_kernels.cuh", (_DT, _BOOL, _BOOL, _BOOL)),
    "diffrl::adv::group_kernel": ("advantages_kernels.cuh", ((0, 1, 2), ("float", "double"))),
    "diffrl::adv::win_rate_kernel": ("advantages_kernels.cuh", (("float", "double"),)),
    "diffrl::adv::loss_partial_kernel": ("advantages_kernels.cuh", ()),
    "diffrl::adv::loss_finalize_kernel": ("advantages_kernels.cuh", ()),
    "diffrl::adv::loss_backward_kernel": ("advantages_kernels.cuh", ()),
    "diffrl::dpo::dpo_partial_kernel": ("dpo_loss_kernels.cuh", (_DT,)),
    "diffrl::dpo::dpo_finalize_kernel": ("dpo_loss_kernels.cuh", ()),
    "diffrl::dpo::dpo_backward_kernel": ("dpo_loss_kernels.cuh", (_DT,)),
}


def instance(kernel: str, *targs) -> str:
    """The C++ name expression of one instantiation, e.g. ``forward_kernel<1, true, false, ...>``."""
    if not targs:
        return kernel
    spelled = (("true" if a else "false") if isinstance(a, (bool, np.bool_)) else str(a) for a in targs)
    return f"{kernel}<{', '.join(spelled)}>"


def name_expressions(header: str | None = None) -> list[str]:
    """Every instantiation the launchers may ask for (of one header's kernels, or all)."""
    out = []
    for kernel, (hdr, domains) in KERNELS.items():
        if header is None or hdr == header:
            out += [instance(kernel, *combo) for combo in itertools.product(*domains)]
    return out


def header_of(name: str) -> str:
    base = name.split("<", 1)[0].strip()
    if base not in KERNELS:
        raise KeyError(f"cupy backend: unknown kernel {base!r}; known: {sorted(KERNELS)}")
    return KERNELS[base][0]


# ----------------------------------------------------------------------------------------------
# sources


def source_dir() -> Path | None:
    """Where the kernel headers are: diffrl/_csrc in a wheel (setup.py copies them there), else the
    source tree's csrc/ (editable installs)."""
    pkg = Path(__file__).resolve().parent.parent  # .../diffrl
    for cand in (pkg / "_csrc", pkg.parent.parent / "csrc"):
        if all((cand / h).is_file() for h in {hdr for hdr, _ in KERNELS.values()}):
            return cand
    return None


_digest_cache: dict[Path, str] = {}


def _sources_digest(d: Path) -> str:
    # every header that a kernel file may include, by name and content
    if d not in _digest_cache:
        h = hashlib.sha256()
        for p in sorted(d.glob("*.h")) + sorted(d.glob("*.cuh")):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        _digest_cache[d] = h.hexdigest()
    return _digest_cache[d]


def program_source(header: str) -> str:
    """The NVRTC program text for the kernels of ``header``: the header itself, by include."""
    return f'#include "{header}"\n'


def compile_options(src_dir: Path, arch_option: str) -> list[str]:
    return [*NVRTC_OPTIONS, f"-I{src_dir}", arch_option]


_CONST_RE = re.compile(r"constexpr\s+(?:int|long long)\s+(k\w+)\s*=\s*(\d+)\s*;")
_const_cache: dict[tuple, dict[str, int]] = {}


def constants(*headers: str) -> dict[str, int]:
    """The integer constants (``constexpr int kName = 123;``) of these headers: the launch geometry
    shared with the nvcc host launchers, read from the one place it is written."""
    key = headers
    if key not in _const_cache:
        d = source_dir()
        if d is None:
            raise RuntimeError("cupy backend: the kernel sources are not in this install")
        out: dict[str, int] = {}
        for h in headers:
            for name, val in _CONST_RE.findall((d / h).read_text()):
                if out.setdefault(name, int(val)) != int(val):
                    raise RuntimeError(f"cupy backend: {name} has two values in {headers}")
        _const_cache[key] = out
    return _const_cache[key]


# ----------------------------------------------------------------------------------------------
# availability


def probe() -> tuple[bool, str]:
    """(usable here, reason when not). Never raises: a missing or broken CuPy, a machine without a
    driver or GPU, all become a reason."""
    if importlib.util.find_spec("cupy") is None:
        return False, "cupy is not installed (pip install 'diffrl[cupy]')"
    if source_dir() is None:
        return False, "the CUDA kernel sources (csrc/*_kernels.cuh) are not part of this install"
    try:
        import cupy  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - e.g. a CuPy built for another CUDA major version
        return False, f"cupy failed to import ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError: cudaErrorInsufficientDriver, NoDevice, ...
        return False, f"CuPy cannot use a CUDA device ({e})"
    if n == 0:
        return False, "no CUDA device visible to CuPy"
    try:
        cupy.cuda.nvrtc.getVersion()  # loads libnvrtc
    except Exception as e:  # noqa: BLE001 - libnvrtc not found
        return False, (f"CuPy cannot load NVRTC, CUDA's runtime compiler ({e}); install the CUDA toolkit or "
                       "pip install nvidia-cuda-nvrtc (CUDA 13; nvidia-cuda-nvrtc-cu12 for CUDA 12)")
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device (the cupy backend runs on torch's CUDA tensors and stream)"
    return True, ""


# ----------------------------------------------------------------------------------------------
# compile and load

_lock = threading.Lock()
_binaries: dict[tuple[str, str], tuple[bytes, str]] = {}  # (arch option, name) -> (cubin or ptx, lowered name)
_functions: dict[tuple[int, str], object] = {}  # (device, name) -> cupy.cuda.function.Function
_modules: list = []  # keeps the loaded modules alive
_streams: dict[tuple[int, int], object] = {}
_arch_options: dict[int, str] = {}


def arch_option(capability: tuple[int, int]) -> str:
    """``-arch=sm_XY`` (a cubin, runnable on any driver for that GPU) when NVRTC knows the GPU,
    else PTX for the newest architecture it knows below it (the driver finishes the compile)."""
    from cupy.cuda import nvrtc  # noqa: PLC0415

    cc = capability[0] * 10 + capability[1]
    supported = [a for a in nvrtc.getSupportedArchs() if a <= cc]
    if not supported:
        raise RuntimeError(f"cupy backend: this NVRTC supports no architecture up to sm_{cc}")
    return f"-arch=sm_{cc}" if supported[-1] == cc else f"-arch=compute_{supported[-1]}"


def _cache_dir() -> Path | None:
    env = os.environ.get("DIFFRL_CACHE_DIR")
    if env is not None and env.strip() in ("", "0"):
        return None
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffrl"
    return root / "cupy"


def compile_kernel(name: str, arch_opt: str) -> tuple[bytes, str]:
    """(binary, lowered name) of one instantiation for one ``-arch=`` option; needs NVRTC, no GPU."""
    from cupy.cuda import nvrtc  # noqa: PLC0415

    key = (arch_opt, name)
    hit = _binaries.get(key)
    if hit is not None:
        return hit
    d = source_dir()
    if d is None:
        raise RuntimeError("cupy backend: the kernel sources are not in this install")
    header = header_of(name)
    options = compile_options(d, arch_opt)
    digest = hashlib.sha256(repr((nvrtc.getVersion(), options[:-2], arch_opt, name, _sources_digest(d))).encode())
    cache = _cache_dir()
    path = None if cache is None else cache / f"{digest.hexdigest()}.bin"
    if path is not None and path.is_file():
        try:
            lowered, _, binary = path.read_bytes().partition(b"\n")
            if lowered and binary:
                _binaries[key] = (binary, lowered.decode())
                return _binaries[key]
        except OSError:
            pass
    prog = nvrtc.createProgram(program_source(header), f"diffrl_{header}.cu", [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"cupy backend: NVRTC failed to compile {name} ({' '.join(options)}):\n"
                               f"{nvrtc.getProgramLog(prog)}") from e
        lowered = nvrtc.getLoweredName(prog, name)
        binary = nvrtc.getCUBIN(prog) if arch_opt.startswith("-arch=sm_") else nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    _binaries[key] = (binary, lowered)
    if path is not None:
        try:  # write then rename: concurrent processes never read half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
                f.write(lowered.encode() + b"\n" + binary)
            os.replace(f.name, path)
        except OSError:
            pass
    return _binaries[key]


def _function(device: int, name: str):
    fn = _functions.get((device, name))
    if fn is not None:
        return fn
    import cupy  # noqa: PLC0415
    import torch  # noqa: PLC0415

    with _lock:
        fn = _functions.get((device, name))
        if fn is None:
            if device not in _arch_options:
                _arch_options[device] = arch_option(torch.cuda.get_device_capability(device))
            binary, lowered = compile_kernel(name, _arch_options[device])
            with cupy.cuda.Device(device):  # a module belongs to the context it is loaded in
                mod = cupy.cuda.function.Module()
                mod.load(binary)
                fn = mod.get_function(lowered)
            _modules.append(mod)
            _functions[(device, name)] = fn
    return fn


class _TorchStream:
    """A raw stream handle in the CUDA stream protocol (what cupy.cuda.Stream.from_external takes)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _stream(device: int, ptr: int):
    s = _streams.get((device, ptr))
    if s is None:
        import cupy  # noqa: PLC0415

        if ptr == 0:
            s = cupy.cuda.Stream.null
        elif hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14
            s = cupy.cuda.Stream.from_external(_TorchStream(ptr))
        else:
            s = cupy.cuda.ExternalStream(ptr, device)
        _streams[(device, ptr)] = s
    return s


def launch(kernel_name: str, grid: int, block: int, args: tuple, stream: int, shared_mem: int = 0) -> None:
    """Launch one instantiation (compiled on first use) on the current torch device, on the raw
    stream handle ``stream``. ``args`` are numpy scalars of the kernel's parameter types (``ptr``,
    ``i64``, ``i32``, ``f32``, ``f64`` below), in order."""
    import cupy  # noqa: PLC0415
    import torch  # noqa: PLC0415

    if grid <= 0:
        return
    device = torch.cuda.current_device()
    fn = _function(device, kernel_name)
    with cupy.cuda.Device(device):
        fn((int(grid),), (int(block),), args, shared_mem=int(shared_mem), stream=_stream(device, int(stream)))


# kernel argument types: CuPy passes numpy scalars by their exact size
def ptr(p: int) -> np.uint64:
    return np.uint64(p)


i64, i32, f32, f64 = np.int64, np.int32, np.float32, np.float64


# ----------------------------------------------------------------------------------------------
# the launchers: the pointer-level functions of diffrl.ops._native_backend's ``cupy`` backend. Each
# takes the keyword arguments of the diffrl._C binding of the same name + "_cuda" (the fields of
# the C++ argument struct) and launches what csrc/<op>.cu launches: the same kernels, the same
# geometry, on the given stream.

_MODE_EACH = 1  # adv::kEach in csrc/advantages.h


def sde_step_forward(*, dtype, B, D, x, v, v_uncond, w, noise, prev_in, v_ref, v_ref_uncond, a, c, s, prev_out,
                     mean_out, log_prob, kl, workspace, reduce_sum, stream):
    if B == 0 or D == 0:
        return
    k = constants("sde_step.h", "sde_step_kernels.cuh")
    nch = -(-D // k["kChunk"])
    tasks = B * nch
    part_sq, part_kl = workspace, workspace + 4 * tasks  # two float32 arrays of `tasks`
    name = instance("diffrl::sde::forward_kernel", dtype, v_uncond != 0, noise != 0, v_ref != 0, mean_out != 0)
    P = ptr
    launch(name, tasks, k["kThreads"],
           (P(x), P(v), P(v_uncond), f32(w), P(noise), P(prev_in), P(v_ref), P(v_ref_uncond), P(a), P(c), P(s),
            P(prev_out), P(mean_out), P(part_sq), P(part_kl), i64(D), i64(nch)), stream)
    nt = k["kFinalizeThreads"]
    launch("diffrl::sde::finalize_kernel", -(-B // nt), nt,
           (P(part_sq), P(part_kl if v_ref else 0), P(s), P(log_prob), P(kl), i64(B), i64(D), i64(nch),
            i32(reduce_sum)), stream)


def sde_step_backward(*, dtype, B, D, x, v, v_uncond, w, prev, v_ref, v_ref_uncond, a, c, s, g_log_prob, g_kl,
                      g_prev, g_mean, sampling, reduce_sum, g_x, g_v, g_v_uncond, g_prev_in, g_v_ref, g_v_ref_uncond,
                      stream):
    if B == 0 or D == 0:
        return
    k = constants("sde_step.h", "sde_step_kernels.cuh")
    nch = -(-D // k["kChunk"])
    name = instance("diffrl::sde::backward_kernel", dtype, v_uncond != 0, bool(sampling), v_ref != 0)
    P = ptr
    launch(name, B * nch, k["kThreads"],
           (P(x), P(v), P(v_uncond), f32(w), P(prev), P(v_ref), P(v_ref_uncond), P(a), P(c), P(s), P(g_log_prob),
            P(g_kl), P(g_prev), P(g_mean), P(g_x), P(g_v), P(g_v_uncond), P(g_prev_in), P(g_v_ref),
            P(g_v_ref_uncond), i64(D), i64(nch), i32(reduce_sum)), stream)


def grpo_loss_forward(*, N, adv_div, log_prob, old_log_prob, adv, kl, lo, hi, kl_coef, loss, stats, workspace,
                      stream):
    if N == 0:
        return
    k = constants("advantages.h", "advantages_kernels.cuh")
    nch = -(-N // k["kLossChunk"])
    P = ptr
    launch("diffrl::adv::loss_partial_kernel", nch, k["kLossThreads"],
           (P(log_prob), P(old_log_prob), P(adv), i64(adv_div), P(kl), i64(N), f32(lo), f32(hi), P(workspace)),
           stream)
    launch("diffrl::adv::loss_finalize_kernel", 1, k["kLossThreads"],
           (P(workspace), i64(nch), i64(N), f32(kl_coef), P(loss), P(stats)), stream)


def grpo_loss_backward(*, N, adv_div, log_prob, old_log_prob, adv, lo, hi, g_loss, g_log_prob, stream):
    if N == 0:
        return
    nt = constants("advantages_kernels.cuh")["kLossThreads"]
    P = ptr
    launch("diffrl::adv::loss_backward_kernel", -(-N // nt), nt,
           (P(log_prob), P(old_log_prob), P(adv), i64(adv_div), i64(N), f32(lo), f32(hi), P(g_loss), P(g_log_prob)),
           stream)


def group_advantages(*, vals_double, B, K, vals, weights, order, sorted_ids, global_std, step_weights, T, mode,
                     std_mode, eps, clip, has_clip, out, stream):
    if B == 0:
        return
    if B > 0x7FFFFFFF:
        raise ValueError("group_advantages: more than 2^31 - 1 rows")
    smem = 2 * K * 8 if mode == _MODE_EACH else 0  # (mean, denom) per head, float64
    if smem > 48 * 1024:
        raise ValueError("group_advantages: too many reward heads for normalize_each")
    name = instance("diffrl::adv::group_kernel", mode, "double" if vals_double else "float")
    P = ptr
    launch(name, B, constants("advantages_kernels.cuh")["kGroupThreads"],
           (P(vals), i64(K), P(weights), P(order), P(sorted_ids), i64(B), P(global_std), P(step_weights), i64(T),
            i32(std_mode), f64(eps), f64(clip), i32(has_clip), P(out)), stream, shared_mem=smem)


def win_rate(*, vals_double, B, vals, order, sorted_ids, out, stream):
    if B == 0:
        return
    nt = constants("advantages_kernels.cuh")["kWinThreads"]
    name = instance("diffrl::adv::win_rate_kernel", "double" if vals_double else "float")
    P = ptr
    launch(name, -(-B // nt), nt, (P(vals), P(order), P(sorted_ids), i64(B), P(out)), stream)


def dpo_loss_forward(*, dtype, B, D, policy_w, policy_l, ref_w, ref_l, target_w, target_l, weights, beta, loss,
                     stats, coef, workspace, stream):
    if B == 0 or D == 0:
        return
    k = constants("dpo_loss.h", "dpo_loss_kernels.cuh")
    nch = -(-D // k["kDpoChunk"])
    P = ptr
    launch(instance("diffrl::dpo::dpo_partial_kernel", dtype), B * nch, k["kDpoThreads"],
           (P(policy_w), P(policy_l), P(ref_w), P(ref_l), P(target_w), P(target_l), i64(D), i64(nch), P(workspace)),
           stream)
    launch("diffrl::dpo::dpo_finalize_kernel", 1, k["kDpoThreads"],
           (P(workspace), P(weights), i64(B), i64(D), i64(nch), f64(beta), P(loss), P(stats), P(coef)), stream)


def dpo_loss_backward(*, dtype, B, D, policy_w, policy_l, target_w, target_l, coef, g_loss, g_policy_w, g_policy_l,
                      stream):
    if B == 0 or D == 0:
        return
    nt = constants("dpo_loss_kernels.cuh")["kDpoBackwardThreads"]
    nblk = -(-D // nt)
    P = ptr
    launch(instance("diffrl::dpo::dpo_backward_kernel", dtype), B * nblk, nt,
           (P(policy_w), P(policy_l), P(target_w), P(target_l), P(coef), P(g_loss), i64(D), i64(nblk),
            P(g_policy_w), P(g_policy_l)), stream)

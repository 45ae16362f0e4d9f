"""The cupy backend (the CUDA kernels compiled at run time by NVRTC) and array interop.

Without a GPU: the backend reports itself unavailable with a clear reason (with CuPy absent, present
but without a driver, or broken); the kernel headers include nothing NVRTC cannot see; NVRTC itself
(found through ctypes, no CuPy needed) compiles every instantiation the launchers use, with the
backend's own options and name expressions, into the same floating-point instructions as nvcc;
NumPy arrays and other DLPack producers round-trip through the ops without copies.
With a GPU (marked): the cupy backend against the reference and bitwise against the nvcc build.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import site
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import diffrl
from diffrl import interop
from diffrl.ops import _cupy_backend as cb
from diffrl.ops import _dispatch
from diffrl.ops import _native_backend as nb
from diffrl.ops import advantages as adv_mod
from diffrl.ops import dpo as dpo_mod
from diffrl.ops import loss as loss_mod
from diffrl.ops import sde as sde_mod

from conftest import HAS_GPU, available

SRC = cb.source_dir()
HEADERS = ("sde_step_kernels.cuh", "advantages_kernels.cuh", "dpo_loss_kernels.cuh")


# ----------------------------------------------------------------------------------------------
# availability: never an exception, always a reason


def test_probe_without_cupy(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda n, *a: None if n == "cupy" else real(n, *a))
    assert cb.probe() == (False, "cupy is not installed (pip install 'diffrl[cupy]')")


def _fake_cupy(monkeypatch, get_device_count):
    # a stand-in for CuPy as it behaves on a machine without a driver (CI need not install CuPy)
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count),
                                      nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda n, *a: object())


def test_probe_device_error_is_a_reason(monkeypatch):
    def no_driver():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version")

    _fake_cupy(monkeypatch, no_driver)
    ok, reason = cb.probe()
    assert not ok and reason.startswith("CuPy cannot use a CUDA device (cudaErrorInsufficientDriver")
    _fake_cupy(monkeypatch, lambda: 0)
    assert cb.probe() == (False, "no CUDA device visible to CuPy")


def test_probe_broken_cupy_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    monkeypatch.setattr(cb.importlib.util, "find_spec", lambda n, *a: object())
    ok, reason = cb.probe()
    assert not ok and reason.startswith("cupy failed to import (") and "halted" in reason


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU answer")
def test_unavailable_here_with_reason(capsys):
    ok, reason = _dispatch.backend_status("cupy")
    assert not ok
    if importlib.util.find_spec("cupy") is None:
        assert reason == "cupy is not installed (pip install 'diffrl[cupy]')"
    else:  # installed, no driver: CuPy imports and every call raises
        assert reason.startswith("CuPy cannot use a CUDA device (cudaError"), reason
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend 'cupy' is not available here: " + re.escape(reason)):
        diffrl.sde_step(x, x, (0.9, -0.1, 0.3), noise=x, backend="cupy")
    assert _dispatch._resolve("sde_step", sde_mod.IMPLEMENTED, "auto", torch.device("cuda")) != "cupy"
    from diffrl import cli

    assert cli.main(["info"]) == 0
    assert f"  cupy    unavailable: {reason}\n" in capsys.readouterr().out


def test_ops_implement_cupy():
    for mod in (sde_mod, adv_mod, loss_mod, dpo_mod):
        assert "cupy" in mod.IMPLEMENTED


# ----------------------------------------------------------------------------------------------
# the sources: one set of headers for nvcc and NVRTC, geometry written once


def test_sources_found_and_constants():
    assert SRC is not None and all((SRC / h).is_file() for h in HEADERS)
    k = cb.constants("sde_step.h", "sde_step_kernels.cuh")
    assert k["kChunk"] == 4096 and k["kThreads"] * 16 == k["kChunk"] and k["kFinalizeThreads"] > 0
    k = cb.constants("advantages.h", "advantages_kernels.cuh")
    assert (k["kLossChunk"], k["kLossParts"]) == (nb.LOSS_CHUNK, nb.LOSS_PARTS)
    assert {"kGroupThreads", "kWinThreads", "kLossThreads"} <= set(k)
    k = cb.constants("dpo_loss.h", "dpo_loss_kernels.cuh")
    assert (k["kDpoChunk"], k["kDpoParts"]) == (nb.DPO_CHUNK, nb.DPO_PARTS)
    assert {"kDpoThreads", "kDpoBackwardThreads"} <= set(k)


def test_host_launch_geometry_uses_the_shared_constants():
    # the nvcc launchers take block sizes from the headers too (the cupy launchers read them there):
    # no number in a launch configuration but the loss finalize's single block and the stream's 0
    for cu in ("sde_step.cu", "advantages.cu", "dpo_loss.cu"):
        text = (SRC / cu).read_text()
        configs = re.findall(r"<<<(.*?)>>>", text, re.S)
        assert configs
        for cfg in configs:
            assert set(re.findall(r"\b\d+\b", cfg)) <= {"0", "1"}, (cu, cfg)


def test_kernel_headers_include_no_system_header():
    # under NVRTC (__CUDACC_RTC__) the kernel headers must reach no <...> header at all: NVRTC has no
    # host headers, and the cupy backend must work with libnvrtc alone (no toolkit headers)
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ preprocessor")
    for h in HEADERS:
        r = subprocess.run([cxx, "-E", "-x", "c++", "-nostdinc", "-D__CUDACC_RTC__", "-D__CUDACC__",
                            "-D__CUDA_ARCH__=800", f"-I{SRC}", str(SRC / h)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


def test_name_expressions():
    names = cb.name_expressions()
    assert len(names) == len(set(names)) == 48 + 1 + 24 + 6 + 2 + 3 + 3 + 1 + 3
    assert cb.instance("diffrl::sde::forward_kernel", 2, True, False, np.bool_(True), False) == \
        "diffrl::sde::forward_kernel<2, true, false, true, false>"
    assert cb.header_of("diffrl::adv::group_kernel<1, double>") == "advantages_kernels.cuh"
    with pytest.raises(KeyError):
        cb.header_of("diffrl::sde::nope")


# ----------------------------------------------------------------------------------------------
# NVRTC through ctypes: the real compile step, without CuPy and without a GPU


class NVRTC:
    def __init__(self, path: Path):
        for b in sorted(path.parent.glob("libnvrtc-builtins*.so*")):  # dlopen()ed by name by libnvrtc
            if ".alt." not in b.name:
                ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
                break
        self.lib = lib = ctypes.CDLL(str(path))
        P, S, SS = ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)
        sigs = {"nvrtcVersion": [ctypes.POINTER(ctypes.c_int)] * 2,
                "nvrtcCreateProgram": [ctypes.POINTER(P), S, S, ctypes.c_int, SS, SS],
                "nvrtcAddNameExpression": [P, S], "nvrtcCompileProgram": [P, ctypes.c_int, SS],
                "nvrtcGetLoweredName": [P, S, SS], "nvrtcGetPTXSize": [P, ctypes.POINTER(ctypes.c_size_t)],
                "nvrtcGetPTX": [P, ctypes.c_char_p], "nvrtcGetProgramLogSize": [P, ctypes.POINTER(ctypes.c_size_t)],
                "nvrtcGetProgramLog": [P, ctypes.c_char_p], "nvrtcDestroyProgram": [ctypes.POINTER(P)]}
        for fn, args in sigs.items():
            getattr(lib, fn).argtypes = args
            getattr(lib, fn).restype = ctypes.c_int
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]

    def _check(self, r):
        if r != 0:
            raise RuntimeError(self.lib.nvrtcGetErrorString(r).decode())

    def version(self):
        a, b = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)))
        return a.value, b.value

    def compile(self, source: str, options: list[str], names: list[str]) -> tuple[str, dict[str, str]]:
        lib, prog = self.lib, ctypes.c_void_p()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"diffrl.cu", 0, None, None))
        try:
            for n in names:
                self._check(lib.nvrtcAddNameExpression(prog, n.encode()))
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            r = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, log))
            assert r == 0, f"NVRTC failed ({' '.join(options)}):\n{log.value.decode()}"
            lowered = {}
            for n in names:
                out = ctypes.c_char_p()
                self._check(lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)))
                lowered[n] = out.value.decode()
            self._check(lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetPTX(prog, ptx))
            return ptx.value.decode(), lowered
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _find_libnvrtc() -> Path | None:
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            dirs += [Path(os.environ[var]) / "lib64", Path(os.environ[var]) / "lib"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent.parent / "lib64")
    dirs += [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib")]
    # the nvidia-cuda-nvrtc wheel (what CuPy uses where no toolkit is installed)
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += [Path(sp) / "nvidia" / "cu13" / "lib", Path(sp) / "nvidia" / "cuda_nvrtc" / "lib"]
    for d in dirs:
        for p in sorted(d.glob("libnvrtc.so*")):
            if ".alt." not in p.name:
                return p
    found = ctypes.util.find_library("nvrtc")
    return Path(found) if found else None


@pytest.fixture(scope="module")
def nvrtc():
    path = _find_libnvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (CUDA toolkit or pip install nvidia-cuda-nvrtc)")
    return NVRTC(path)


def _entries(ptx: str) -> dict[str, str]:
    """kernel (mangled name) -> its PTX body"""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\n}", ptx, re.S):
        out[m.group(1)] = m.group(2)
    return out


_FLOAT_OP = re.compile(r"^\s*(?:\{\s*)?(?:@!?%p\d+\s+)?([a-z][\w.]*\.(?:f16|bf16|f32|f64)\b[\w.]*)", re.M)


def _float_ops(body: str) -> list[str]:
    # the floating-point instructions in program order (register names and addressing aside)
    return _FLOAT_OP.findall(body)


# compute_80: every instantiation; compute_90: each kernel in every dtype, to keep the suite quick
def _compile_set(arch: str, header: str) -> list[str]:
    names = cb.name_expressions(header)
    if arch == "80":
        return names
    return [n for i, n in enumerate(names) if "<" not in n or i % 5 == 0 or n.endswith("true, true>")]


@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("header", HEADERS)
def test_nvrtc_compiles_the_kernels(nvrtc, arch, header):
    names = _compile_set(arch, header)
    ptx, lowered = nvrtc.compile(cb.program_source(header), cb.compile_options(SRC, f"-arch=compute_{arch}"), names)
    assert f".target sm_{arch}" in ptx
    entries = _entries(ptx)
    assert set(lowered.values()) <= set(entries), "a name expression has no kernel"
    for name, mangled in lowered.items():
        ops = _float_ops(entries[mangled])
        # -ftz=false: no flushed single-precision arithmetic (the ex2.approx.ftz inside expf, like the
        # approximate float64 reciprocal inside log, is libdevice's own choice)
        assert not [o for o in ops if ".ftz.f32" in o and not o.startswith("ex2.approx")], name
        if name.startswith(("diffrl::sde::forward_kernel", "diffrl::sde::backward_kernel")):
            assert not [o for o in ops if o.startswith("fma")], f"{name}: --fmad=false must keep a*b+c unfused"


def _nvcc_release() -> tuple[int, int] | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    m = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return (int(m.group(1)), int(m.group(2))) if m else None


PTX_COMPARED = [
    "diffrl::sde::forward_kernel<0, false, true, false, true>",
    "diffrl::sde::forward_kernel<1, true, false, true, true>",
    "diffrl::sde::forward_kernel<2, true, true, true, false>",
    "diffrl::sde::backward_kernel<1, true, false, true>",
    "diffrl::sde::backward_kernel<2, false, true, false>",
    "diffrl::sde::finalize_kernel",
    "diffrl::adv::group_kernel<1, double>",
    "diffrl::adv::group_kernel<2, float>",
    "diffrl::adv::win_rate_kernel<double>",
    "diffrl::adv::loss_partial_kernel",
    "diffrl::adv::loss_finalize_kernel",
    "diffrl::adv::loss_backward_kernel",
    "diffrl::dpo::dpo_partial_kernel<2>",
    "diffrl::dpo::dpo_finalize_kernel",
    "diffrl::dpo::dpo_backward_kernel<1>",
]


def test_nvrtc_matches_nvcc(nvrtc, tmp_path):
    """The backend's NVRTC compile and setup.py's nvcc compile of the same instantiations give the
    same floating-point instructions in the same order (so the same bits, launched alike)."""
    rel = _nvcc_release()
    if rel is None:
        pytest.skip("nvcc not found")
    if rel != nvrtc.version():
        pytest.skip(f"nvcc {rel} and NVRTC {nvrtc.version()} are different releases")
    arch = "90"
    cu = tmp_path / "inst.cu"
    cu.write_text("".join(f'#include "{h}"\n' for h in HEADERS)
                  + "void* diffrl_keep[] = {" + ", ".join(f"(void*)&{n}" for n in PTX_COMPARED) + "};\n")
    # setup.py's device flags
    subprocess.run([shutil.which("nvcc"), "-std=c++17", "-O3", "--fmad=false", "--expt-relaxed-constexpr",
                    f"-I{SRC}", "-ptx", f"-arch=compute_{arch}", str(cu), "-o", str(tmp_path / "nvcc.ptx")],
                   check=True, capture_output=True)
    by_nvcc = _entries((tmp_path / "nvcc.ptx").read_text())
    for h in HEADERS:
        names = [n for n in PTX_COMPARED if cb.header_of(n) == h]
        ptx, lowered = nvrtc.compile(cb.program_source(h), cb.compile_options(SRC, f"-arch=compute_{arch}"), names)
        by_rtc = _entries(ptx)
        for n in names:
            a, b = _float_ops(by_nvcc[lowered[n]]), _float_ops(by_rtc[lowered[n]])
            assert a and a == b, n


_PTX_PARAM = {np.uint64: "u64", np.int64: "u64", np.int32: "u32", np.float32: "f32", np.float64: "f64"}


def _record_launches(monkeypatch) -> list[tuple]:
    calls = []
    monkeypatch.setattr(cb, "launch", lambda name, grid, block, args, stream, shared_mem=0:
                        calls.append((name, grid, block, args, stream, shared_mem)))
    # fake device addresses (nothing is launched): every argument the C++ bindings would get, by name
    p = iter(range(0x1000, 0x100000, 0x100))
    B, D = 3, 9000
    for dt, guid, smp, kl, mean in [(0, False, True, False, True), (1, True, False, True, False),
                                    (2, True, True, True, True)]:
        cb.sde_step_forward(dtype=dt, B=B, D=D, x=next(p), v=next(p), v_uncond=next(p) if guid else 0, w=4.5,
                            noise=next(p) if smp else 0, prev_in=0 if smp else next(p), v_ref=next(p) if kl else 0,
                            v_ref_uncond=next(p) if kl and guid else 0, a=next(p), c=next(p), s=next(p),
                            prev_out=next(p) if smp else 0, mean_out=next(p) if mean else 0, log_prob=next(p),
                            kl=next(p) if kl else 0, workspace=next(p), reduce_sum=1, stream=7)
        cb.sde_step_backward(dtype=dt, B=B, D=D, x=next(p), v=next(p), v_uncond=next(p) if guid else 0, w=4.5,
                             prev=next(p), v_ref=next(p) if kl else 0, v_ref_uncond=next(p) if kl and guid else 0,
                             a=next(p), c=next(p), s=next(p), g_log_prob=next(p), g_kl=next(p) if kl else 0, g_prev=0,
                             g_mean=next(p), sampling=int(smp), reduce_sum=0, g_x=next(p), g_v=next(p),
                             g_v_uncond=next(p) if guid else 0, g_prev_in=0, g_v_ref=next(p) if kl else 0,
                             g_v_ref_uncond=next(p) if kl and guid else 0, stream=7)
    for mode, double in [(0, 1), (1, 0), (2, 1)]:
        cb.group_advantages(vals_double=double, B=1000, K=5, vals=next(p), weights=next(p), order=next(p),
                            sorted_ids=next(p), global_std=0, step_weights=0, T=3, mode=mode, std_mode=1, eps=1e-4,
                            clip=-1.0, has_clip=0, out=next(p), stream=7)
    cb.win_rate(vals_double=1, B=1000, vals=next(p), order=next(p), sorted_ids=next(p), out=next(p), stream=7)
    cb.grpo_loss_forward(N=10000, adv_div=4, log_prob=next(p), old_log_prob=next(p), adv=next(p), kl=next(p), lo=0.8,
                         hi=1.28, kl_coef=0.01, loss=next(p), stats=next(p), workspace=next(p), stream=7)
    cb.grpo_loss_backward(N=10000, adv_div=4, log_prob=next(p), old_log_prob=next(p), adv=next(p), lo=0.8, hi=1.28,
                          g_loss=next(p), g_log_prob=next(p), stream=7)
    for dt, weighted, want_l in [(0, True, True), (1, False, False), (2, True, True)]:
        cb.dpo_loss_forward(dtype=dt, B=B, D=D, policy_w=next(p), policy_l=next(p), ref_w=next(p), ref_l=next(p),
                            target_w=next(p), target_l=next(p), weights=next(p) if weighted else 0, beta=5000.0,
                            loss=next(p), stats=next(p), coef=next(p), workspace=next(p), stream=7)
        cb.dpo_loss_backward(dtype=dt, B=B, D=D, policy_w=next(p), policy_l=next(p), target_w=next(p),
                             target_l=next(p), coef=next(p), g_loss=next(p), g_policy_w=next(p),
                             g_policy_l=next(p) if want_l else 0, stream=7)
    return calls


def test_cupy_launchers_match_the_kernels(nvrtc, monkeypatch):
    """Each launch of the cupy launchers names an instantiation that exists, passes arguments of
    the kernel's parameter types in order (checked against the compiled PTX), and uses the nvcc
    launchers' geometry."""
    calls = _record_launches(monkeypatch)
    assert all(c[4] == 7 for c in calls)  # the caller's stream
    for h in HEADERS:
        names = sorted({c[0] for c in calls if cb.header_of(c[0]) == h})
        assert set(names) <= set(cb.name_expressions(h))
        ptx, lowered = nvrtc.compile(cb.program_source(h), cb.compile_options(SRC, "-arch=compute_80"), names)
        entries = _entries(ptx)
        for name, _, _, args, _, _ in (c for c in calls if cb.header_of(c[0]) == h):
            mangled = lowered[name]
            params = re.findall(r"\.param\s+\.(\w+)\s+" + mangled + r"_param_\d+", entries[mangled])
            assert [_PTX_PARAM[type(a)] for a in args] == params, name
    k = cb.constants("sde_step.h", "sde_step_kernels.cuh")
    fwd = [c for c in calls if c[0].startswith("diffrl::sde::forward_kernel")]
    fin = [c for c in calls if c[0] == "diffrl::sde::finalize_kernel"]
    assert {(c[1], c[2]) for c in fwd} == {(3 * 3, k["kThreads"])}  # B * ceil(9000 / 4096) blocks
    assert {(c[1], c[2]) for c in fin} == {(1, k["kFinalizeThreads"])}
    grp = [c for c in calls if c[0].startswith("diffrl::adv::group_kernel")]
    assert [c[5] for c in grp] == [0, 2 * 5 * 8, 0]  # normalize_each: (mean, denom) per head in shared memory
    assert {c[1] for c in grp} == {1000}
    part = next(c for c in calls if c[0] == "diffrl::adv::loss_partial_kernel")
    assert part[1:3] == (3, 256)
    k = cb.constants("dpo_loss.h", "dpo_loss_kernels.cuh")
    dpo = [c for c in calls if c[0].startswith("diffrl::dpo::dpo_partial_kernel")]
    assert {(c[1], c[2]) for c in dpo} == {(3 * 3, k["kDpoThreads"])}  # B * ceil(9000 / 4096) blocks
    dpo_bwd = [c for c in calls if c[0].startswith("diffrl::dpo::dpo_backward_kernel")]
    assert {(c[1], c[2]) for c in dpo_bwd} == {(3 * 36, k["kDpoBackwardThreads"])}  # B * ceil(9000 / 256)


# ----------------------------------------------------------------------------------------------
# the backend's own compile step through CuPy's NVRTC bindings (works without a GPU)


@pytest.fixture
def cupy_nvrtc():
    pytest.importorskip("cupy")
    from cupy.cuda import nvrtc as cn

    try:
        cn.getVersion()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"CuPy cannot load NVRTC: {e}")
    return cn


def test_backend_compile_and_disk_cache(cupy_nvrtc, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFRL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cb, "_binaries", {})
    name = "diffrl::sde::forward_kernel<1, true, false, true, true>"
    binary, lowered = cb.compile_kernel(name, "-arch=sm_90")
    assert binary[:4] == b"\x7fELF" and lowered.startswith("_ZN6diffrl3sde14forward_kernel")
    files = list((tmp_path / "cupy").glob("*.bin"))
    assert len(files) == 1
    monkeypatch.setattr(cb, "_binaries", {})
    assert cb.compile_kernel(name, "-arch=sm_90") == (binary, lowered)  # from the disk cache
    ptx, _ = cb.compile_kernel(name, "-arch=compute_80")
    assert b".target sm_80" in ptx


def test_arch_option(cupy_nvrtc):
    known = cupy_nvrtc.getSupportedArchs()
    assert cb.arch_option((9, 0)) == "-arch=sm_90"
    assert cb.arch_option((8, 0)) == "-arch=sm_80"
    assert cb.arch_option((99, 9)) == f"-arch=compute_{max(known)}"  # newer than NVRTC: PTX for the driver


# ----------------------------------------------------------------------------------------------
# interop on the CPU: NumPy and other DLPack producers in, the same kind out, no copies


def _np(*shape, dtype=np.float32):
    return torch.randn(*shape, dtype=torch.float64).numpy().astype(dtype)


def test_to_torch_and_back_share_memory():
    a = _np(3, 4)
    t = interop.to_torch(a)
    assert t.data_ptr() == a.ctypes.data
    t[0, 0] = 42.0
    assert a[0, 0] == 42.0
    b = interop.from_torch(t, a)
    assert isinstance(b, np.ndarray) and np.shares_memory(a, b)
    assert interop.from_torch(t, torch.zeros(1)) is t
    assert interop.to_torch(t) is t


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_sde_step_numpy_round_trip(backend):
    if not available(backend):
        pytest.skip(f"{backend} not available")
    x, v, vu, n = (_np(3, 4, 5) for _ in range(4))
    a, c, s = (np.array(0.9, dtype=np.float32), -0.2, (0.2 + np.random.rand(3)).astype(np.float32))
    out = diffrl.sde_step(x, v, (a, c, s), uncond_output=vu, guidance_scale=3.0, noise=n, backend=backend)
    assert all(isinstance(o, np.ndarray) for o in (out.prev_sample, out.log_prob, out.mean)) and out.kl is None
    T = torch.from_numpy
    ref = diffrl.sde_step(T(x), T(v), (T(a), c, T(s)), uncond_output=T(vu), guidance_scale=3.0,
                          noise=T(n), backend=backend)
    for o, r in ((out.prev_sample, ref.prev_sample), (out.log_prob, ref.log_prob), (out.mean, ref.mean)):
        assert torch.equal(T(o), r)
    # scoring: the given prev_sample comes back as the very same memory
    score = diffrl.sde_step(x, v, (a, c, s), uncond_output=vu, guidance_scale=3.0, prev_sample=out.prev_sample,
                            backend=backend)
    assert np.shares_memory(score.prev_sample, out.prev_sample)
    assert np.array_equal(score.log_prob, out.log_prob)


def test_group_advantages_win_rate_and_loss_numpy():
    r = _np(12, dtype=np.float64)
    ids = np.array([0, 1, 2] * 4, dtype=np.int64)
    T = torch.from_numpy
    out = diffrl.group_advantages(r, ids)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert torch.equal(T(out), diffrl.group_advantages(T(r), T(ids)))
    rk, w = _np(12, 3), np.array([0.5, 1.0, 2.0])
    out = diffrl.group_advantages(rk, ids, reward_weights=w, combine="normalize_each")
    assert torch.equal(T(out), diffrl.group_advantages(T(rk), T(ids), reward_weights=T(w), combine="normalize_each"))
    wr = diffrl.win_rate(r, ids)
    assert isinstance(wr, np.ndarray) and torch.equal(T(wr), diffrl.win_rate(T(r), T(ids)))

    lp, old, adv = _np(6, 4), _np(6, 4), _np(6)
    loss, stats = diffrl.grpo_loss(lp, old, adv, clip_range=0.2)
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    assert all(isinstance(v, np.ndarray) for v in stats.values())
    tl, ts = diffrl.grpo_loss(T(lp), T(old), T(adv), clip_range=0.2)
    assert torch.equal(T(loss), tl) and all(torch.equal(T(stats[k]), ts[k]) for k in ts)


def test_mixed_inputs_and_readonly_numpy():
    x, v, n = _np(2, 7), _np(2, 7), _np(2, 7)
    x.flags.writeable = False  # DLPack cannot export it: copied
    out = diffrl.sde_step(x, torch.from_numpy(v), (0.9, -0.1, 0.3), noise=n)
    assert isinstance(out.log_prob, np.ndarray)
    ref = diffrl.sde_step(torch.from_numpy(x.copy()), torch.from_numpy(v), (0.9, -0.1, 0.3), noise=torch.from_numpy(n))
    assert torch.equal(torch.from_numpy(out.log_prob), ref.log_prob)


class _DLPackOnly:
    """A foreign array: DLPack only, no namespace to build results from."""

    def __init__(self, t):
        self.t = t

    def __dlpack__(self, **kw):
        return self.t.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


def test_foreign_dlpack_inputs_give_torch():
    x, v, n = torch.randn(2, 9), torch.randn(2, 9), torch.randn(2, 9)
    out = diffrl.sde_step(_DLPackOnly(x), _DLPackOnly(v), (0.9, -0.1, 0.3), noise=_DLPackOnly(n))
    assert isinstance(out.prev_sample, torch.Tensor)
    assert torch.equal(out.log_prob, diffrl.sde_step(x, v, (0.9, -0.1, 0.3), noise=n).log_prob)


def test_torch_calls_pass_through():
    x, v, p = torch.randn(2, 9), torch.randn(2, 9), torch.randn(2, 9)
    out = diffrl.sde_step(x, v, (0.9, -0.1, 0.3), prev_sample=p)
    assert out.prev_sample is p
    with pytest.raises(TypeError, match="sample must be a torch.Tensor"):
        diffrl.sde_step([1.0, 2.0], v, (0.9, -0.1, 0.3), prev_sample=p)


# ----------------------------------------------------------------------------------------------
# on a GPU: the cupy backend against the reference and, bitwise, against the nvcc build


@pytest.fixture
def gpu_cupy():
    if not available("cupy", "cuda"):
        pytest.skip(f"cupy backend unavailable: {_dispatch.backend_status('cupy')[1]}")


def _sde_case(shape, dtype, guidance, kl, mode, per_sample=True):
    from test_sde_step import make_inputs  # noqa: PLC0415

    return make_inputs(shape, dtype, "cuda", guidance=guidance, kl=kl, per_sample=per_sample, mode=mode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sample", "score"])
@pytest.mark.parametrize("guidance,kl", [(False, False), (True, True), (False, True), (True, False)])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (3, 8193)])
def test_gpu_sde_step_cupy(gpu_cupy, dtype, mode, guidance, kl, shape):
    from test_sde_step import TOL, call, reference  # noqa: PLC0415

    g, coeffs, w = _sde_case(shape, dtype, guidance, kl, mode)
    for t in ("sample", "model_output", "uncond_output", "ref_output", "ref_uncond_output", "prev_sample"):
        if t in g:
            g[t].requires_grad_(True)
    out = call("cupy", g, coeffs, w)
    ref = reference(g, coeffs, w, "mean")
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.log_prob.cpu().double(), ref[2], rtol=rtol, atol=atol)
    gl = torch.randn_like(out.log_prob)
    loss = (out.log_prob * gl).sum() + (out.kl.sum() if kl else 0)
    grads = torch.autograd.grad(loss, [t for t in g.values() if t.requires_grad])
    if not available("cuda", "cuda"):
        return
    # the nvcc build: same kernels, same geometry, same floating-point options -> same bits
    g2 = {k: t.detach().clone().requires_grad_(t.requires_grad) for k, t in g.items()}
    cud = call("cuda", g2, coeffs, w)
    for a, b in ((out.prev_sample, cud.prev_sample), (out.log_prob, cud.log_prob), (out.mean, cud.mean),
                 (out.kl, cud.kl)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    loss2 = (cud.log_prob * gl).sum() + (cud.kl.sum() if kl else 0)
    grads2 = torch.autograd.grad(loss2, [t for t in g2.values() if t.requires_grad])
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_advantages_and_loss_cupy(gpu_cupy):
    r = torch.randn(1000, device="cuda", dtype=torch.float64)
    ids = torch.randint(0, 37, (1000,), device="cuda")
    rk = torch.randn(1000, 4, device="cuda")
    w = torch.rand(4, device="cuda", dtype=torch.float64)
    cases = [dict(rewards=r, group_ids=ids), dict(rewards=r.float(), group_ids=ids, std="global", clip=1.5),
             dict(rewards=rk, group_ids=ids, reward_weights=w, combine="normalize_each", num_steps=3),
             dict(rewards=rk, group_ids=ids, num_steps=4)]
    for kw in cases:
        a = diffrl.group_advantages(backend="cupy", **kw)
        ref = diffrl.group_advantages(backend="torch", **kw)
        torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)
        if available("cuda", "cuda"):
            assert torch.equal(a, diffrl.group_advantages(backend="cuda", **kw))
    wr = diffrl.win_rate(r, ids, backend="cupy")
    assert torch.equal(wr.cpu(), diffrl.win_rate(r.cpu(), ids.cpu(), backend="torch"))

    lp = torch.randn(64, 97, device="cuda", requires_grad=True)
    old, av, klv = torch.randn(64, 97, device="cuda"), torch.randn(64, device="cuda"), torch.rand(64, 97, device="cuda")
    results = {}
    for b in ("cupy", "torch") + (("cuda",) if available("cuda", "cuda") else ()):
        loss, stats = diffrl.grpo_loss(lp, old, av, clip_range=(0.2, 0.28), kl=klv, kl_coef=0.01, backend=b)
        (g,) = torch.autograd.grad(loss, [lp])
        results[b] = (loss, torch.stack(list(stats.values())), g)
    for x, y in zip(results["cupy"], results["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if "cuda" in results:
        assert all(torch.equal(x, y) for x, y in zip(results["cupy"], results["cuda"]))


@pytest.mark.gpu
def test_gpu_cupy_arrays_and_streams(gpu_cupy):
    cupy = pytest.importorskip("cupy")
    x, v, n = (cupy.random.standard_normal((4, 5000), dtype=cupy.float32) for _ in range(3))
    out = diffrl.sde_step(x, v, (0.9, -0.1, 0.3), noise=n, backend="cupy")
    assert isinstance(out.prev_sample, cupy.ndarray) and isinstance(out.log_prob, cupy.ndarray)
    T = torch.from_dlpack
    ref = diffrl.sde_step(T(x), T(v), (0.9, -0.1, 0.3), noise=T(n), backend="cupy")
    assert torch.equal(T(out.log_prob), ref.log_prob)
    score = diffrl.sde_step(x, v, (0.9, -0.1, 0.3), prev_sample=out.prev_sample, backend="cupy")
    assert score.prev_sample.data.ptr == out.prev_sample.data.ptr  # no copy either way
    assert cupy.array_equal(score.log_prob, out.log_prob)
    # launches go on torch's current stream
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        on_side = diffrl.sde_step(T(x), T(v), (0.9, -0.1, 0.3), noise=T(n), backend="cupy").log_prob
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(on_side, ref.log_prob)

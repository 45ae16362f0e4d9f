"""Backend selection for every op, in one place.

Backends: ``torch`` (the reference), ``cpp`` (diffrl._C, CPU tensors), ``triton`` (kernels/, CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1), ``cuda`` (diffrl._C built with nvcc, CUDA
tensors) and ``cupy`` (the same CUDA sources compiled at first use by NVRTC through CuPy, for installs
without nvcc: ``diffrl.ops._cupy_backend``), and for
attention ops ``flash_attn`` (the flash-attn package, CUDA tensors; never picked by "auto").

``backend="auto"`` takes the first available backend that implements the op, in the order
cuda -> cupy -> triton -> torch for CUDA tensors and cpp -> torch for CPU tensors. The environment
variable DIFFRL_BACKEND forces one backend for every "auto" call.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from diffrl import _native

BACKENDS = ("torch", "cpp", "triton", "cuda", "cupy", "flash_attn")
AUTO_ORDER = {"cuda": ("cuda", "cupy", "triton", "torch"), "cpu": ("cpp", "torch")}

_status_cache: dict[str, tuple[bool, str]] = {}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe(name: str) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name == "cpp":
        mod, reason = _native.load()
        return (mod is not None), reason
    if name == "cuda":
        mod, reason = _native.load()
        if mod is None:
            return False, reason
        if not _native.build_info().get("cuda"):
            return False, "diffrl._C was built without nvcc (set DIFFRL_CUDA=1 and reinstall to require it)"
        n, err = _native.cuda_runtime()
        if n == 0:
            return False, f"no CUDA device visible to the CUDA runtime ({err or 'device count is 0'})"
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        return True, ""
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'diffrl[triton]')"
        if not torch.cuda.is_available() and not triton_interpret():
            return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 to run its kernels on the CPU)"
        return True, ""
    if name == "cupy":
        from diffrl.ops import _cupy_backend  # noqa: PLC0415 - imports cupy only when probed

        return _cupy_backend.probe()
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return False, "flash-attn is not installed (pip install flash-attn)"
        if not torch.cuda.is_available():
            return False, "flash-attn needs a CUDA device"
        return True, ""
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backend_status(name: str) -> tuple[bool, str]:
    """(available on this machine and in this build, reason when not). Cached per process."""
    if name not in _status_cache:
        _status_cache[name] = _probe(name)
    return _status_cache[name]


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name in ("cuda", "cupy", "flash_attn"):
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    return False


_resolved: dict[tuple, str] = {}


def resolve(op: str, implemented: tuple[str, ...], backend: str, device: torch.device) -> str:
    """The backend that will run ``op`` on tensors of ``device``; ValueError if the choice can't run.

    Successful answers are memoised (keyed by everything they depend on, environment included):
    this runs on every op call, and small-latent calls are dominated by such overheads.
    """
    key = (op, implemented, backend, device.type, os.environ.get("DIFFRL_BACKEND", ""), triton_interpret())
    name = _resolved.get(key)
    if name is None:
        name = _resolve(op, implemented, backend, device)
        _resolved[key] = name
    return name


def _resolve(op: str, implemented: tuple[str, ...], backend: str, device: torch.device) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        forced = os.environ.get("DIFFRL_BACKEND", "").strip()
        if forced and forced != "auto":
            return _resolve(op, implemented, forced, device)
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if name in implemented and backend_status(name)[0] and _runs_on(name, device):
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if backend not in implemented:
        raise ValueError(f"{op}: backend {backend!r} does not implement this op (it has {implemented})")
    ok, reason = backend_status(backend)
    if not ok:
        raise ValueError(f"{op}: backend {backend!r} is not available here: {reason}")
    if not _runs_on(backend, device):
        where = {"cpp": "CPU tensors", "cuda": "CUDA tensors", "cupy": "CUDA tensors", "flash_attn": "CUDA tensors",
                 "triton": "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"}[backend]
        raise ValueError(f"{op}: backend {backend!r} runs on {where}, got tensors on {device}")
    return backend


def describe() -> dict[str, tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}

"""Loads the compiled extension diffrl._C, if this install has one; never raises."""

from __future__ import annotations

import functools
import os
import warnings


@functools.lru_cache(maxsize=None)
def load():
    """(module or None, reason it is missing or '')."""
    try:
        from diffrl import _C  # noqa: PLC0415
    except ImportError as e:  # a pure-Python install, or a build for another Python
        return None, f"diffrl._C is not importable ({e}); reinstall with `pip install -e .` to build it"
    isa = os.environ.get("DIFFRL_CPU_ISA", "").strip()
    if isa and hasattr(_C, "set_cpu_isa"):
        # the CPU kernels' instruction set (same bits either way): for tests and comparisons
        if isa not in ("avx2", "baseline") or not _C.set_cpu_isa(isa):
            warnings.warn(f"DIFFRL_CPU_ISA={isa!r} is not available here; using {_C.cpu_isa()!r}", stacklevel=2)
    return _C, ""


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    mod, _ = load()
    return dict(mod.build_info()) if mod is not None else {}


@functools.lru_cache(maxsize=None)
def cuda_runtime() -> tuple[int, str]:
    """(number of devices the extension's CUDA runtime sees, error or '')."""
    mod, reason = load()
    if mod is None:
        return 0, reason
    if not hasattr(mod, "cuda_runtime_status"):
        return 0, "diffrl._C was built without nvcc (no CUDA kernels in this build)"
    n, err = mod.cuda_runtime_status()
    return int(n), err


_DTYPE_CODES: dict = {}


# dtype codes of csrc/dtypes.h
def dtype_code(dtype) -> int:
    if not _DTYPE_CODES:
        import torch  # noqa: PLC0415

        _DTYPE_CODES.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2})
    return _DTYPE_CODES[dtype]

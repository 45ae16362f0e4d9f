"""Array interop: diffrl's ops take CuPy arrays, NumPy arrays and anything else that speaks DLPack
(``__dlpack__``) or the CUDA array interface (``__cuda_array_interface__``), as well as torch
tensors, without copying them, and give results of the kind they were given.

Conversion is zero-copy both ways: inputs become torch tensors that view the same memory
(``torch.from_dlpack``, or ``torch.as_tensor`` for the CUDA array interface), and results go back
through DLPack (``cupy.from_dlpack``, ``numpy.from_dlpack``, or the input's array-API namespace).
An input of a kind that cannot be built back from a tensor (an object with only a CUDA array
interface, say) gets torch tensors back. Calls made with torch tensors only pass straight through.

NumPy arrays stay on the CPU (and so run on the CPU backends); CuPy arrays on their GPU. Read-only
NumPy arrays, which DLPack cannot export, are copied.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["is_array", "to_torch", "from_torch", "accepts_arrays"]

_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def is_array(x: Any) -> bool:
    """A non-torch array that diffrl can view as a tensor."""
    if isinstance(x, (torch.Tensor, type, *_SCALARS)):
        return False
    return hasattr(x, "__dlpack__") or hasattr(x, "__cuda_array_interface__")


def _kind(x: Any) -> str:
    mod = type(x).__module__.split(".", 1)[0]
    if mod in ("numpy", "cupy"):
        return mod
    if hasattr(x, "__array_namespace__"):
        return "array_api"
    return "torch"  # foreign: results stay torch tensors


def to_torch(x: Any) -> torch.Tensor:
    """A torch tensor viewing the memory of ``x`` (torch tensors are returned as they are)."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except BufferError:
            # read-only NumPy arrays: DLPack has no way to export them to torch
            if _kind(x) == "numpy":
                return torch.tensor(x)
            raise
    if hasattr(x, "__cuda_array_interface__"):
        return torch.as_tensor(x, device="cuda")  # a view, no copy
    raise TypeError(f"cannot view a {type(x).__name__} as a torch tensor (it has neither __dlpack__ nor "
                    "__cuda_array_interface__)")


def from_torch(t: torch.Tensor, like: Any) -> Any:
    """``t`` as an array of the kind of ``like`` (sharing memory), or ``t`` itself when that kind is
    torch or cannot be built from a tensor."""
    kind = _kind(like) if not isinstance(like, str) else like
    if kind == "torch":
        return t
    if t.requires_grad:  # other array libraries have no autograd
        t = t.detach()
    if kind == "numpy":
        import numpy as np  # noqa: PLC0415

        return np.from_dlpack(t)
    if kind == "cupy":
        import cupy  # noqa: PLC0415

        return cupy.from_dlpack(t)
    ns = like.__array_namespace__()
    return ns.from_dlpack(t)


def _convert_results(obj: Any, like: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return from_torch(obj, like)
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_convert_results(o, like) for o in obj)
    if isinstance(obj, list):
        return [_convert_results(o, like) for o in obj]
    if isinstance(obj, dict):
        return {k: _convert_results(v, like) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _convert_results(getattr(obj, f.name), like)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _convert_arg(v: Any, found: list) -> Any:
    if isinstance(v, (torch.Tensor, *_SCALARS)):
        return v
    if isinstance(v, (tuple, list)):  # e.g. coeffs=(a, c, s) given as arrays
        if not any(is_array(e) for e in v):
            return v
        return type(v)(_convert_arg(e, found) for e in v)
    if is_array(v):
        found.append(v)
        return to_torch(v)
    return v


# types that are never arrays, checked by identity first (and learned: any class without the two
# protocols joins them): an op is called once per sampler step, so the all-torch path must cost
# next to nothing
_PLAIN = {torch.Tensor, type(None), bool, int, float, str}


def _has_array(v: Any) -> bool:
    t = type(v)
    if t in _PLAIN:
        return False
    if t is tuple or t is list:
        return any(_has_array(e) for e in v)
    if isinstance(v, torch.Tensor):
        return False
    if not (hasattr(t, "__dlpack__") or hasattr(t, "__cuda_array_interface__")):
        _PLAIN.add(t)
        return False
    return True


def accepts_arrays(fn: Callable) -> Callable:
    """Decorates a public op: array arguments (at the top level, or inside a tuple or list) are
    viewed as torch tensors, and the results come back as the kind of the first of them."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for v in args:
            if type(v) not in _PLAIN and _has_array(v):
                break
        else:
            for v in kwargs.values():
                if type(v) not in _PLAIN and _has_array(v):
                    break
            else:
                return fn(*args, **kwargs)
        found: list = []
        args = tuple(_convert_arg(a, found) for a in args)
        kwargs = {k: _convert_arg(v, found) for k, v in kwargs.items()}
        out = fn(*args, **kwargs)
        return _convert_results(out, found[0]) if found else out

    return wrapper

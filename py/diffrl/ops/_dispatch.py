"""The backend registry and backend selection for every op, in one place.

Each backend is one ``Backend`` record below: its name, the tensors it runs on, an availability
probe, and the launchers it provides (by launcher name, imported at first use). An op file never
branches on a backend's name: it validates, asks ``resolve`` which backend runs, runs the reference
itself for ``torch`` and otherwise calls ``launcher(name, "<op>_forward")``. Every backend's launcher
of one name has the same signature (the triton kernels' ``diffrl.kernels.*`` functions are the model).

Backends: ``torch`` (the reference), ``cpp`` (diffrl._C, CPU tensors), ``triton`` (kernels/, CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1), ``cuda`` (diffrl._C built with nvcc, CUDA
tensors) and ``cupy`` (the same CUDA sources compiled at first use by NVRTC through CuPy, for installs
without nvcc: ``diffrl.ops._cupy_backend``), and for
attention ops ``flash_attn`` (the flash-attn package, CUDA tensors; never picked by "auto").

``backend="auto"`` takes the first available backend that implements the op, in the order
cuda -> cupy -> triton -> torch for CUDA tensors and cpp -> torch for CPU tensors. The environment
variable DIFFRL_BACKEND forces one backend for every "auto" call.

How to add a backend: docs/adding-a-backend.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from diffrl import _native
from diffrl.ops._native_backend import PointerBackend

# The launchers each op needs from a fast backend (the reference runs through the op's own code).
OP_LAUNCHERS: dict[str, tuple[str, ...]] = {
    "sde_step": ("sde_step_forward", "sde_step_backward"),
    "grpo_loss": ("grpo_loss_forward", "grpo_loss_backward"),
    "diffusion_dpo_loss": ("dpo_loss_forward", "dpo_loss_backward"),
    "group_advantages": ("group_advantages",),
    "win_rate": ("win_rate",),
    "reward_attention": ("reward_attention_forward",),
}


@dataclass(frozen=True)
class Backend:
    """One backend. ``launchers`` maps a launcher name (see OP_LAUNCHERS) to ``"module:function"``,
    imported on first use so that ``import diffrl`` never imports triton, cupy or flash-attn, or to
    the launcher itself where it imports nothing heavy until called (the raw-pointer backends).
    ``dtypes`` narrows the float dtypes an op accepts on this backend where it takes fewer than the
    op's kernels do (op -> dtypes)."""

    name: str
    where: str  # the tensors it runs on, in words, for error messages
    runs_on: Callable[[torch.device], bool]
    probe: Callable[[], tuple[bool, str]]  # (available here, reason when not); never raises
    launchers: Mapping[str, str | Callable] = field(default_factory=dict)
    dtypes: Mapping[str, tuple] = field(default_factory=dict)
    reference: bool = False  # the torch reference: implements every op, through the op file itself

    def implements(self, op: str) -> bool:
        return self.reference or all(name in self.launchers for name in OP_LAUNCHERS[op])


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# availability probes


def _probe_cpp() -> tuple[bool, str]:
    mod, reason = _native.load()
    return (mod is not None), reason


def _probe_cuda() -> tuple[bool, str]:
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


def _probe_triton() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'diffrl[triton]')"
    if not torch.cuda.is_available() and not triton_interpret():
        return False, "triton needs a CUDA device (or TRITON_INTERPRET=1 to run its kernels on the CPU)"
    return True, ""


def _probe_cupy() -> tuple[bool, str]:
    from diffrl.ops import _cupy_backend  # noqa: PLC0415 - imports cupy only when probed

    return _cupy_backend.probe()


def _probe_flash_attn() -> tuple[bool, str]:
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed (pip install flash-attn)"
    if not torch.cuda.is_available():
        return False, "flash-attn needs a CUDA device"
    return True, ""


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# the registry


# cpp, cuda and cupy share one tensor-to-pointer layer (diffrl.ops._native_backend); each names
# the module of its pointer-level functions (the diffrl._C bindings, or the cupy backend's)
_CPP = PointerBackend("cpp", gpu=False, raw_module="diffrl._C", raw_suffix="_cpu")
_CUDA = PointerBackend("cuda", gpu=True, raw_module="diffrl._C", raw_suffix="_cuda")
_CUPY = PointerBackend("cupy", gpu=True, raw_module="diffrl.ops._cupy_backend")

_TRITON = {
    "sde_step_forward": "diffrl.kernels.sde_step:sde_step_forward",
    "sde_step_backward": "diffrl.kernels.sde_step:sde_step_backward",
    "grpo_loss_forward": "diffrl.kernels.grpo_loss:grpo_loss_forward",
    "grpo_loss_backward": "diffrl.kernels.grpo_loss:grpo_loss_backward",
    "dpo_loss_forward": "diffrl.kernels.dpo_loss:dpo_loss_forward",
    "dpo_loss_backward": "diffrl.kernels.dpo_loss:dpo_loss_backward",
    "group_advantages": "diffrl.kernels.advantages:group_advantages",
    "win_rate": "diffrl.kernels.advantages:win_rate",
    "reward_attention_forward": "diffrl.kernels.reward_attention:reward_attention_forward",
}

REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend(name="torch", where="any tensors", runs_on=lambda device: True, probe=lambda: (True, ""), reference=True),
    Backend(name="cpp", where="CPU tensors", runs_on=lambda device: device.type == "cpu", probe=_probe_cpp,
            launchers=_CPP.launchers()),
    Backend(name="triton", where="CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)",
            runs_on=lambda device: device.type == "cuda" or (device.type == "cpu" and triton_interpret()),
            probe=_probe_triton, launchers=_TRITON),
    Backend(name="cuda", where="CUDA tensors", runs_on=_on_cuda, probe=_probe_cuda, launchers=_CUDA.launchers()),
    Backend(name="cupy", where="CUDA tensors", runs_on=_on_cuda, probe=_probe_cupy, launchers=_CUPY.launchers()),
    Backend(name="flash_attn", where="CUDA tensors", runs_on=_on_cuda, probe=_probe_flash_attn,
            launchers={"reward_attention_forward": "diffrl.ops._flash_attn_backend:reward_attention_forward"},
            dtypes={"reward_attention": (torch.float16, torch.bfloat16)}),
)}

BACKENDS = tuple(REGISTRY)
AUTO_ORDER = {"cuda": ("cuda", "cupy", "triton", "torch"), "cpu": ("cpp", "torch")}


def implementing(op: str) -> tuple[str, ...]:
    """The backends that implement ``op``, in registry order (available here or not)."""
    return tuple(b.name for b in REGISTRY.values() if b.implements(op))


# ----------------------------------------------------------------------------------------------
# status and selection

_status_cache: dict[str, tuple[bool, str]] = {}


def _probe(name: str) -> tuple[bool, str]:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return REGISTRY[name].probe()


def backend_status(name: str) -> tuple[bool, str]:
    """(available on this machine and in this build, reason when not). Cached per process."""
    if name not in _status_cache:
        _status_cache[name] = _probe(name)
    return _status_cache[name]


def _runs_on(name: str, device: torch.device) -> bool:
    b = REGISTRY.get(name)
    return b is not None and b.runs_on(device)


def _usable(op: str, implemented: tuple[str, ...], device: torch.device) -> tuple[str, ...]:
    # for error messages: what the caller could ask for instead
    return tuple(n for n in implemented if n in REGISTRY and backend_status(n)[0] and _runs_on(n, device))


_resolved: dict[tuple, str] = {}


def resolve(op: str, implemented: tuple[str, ...], backend: str, device: torch.device) -> str:
    """The backend that will run ``op`` on tensors of ``device``; ValueError if the choice can't run.

    ``implemented`` is ``implementing(op)`` (op files keep it as their ``IMPLEMENTED``).
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
    if backend not in REGISTRY:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected 'auto' or one of {BACKENDS} "
                         f"(usable here for {op} on {device.type} tensors: {_usable(op, implemented, device)})")
    if backend not in implemented:
        raise ValueError(f"{op}: backend {backend!r} does not implement this op (it has {implemented})")
    ok, reason = backend_status(backend)
    if not ok:
        raise ValueError(f"{op}: backend {backend!r} is not available here: {reason} "
                         f"(usable here for {op} on {device.type} tensors: {_usable(op, implemented, device)})")
    if not _runs_on(backend, device):
        raise ValueError(f"{op}: backend {backend!r} runs on {REGISTRY[backend].where}, got tensors on {device}")
    return backend


def kernel_dtypes(name: str, op: str, default: tuple) -> tuple:
    """The float dtypes backend ``name`` takes for ``op``: ``default`` (the op's kernels) unless
    its record narrows them."""
    return REGISTRY[name].dtypes.get(op, default)


_launchers: dict[tuple[str, str], Callable] = {}


def launcher(name: str, launcher_name: str) -> Callable:
    """Backend ``name``'s launcher ``launcher_name``, imported on first use (then one dict look-up)."""
    fn = _launchers.get((name, launcher_name))
    if fn is None:
        spec = REGISTRY[name].launchers.get(launcher_name)
        if spec is None:
            raise ValueError(f"backend {name!r} has no launcher {launcher_name!r} "
                             f"(it has {tuple(REGISTRY[name].launchers)})")
        if isinstance(spec, str):
            module, _, attr = spec.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        else:
            fn = spec
        _launchers[(name, launcher_name)] = fn
    return fn


def describe() -> dict[str, tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}

"""The launchers of the backends that take raw pointers: ``cpp`` and ``cuda`` (diffrl._C) and ``cupy``.

All three share one calling convention, the diffrl._C bindings': sizes, raw addresses
(``tensor.data_ptr()``, 0 for an absent tensor), scalars and, on a GPU, a workspace and the stream.
This module is the one layer between torch tensors and that convention: it allocates the outputs,
turns tensors into addresses and calls the backend's pointer-level function of the same name
(``diffrl._C.<name>_cpu`` / ``<name>_cuda``, or ``diffrl.ops._cupy_backend.<name>``). Each
launcher has the signature of the triton launcher of that name (``diffrl.kernels.*``).

Absent outputs come back as None (an allocation each is measurable on small latents); the
torch.library wrappers turn them into empty tensors.
"""

from __future__ import annotations

import torch

from diffrl import _native
from diffrl.ops import _alloc

LAUNCHERS = ("sde_step_forward", "sde_step_backward", "grpo_loss_forward", "grpo_loss_backward",
             "group_advantages", "win_rate")

SDE_CHUNK = 4096  # kChunk in csrc/sde_step.h
LOSS_CHUNK = 4096  # kLossChunk in csrc/advantages.h
LOSS_PARTS = 7  # kLossParts in csrc/advantages.h
LOSS_STATS = 7  # kNumStats in csrc/advantages.h (diffrl.ops.loss.STAT_NAMES)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class PointerBackend:
    """The tensor-level launchers of one raw-pointer backend. ``gpu``: its functions take a
    workspace and a stream and run under the tensors' device."""

    def __init__(self, name: str, gpu: bool, raw_suffix: str | None):
        self.name = name
        self.gpu = gpu
        self._suffix = raw_suffix  # diffrl._C's name suffix, or None for the cupy backend's module
        self._raw: dict[str, object] = {}

    def raw(self, name: str):
        """The pointer-level function ``name`` of this backend (looked up once)."""
        fn = self._raw.get(name)
        if fn is None:
            if self._suffix is None:
                from diffrl.ops import _cupy_backend  # noqa: PLC0415 - never imports cupy itself

                fn = getattr(_cupy_backend, name)
            else:
                C, reason = _native.load()
                if C is None:
                    raise RuntimeError(reason)
                fn = getattr(C, name + self._suffix)
            self._raw[name] = fn
        return fn

    def _launch(self, name, device, args, workspace=None):
        fn = self.raw(name)
        if not self.gpu:
            fn(*args)
            return
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device).cuda_stream
            if workspace is None:
                fn(*args, stream)
            else:
                fn(*args, _ptr(workspace), stream)

    # ---- sde_step ----
    def sde_step_forward(self, x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum, return_mean):
        B = x.shape[0]
        D = x.numel() // B
        prev_out = _alloc.empty_like(x) if noise is not None else None
        mean = _alloc.empty_like(x) if return_mean else None
        log_prob = _alloc.empty(B, dtype=torch.float32, device=x.device)
        kl = _alloc.empty(B, dtype=torch.float32, device=x.device) if vr is not None else None
        args = (_native.dtype_code(x.dtype), B, D, _ptr(x), _ptr(v), _ptr(vu), float(w), _ptr(noise),
                _ptr(prev_in), _ptr(vr), _ptr(vru), _ptr(a), _ptr(c), _ptr(s), _ptr(prev_out), _ptr(mean),
                _ptr(log_prob), _ptr(kl))
        if self.gpu:
            workspace = _alloc.empty(2 * B * -(-D // SDE_CHUNK), dtype=torch.float32, device=x.device)
            # this binding takes the workspace before reduce_sum
            fn = self.raw("sde_step_forward")
            with torch.cuda.device(x.device):
                fn(*args, _ptr(workspace), int(reduce_sum), torch.cuda.current_stream(x.device).cuda_stream)
        else:
            self.raw("sde_step_forward")(*args, int(reduce_sum))
        return prev_out, mean, log_prob, kl

    def sde_step_backward(self, x, v, vu, w, prev, vr, vru, a, c, s, g_log_prob, g_kl, g_prev, g_mean, sampling,
                          reduce_sum, needs):
        B = x.shape[0]
        D = x.numel() // B
        want = [bool(n) and t is not None for n, t in zip(needs, (x, v, vu, None if sampling else prev, vr, vru))]
        outs = [_alloc.empty_like(x) if wnt else None for wnt in want]
        args = (_native.dtype_code(x.dtype), B, D, _ptr(x), _ptr(v), _ptr(vu), float(w), _ptr(prev), _ptr(vr),
                _ptr(vru), _ptr(a), _ptr(c), _ptr(s), _ptr(g_log_prob), _ptr(g_kl), _ptr(g_prev), _ptr(g_mean),
                int(sampling), int(reduce_sum), *[_ptr(o) for o in outs])
        self._launch("sde_step_backward", x.device, args)
        return tuple(outs)

    # ---- grpo_loss ----
    def grpo_loss_forward(self, lp, old, adv, kl, lo, hi, kl_coef):
        N = lp.numel()
        loss = _alloc.empty((), dtype=torch.float32, device=lp.device)
        stats = _alloc.empty(LOSS_STATS, dtype=torch.float32, device=lp.device)
        args = (N, N // adv.numel(), _ptr(lp), _ptr(old), _ptr(adv), _ptr(kl), lo, hi, kl_coef, _ptr(loss),
                _ptr(stats))
        workspace = None
        if self.gpu:
            workspace = _alloc.empty(LOSS_PARTS * -(-N // LOSS_CHUNK), dtype=torch.float64, device=lp.device)
        self._launch("grpo_loss_forward", lp.device, args, workspace)
        return loss, stats

    def grpo_loss_backward(self, g_loss, lp, old, adv, lo, hi):
        N = lp.numel()
        out = _alloc.empty_like(lp)
        args = (N, N // adv.numel(), _ptr(lp), _ptr(old), _ptr(adv), lo, hi, _ptr(g_loss), _ptr(out))
        self._launch("grpo_loss_backward", lp.device, args)
        return out

    # ---- group_advantages, win_rate ----
    def group_advantages(self, vals, order, sorted_ids, weights, gstd, step_weights, mode, std_mode, eps, clip, T,
                         squeeze):
        B = vals.shape[0]
        K = vals.shape[1] if vals.dim() == 2 else 1
        out = _alloc.empty((B,) if squeeze else (B, T), dtype=torch.float32, device=vals.device)
        args = (int(vals.dtype == torch.float64), B, K, _ptr(vals), _ptr(weights), _ptr(order), _ptr(sorted_ids),
                _ptr(gstd), _ptr(step_weights), T, mode, std_mode, float(eps), float(clip), int(clip > 0), _ptr(out))
        self._launch("group_advantages", vals.device, args)
        return out

    def win_rate(self, vals, order, sorted_ids):
        B = vals.shape[0]
        out = _alloc.empty(B, dtype=torch.float32, device=vals.device)
        args = (int(vals.dtype == torch.float64), B, _ptr(vals), _ptr(order), _ptr(sorted_ids), _ptr(out))
        self._launch("win_rate", vals.device, args)
        return out


cpp = PointerBackend("cpp", gpu=False, raw_suffix="_cpu")
cuda = PointerBackend("cuda", gpu=True, raw_suffix="_cuda")
cupy = PointerBackend("cupy", gpu=True, raw_suffix=None)

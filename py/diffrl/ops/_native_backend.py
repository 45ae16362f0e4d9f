"""The launchers of the backends that take raw pointers: ``cpp`` and ``cuda`` (diffrl._C) and ``cupy``.

All three share one calling convention, the diffrl._C bindings': keyword arguments named as the
fields of the C++ argument structs (csrc/sde_step_api.h, csrc/advantages_api.h): sizes, raw
addresses (``tensor.data_ptr()``, 0 for an absent tensor), scalars and, on a GPU, the stream and
a workspace where a kernel needs one.

This module is the one layer between torch tensors and that convention: it allocates the outputs,
turns tensors into addresses and calls the backend's pointer-level function of the same name
(``diffrl._C.<name>_cpu`` / ``<name>_cuda``, or ``diffrl.ops._cupy_backend.<name>``). Each
launcher has the signature of the triton launcher of that name (``diffrl.kernels.*``).

Absent outputs come back as None (an allocation each is measurable on small latents); the
torch.library wrappers turn them into empty tensors.
"""

from __future__ import annotations

import importlib

import torch

from diffrl import _native
from diffrl.ops import _alloc

LAUNCHERS = ("sde_step_forward", "sde_step_backward", "grpo_loss_forward", "grpo_loss_backward",
             "group_advantages", "win_rate", "dpo_loss_forward", "dpo_loss_backward")

SDE_CHUNK = 4096  # kChunk in csrc/sde_step.h
LOSS_CHUNK = 4096  # kLossChunk in csrc/advantages.h
LOSS_PARTS = 7  # kLossParts in csrc/advantages.h
LOSS_STATS = 7  # kNumStats in csrc/advantages.h (diffrl.ops.loss.STAT_NAMES)
DPO_CHUNK = 4096  # kDpoChunk in csrc/dpo_loss.h
DPO_PARTS = 5  # kDpoParts in csrc/dpo_loss.h
DPO_STATS = 6  # kDpoNumStats in csrc/dpo_loss.h (diffrl.ops.dpo.STAT_NAMES)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class PointerBackend:
    """The tensor-level launchers of one raw-pointer backend. Arguments go to the pointer-level
    functions by keyword, named as the fields of the C++ argument structs (csrc/*_api.h). ``gpu``:
    its functions also take the stream (and a workspace where a kernel needs one) and run under
    the tensors' device."""

    def __init__(self, name: str, gpu: bool, raw_module: str, raw_suffix: str = ""):
        self.name = name
        self.gpu = gpu
        self._module = raw_module  # where the pointer-level functions are, imported at first use
        self._suffix = raw_suffix  # their names: the launcher's name + this suffix
        self._raw: dict[str, object] = {}

    def launchers(self) -> dict[str, object]:
        """Launcher name -> bound launcher, for this backend's registry record."""
        return {name: getattr(self, name) for name in LAUNCHERS}

    def raw(self, name: str):
        """The pointer-level function ``name`` of this backend (looked up once)."""
        fn = self._raw.get(name)
        if fn is None:
            if self._module == "diffrl._C":  # loaded once, with the reason when it is missing
                module, reason = _native.load()
                if module is None:
                    raise RuntimeError(reason)
            else:
                module = importlib.import_module(self._module)
            fn = getattr(module, name + self._suffix)
            self._raw[name] = fn
        return fn

    # Arguments are dict literals passed with **: ~1 us cheaper per call than dict(key=...), whose
    # own keyword arguments make a second dict (ops are called once per sampler step).
    def _launch(self, name, device, args, workspace=None):
        fn = self.raw(name)
        if not self.gpu:
            fn(**args)
            return
        if workspace is not None:
            args["workspace"] = _ptr(workspace)
        with torch.cuda.device(device):
            args["stream"] = torch.cuda.current_stream(device).cuda_stream
            fn(**args)

    # ---- sde_step ----
    def sde_step_forward(self, x, v, vu, w, noise, prev_in, vr, vru, a, c, s, reduce_sum, return_mean):
        B = x.shape[0]
        D = x.numel() // B
        prev_out = _alloc.empty_like(x) if noise is not None else None
        mean = _alloc.empty_like(x) if return_mean else None
        log_prob = _alloc.empty(B, dtype=torch.float32, device=x.device)
        kl = _alloc.empty(B, dtype=torch.float32, device=x.device) if vr is not None else None
        args = {"dtype": _native.dtype_code(x.dtype), "B": B, "D": D, "x": _ptr(x), "v": _ptr(v), "v_uncond": _ptr(vu),
                "w": float(w), "noise": _ptr(noise), "prev_in": _ptr(prev_in), "v_ref": _ptr(vr),
                "v_ref_uncond": _ptr(vru), "a": _ptr(a), "c": _ptr(c), "s": _ptr(s), "prev_out": _ptr(prev_out),
                "mean_out": _ptr(mean), "log_prob": _ptr(log_prob), "kl": _ptr(kl), "reduce_sum": int(reduce_sum)}
        workspace = None
        if self.gpu:  # per-(sample, chunk) partial sums of the log-prob and the KL
            workspace = _alloc.empty(2 * B * -(-D // SDE_CHUNK), dtype=torch.float32, device=x.device)
        self._launch("sde_step_forward", x.device, args, workspace)
        return prev_out, mean, log_prob, kl

    def sde_step_backward(self, x, v, vu, w, prev, vr, vru, a, c, s, g_log_prob, g_kl, g_prev, g_mean, sampling,
                          reduce_sum, needs):
        B = x.shape[0]
        D = x.numel() // B
        want = [bool(n) and t is not None for n, t in zip(needs, (x, v, vu, None if sampling else prev, vr, vru))]
        gx, gv, gvu, gxp, gvr, gvru = outs = [_alloc.empty_like(x) if wnt else None for wnt in want]
        args = {"dtype": _native.dtype_code(x.dtype), "B": B, "D": D, "x": _ptr(x), "v": _ptr(v), "v_uncond": _ptr(vu),
                "w": float(w), "prev": _ptr(prev), "v_ref": _ptr(vr), "v_ref_uncond": _ptr(vru), "a": _ptr(a),
                "c": _ptr(c), "s": _ptr(s), "g_log_prob": _ptr(g_log_prob), "g_kl": _ptr(g_kl), "g_prev": _ptr(g_prev),
                "g_mean": _ptr(g_mean), "sampling": int(sampling), "reduce_sum": int(reduce_sum), "g_x": _ptr(gx),
                "g_v": _ptr(gv), "g_v_uncond": _ptr(gvu), "g_prev_in": _ptr(gxp), "g_v_ref": _ptr(gvr),
                "g_v_ref_uncond": _ptr(gvru)}
        self._launch("sde_step_backward", x.device, args)
        return tuple(outs)

    # ---- grpo_loss ----
    def grpo_loss_forward(self, lp, old, adv, kl, lo, hi, kl_coef):
        N = lp.numel()
        loss = _alloc.empty((), dtype=torch.float32, device=lp.device)
        stats = _alloc.empty(LOSS_STATS, dtype=torch.float32, device=lp.device)
        args = {"N": N, "adv_div": N // adv.numel(), "log_prob": _ptr(lp), "old_log_prob": _ptr(old), "adv": _ptr(adv),
                "kl": _ptr(kl), "lo": lo, "hi": hi, "kl_coef": kl_coef, "loss": _ptr(loss), "stats": _ptr(stats)}
        workspace = None
        if self.gpu:  # per-chunk partial sums
            workspace = _alloc.empty(LOSS_PARTS * -(-N // LOSS_CHUNK), dtype=torch.float64, device=lp.device)
        self._launch("grpo_loss_forward", lp.device, args, workspace)
        return loss, stats

    def grpo_loss_backward(self, g_loss, lp, old, adv, lo, hi):
        N = lp.numel()
        out = _alloc.empty_like(lp)
        args = {"N": N, "adv_div": N // adv.numel(), "log_prob": _ptr(lp), "old_log_prob": _ptr(old), "adv": _ptr(adv),
                "lo": lo, "hi": hi, "g_loss": _ptr(g_loss), "g_log_prob": _ptr(out)}
        self._launch("grpo_loss_backward", lp.device, args)
        return out

    # ---- group_advantages, win_rate ----
    def group_advantages(self, vals, order, sorted_ids, weights, gstd, step_weights, mode, std_mode, eps, clip, T,
                         squeeze):
        B = vals.shape[0]
        out = _alloc.empty((B,) if squeeze else (B, T), dtype=torch.float32, device=vals.device)
        args = {"vals_double": int(vals.dtype == torch.float64), "B": B, "K": vals.shape[1] if vals.dim() == 2 else 1,
                "vals": _ptr(vals), "weights": _ptr(weights), "order": _ptr(order), "sorted_ids": _ptr(sorted_ids),
                "global_std": _ptr(gstd), "step_weights": _ptr(step_weights), "T": T, "mode": mode,
                "std_mode": std_mode, "eps": float(eps), "clip": float(clip), "has_clip": int(clip > 0),
                "out": _ptr(out)}
        self._launch("group_advantages", vals.device, args)
        return out

    def win_rate(self, vals, order, sorted_ids):
        B = vals.shape[0]
        out = _alloc.empty(B, dtype=torch.float32, device=vals.device)
        args = {"vals_double": int(vals.dtype == torch.float64), "B": B, "vals": _ptr(vals), "order": _ptr(order),
                "sorted_ids": _ptr(sorted_ids), "out": _ptr(out)}
        self._launch("win_rate", vals.device, args)
        return out

    # ---- diffusion_dpo_loss ----
    def dpo_loss_forward(self, pw, pl, rw, rl, tw, tl, weights, beta):
        B = pw.shape[0]
        D = pw.numel() // B
        dev = pw.device
        loss = _alloc.empty((), dtype=torch.float32, device=dev)
        stats = _alloc.empty(DPO_STATS, dtype=torch.float32, device=dev)
        coef = _alloc.empty(B, dtype=torch.float32, device=dev)
        args = {"dtype": _native.dtype_code(pw.dtype), "B": B, "D": D, "policy_w": _ptr(pw), "policy_l": _ptr(pl),
                "ref_w": _ptr(rw), "ref_l": _ptr(rl), "target_w": _ptr(tw), "target_l": _ptr(tl),
                "weights": _ptr(weights), "beta": float(beta), "loss": _ptr(loss), "stats": _ptr(stats),
                "coef": _ptr(coef)}
        workspace = None
        if self.gpu:  # per-(sample, chunk) partial sums
            workspace = _alloc.empty(DPO_PARTS * B * -(-D // DPO_CHUNK), dtype=torch.float64, device=dev)
        self._launch("dpo_loss_forward", dev, args, workspace)
        return loss, stats, coef

    def dpo_loss_backward(self, g_loss, coef, pw, pl, tw, tl, want_w, want_l):
        B = pw.shape[0]
        gw = _alloc.empty_like(pw) if want_w else None
        gl = _alloc.empty_like(pl) if want_l else None
        args = {"dtype": _native.dtype_code(pw.dtype), "B": B, "D": pw.numel() // B, "policy_w": _ptr(pw),
                "policy_l": _ptr(pl), "target_w": _ptr(tw), "target_l": _ptr(tl), "coef": _ptr(coef),
                "g_loss": _ptr(g_loss), "g_policy_w": _ptr(gw), "g_policy_l": _ptr(gl)}
        self._launch("dpo_loss_backward", pw.device, args)
        return gw, gl

"""What the trainers need to know about FSDP, in one place.

Supported: FSDP2 (``torch.distributed.fsdp.fully_shard``; accelerate's ``fsdp_version: 2``). It shards
the denoiser in place: the module keeps its class (plus an FSDP mixin), its parameter names and its
place in the pipeline, its parameters become ``DTensor`` shards, and each forward all-gathers them.
So the sampler, which calls ``pipe.transformer`` / ``pipe.unet``, runs the sharded model as is; what
changes is that

* every rank must call the model the same number of times (each call is a collective),
* trained tensors, their EMA and the optimizer's moments are shards, so a checkpoint gathers them
  (:func:`full_tensor`) into the same full tensors a single-process run writes, and a resume cuts
  the full tensors back into this rank's shards (:func:`shard_like`),
* a module left unsharded by its last forward (the root by default, after a forward without
  gradients) would not see shards written in place; :func:`reshard` comes first.

FSDP1 (``FullyShardedDataParallel``) is refused: it wraps the model in another module whose
parameters are flattened, so the pipeline's own model could no longer be called (see
:func:`uses_fsdp2`). DeepSpeed ZeRO is handled in :mod:`diffrl.trainers.deepspeed`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = ["uses_fsdp2", "full_tensor", "shard_like", "full_optimizer_state", "sharded_optimizer_state",
           "clip_grad_norm", "reshard"]


def uses_fsdp2(accelerator) -> bool:
    """Whether ``accelerator`` shards the model with FSDP2; raises for FSDP1, which the trainers do not
    support."""
    from accelerate.utils import DistributedType  # noqa: PLC0415

    kind = getattr(accelerator, "distributed_type", None)
    if kind == DistributedType.DEEPSPEED:
        return False  # (diffrl.trainers.deepspeed)
    if kind != DistributedType.FSDP:
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            warnings.warn("accelerate was asked for FSDP but runs without it (accelerate enables FSDP only on GPUs "
                          "and other accelerators, not on the CPU): the run is data-parallel", stacklevel=3)
        return False
    if not getattr(accelerator, "is_fsdp2", False):
        raise ValueError("FSDP1 is not supported by the diffrl trainers: it wraps the denoiser in a module with "
                         "flattened parameters that the pipeline cannot call; use FSDP2 (fsdp_version: 2 in the "
                         "accelerate config)")
    return True


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` unsharded: a DTensor is all-gathered (a collective: every rank must call this, tensors in
    the same order); a plain tensor is returned as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut like ``like`` (this rank's shard when ``like`` is a DTensor; ``full`` itself else).
    Every rank holds the same ``full`` (read from the same checkpoint), so no data is sent."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def reshard(module: torch.nn.Module) -> None:
    """Free the unsharded parameters of every FSDP unit in ``module``, so that the next forward
    gathers the shards again (after the shards were written in place)."""
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _params(optimizer) -> list[torch.Tensor]:
    # the indices of an optimizer state dict count the parameters of all groups, in order
    return [p for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor gathered (on the CPU): the format of an
    unsharded run's state dict. ``keep=False`` (ranks that do not write the checkpoint) joins the
    gathers and returns an empty dict."""
    sd = optimizer.state_dict()
    state = {}
    for idx, st in sd["state"].items():
        row = {k: full_tensor(v) if _is_dtensor(v) else v for k, v in st.items()}
        if keep:
            state[idx] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in row.items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def sharded_optimizer_state(optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """An unsharded optimizer state dict (:func:`full_optimizer_state`, or a single-process run's) with
    the moments of sharded parameters cut into this rank's shards, ready for ``load_state_dict``."""
    params = _params(optimizer)
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {k: shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def clip_grad_norm(accelerator, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the (sharded) gradients of ``params`` to a total norm of ``max_norm``; returns the norm
    before clipping as a plain tensor. (accelerate's ``clip_grad_norm_`` under FSDP clips only when
    given all of the model's parameters, and silently does nothing for a LoRA subset.)"""
    accelerator.unscale_gradients()  # fp16: the gradients are scaled
    return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))

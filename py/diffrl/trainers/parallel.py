"""How a trainer runs over its processes: one object per strategy, chosen once from the accelerator.

``parallel_for(accelerator)`` returns

* :class:`DataParallel`: one process, or DDP through accelerate. Every rank holds whole parameters.
* :class:`FSDP2`: ``fully_shard`` through accelerate (details in :mod:`diffrl.trainers.fsdp`).
* :class:`ZeRO`: DeepSpeed ZeRO stage 1, 2 or 3 driven by the trainer (:mod:`diffrl.trainers.deepspeed`).

The trainer asks the strategy everything that differs between them, and nothing else: how the
pipeline is built and prepared, one backward pass and the optimizer step (clip, skip a non-finite
update on every rank alike), this rank's part of a parameter (what the EMA keeps), whole tensors for
a checkpoint and the optimizer state in the single-process format, and loading both back.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from diffrl.trainers import deepspeed as ds
from diffrl.trainers import fsdp

__all__ = ["DataParallel", "FSDP2", "ZeRO", "parallel_for", "torch_optimizer"]

torch_optimizer = ds.torch_optimizer  # the torch optimizer inside accelerate's (and DeepSpeed's) wrapper


class DataParallel:
    """One process or DDP: parameters whole on every rank, gradients all-reduced by accelerate."""

    name = "data parallel"
    partitioned = False       # every model call is a collective (FSDP2, ZeRO-3): all ranks must make the same calls
    collective_checkpoint = False  # assembling a checkpoint is a collective (every rank joins the save)
    zero_stage: int | None = None

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ---- building --------------------------------------------------------------------------------

    def build_context(self):
        """The context in which the pipeline is built (ZeRO-3: outside transformers' partitioned init)."""
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module, optimizer, config):
        """``(model, optimizer)`` wrapped for training (``config``: the trainer's, for what the strategy reads)."""
        return self.accelerator.prepare(model, optimizer)

    def prepare_reference(self, reference):
        """The frozen KL reference module laid out as the trained model is (FSDP2: sharded the same way)."""
        return reference

    # ---- one optimizer step ------------------------------------------------------------------------

    def accumulating(self, model, sync: bool):
        """The context of a backward pass; ``sync``: the last pass of the optimizer step (DDP all-reduces then)."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(model)

    def backward(self, model, loss: torch.Tensor, *, sync: bool, finite: bool) -> None:
        self.accelerator.backward(loss)

    def clip(self, params: list[torch.Tensor], max_norm: float):
        return self.accelerator.clip_grad_norm_(params, max_norm)

    def step(self, model, params: list[torch.Tensor], max_norm: float, bad: bool) -> tuple[bool, Any]:
        """Clip the accumulated gradients; ``(skip, grad_norm)``: whether to skip the update (a non-finite
        loss or norm on any rank: skipped on all or on none, or the replicas drift apart)."""
        grad_norm = self.clip(params, max_norm)
        bad = bad or (grad_norm is not None and not math.isfinite(float(grad_norm)))
        if self.world > 1:
            flag = torch.tensor([float(bad)], device=self.accelerator.device)
            bad = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return bad, grad_norm

    # ---- this rank's tensors, whole tensors ------------------------------------------------------------

    def local(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor this rank updates in place for ``p`` (ZeRO-3: its partition; else ``p`` itself)."""
        return p

    def cut(self, full: torch.Tensor, param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full`` (a whole tensor of ``param``'s shape), laid out like ``like``."""
        return full

    def reshard(self, model: torch.nn.Module) -> None:
        """Before this rank's parts of ``model`` are written in place: drop what a forward left gathered."""

    def whole(self, tensors: dict[str, torch.Tensor], params=None) -> dict[str, torch.Tensor]:
        """``tensors`` as whole tensors, on the main process (the others get ``{}`` under a partitioning
        strategy: a collective, one tensor at a time). ``params``: the parameters whose parts ``tensors``
        are (the EMA) where they are not the parameters themselves."""
        return {n: t.detach() for n, t in tensors.items()}

    def optimizer_state(self, optimizer, trained: list[torch.Tensor]) -> dict[str, Any]:
        """The optimizer's state dict in the single-process format (main process; others: ``{}``)."""
        return optimizer.state_dict()

    # ---- loading a checkpoint (every rank reads the same whole tensors) -----------------------------------

    def load_weights(self, target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, t in target.items():
                t.copy_(self.cut(weights[n].to(t.device, t.dtype), t, t))

    def load_optimizer_state(self, optimizer, trained: list[torch.Tensor], state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


class FSDP2(DataParallel):
    """FSDP2: parameters, their EMA and the optimizer's moments are DTensor shards."""

    name = "FSDP"
    partitioned = True
    collective_checkpoint = True

    def prepare_reference(self, reference):
        if isinstance(reference, torch.nn.Module):
            from accelerate.utils import fsdp2_prepare_model  # noqa: PLC0415

            return fsdp2_prepare_model(self.accelerator, reference)
        return reference

    def clip(self, params, max_norm):
        return fsdp.clip_grad_norm(self.accelerator, params, max_norm)

    def cut(self, full, param, like):
        return fsdp.shard_like(full, like)

    def reshard(self, model):
        fsdp.reshard(model)

    def whole(self, tensors, params=None):
        out = {}
        for n, t in tensors.items():  # one tensor at a time: never the whole model gathered on a device
            full = fsdp.full_tensor(t.detach())
            if self.is_main:
                out[n] = full.cpu()
        return out

    def optimizer_state(self, optimizer, trained):
        return fsdp.full_optimizer_state(optimizer, keep=self.is_main)

    def load_optimizer_state(self, optimizer, trained, state):
        optimizer.load_state_dict(fsdp.sharded_optimizer_state(optimizer, state))


class ZeRO(DataParallel):
    """DeepSpeed ZeRO 1-3: the trainer drives the engine (boundaries, steps, skipped steps)."""

    collective_checkpoint = True  # (the optimizer's flat partitions are reassembled, every stage)

    def __init__(self, accelerator, stage: int):
        super().__init__(accelerator)
        self.zero_stage = stage
        self.name = f"ZeRO-{stage}"
        self.partitioned = stage == 3

    def build_context(self):
        return ds.plain_init() if self.partitioned else contextlib.nullcontext()

    def prepare(self, model, optimizer, config):
        ds.configure(self.accelerator, config)  # clipping and batch entries of the DeepSpeed config
        return self.accelerator.prepare(model, optimizer)

    def accumulating(self, model, sync):
        return contextlib.nullcontext()  # (the boundary flag of ds.backward)

    def backward(self, model, loss, *, sync, finite):
        ds.backward(model, loss, boundary=sync, finite=finite)

    def step(self, model, params, max_norm, bad):
        applied, grad_norm = ds.step(model)  # the engine clips and steps, or skips on every rank
        return not applied, grad_norm

    def local(self, p):
        return ds.local(p)

    def cut(self, full, param, like):
        return ds.cut(full, param, like) if ds.partitioned(param) else full

    def reshard(self, model):
        if self.partitioned:
            ds.release(model)

    def whole(self, tensors, params=None):
        if not self.partitioned:
            return super().whole(tensors)
        out = {}
        for n, t in tensors.items():
            if params is not None:
                full = ds.gather(params[n], t)
            else:
                full = ds.gather(t) if ds.partitioned(t) else t.detach()  # (buffers are whole)
            if self.is_main:
                out[n] = full.cpu()
        return out

    def optimizer_state(self, optimizer, trained):
        return ds.full_optimizer_state(optimizer, trained, keep=self.is_main)

    def load_weights(self, target, weights):
        ds.load_weights(target, weights)  # (and ZeRO's float32 master copy)

    def load_optimizer_state(self, optimizer, trained, state):
        ds.load_optimizer_state(optimizer, trained, state)


def parallel_for(accelerator) -> DataParallel:
    """The strategy ``accelerator`` runs (raises for FSDP1 and the ZeRO options the trainers refuse)."""
    stage = ds.zero_stage(accelerator)
    if stage is not None:
        return ZeRO(accelerator, stage)
    if fsdp.uses_fsdp2(accelerator):
        return FSDP2(accelerator)
    return DataParallel(accelerator)

"""What the trainers need to know about DeepSpeed (through accelerate), in one place.

Supported: ZeRO stages 1 and 2. The parameters stay whole on every rank (the pipeline's own denoiser
keeps working for sampling, the EMA reads them as they are); what is partitioned is the optimizer's
float32 master weights and moments (stage 1) and the reduced gradients (stage 2). Refused: stage 0
(plain data parallel: run without DeepSpeed), stage 3 (the parameters themselves are partitioned,
which the sampler, the EMA and the checkpoints do not handle; use FSDP2 to shard the model) and
CPU/NVMe offload (it swaps in DeepSpeed's own optimizer, bypassing the LR schedule, and needs the
accumulation count up front).

accelerate's own loop does not fit the trainers: its ``backward()`` steps the engine after every
backward pass, while the trainers take many passes per optimizer step (minibatches x timesteps),
scale each pass themselves, and skip non-finite updates. So the trainers drive the engine directly:

* :func:`backward` marks each pass as inside or at the end of an accumulation (the engine's
  ``set_gradient_accumulation_boundary``, the counterpart of DDP's ``no_sync``) and passes
  ``scale_wrt_gas=False`` (the loss is already divided by the passes of the step);
* :func:`step` at the boundary: the engine clips (``gradient_clipping`` is set to ``max_grad_norm``
  by :func:`configure`), steps and zeroes the gradients, or, when the global gradient norm is not
  finite, skips the step on every rank alike and leaves weights and moments untouched. A
  non-finite loss poisons its gradient (:func:`backward`) so that it is skipped the same way.
* The LR schedule stays the trainer's ``LambdaLR`` on the torch optimizer that ZeRO wraps (ZeRO
  reads its ``lr`` at every step), stepped only after an applied step, as in a single-process run.
* Checkpoints hold the single-process format: the full trained tensors (the parameters, whole on
  every rank, as the sampler and ``ema_weights()`` see them) and a per-parameter optimizer state
  dict. ZeRO keeps the moments as one flat float32 partition per parameter group and rank; :func:`full_optimizer_state` reassembles them (a collective) and
  :func:`load_optimizer_state` cuts a full state back into this rank's partition. Loaded weights
  are written to the parameters and to ZeRO's float32 master copy (:func:`load_weights`), which is
  what the next step starts from.

Mixed precision under DeepSpeed is DeepSpeed's (its ``bf16``/``fp16`` config, which accelerate fills
from the trainer's ``mixed_precision``): the denoiser is cast to bf16 and ZeRO keeps float32 master
weights; the checkpoints then hold the bf16 parameters. Tested only in float32, on CPU processes.

``import deepspeed`` happens only here, and only when accelerate runs DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["zero_stage", "configure", "backward", "step", "load_weights", "full_optimizer_state",
           "load_optimizer_state", "torch_optimizer"]


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage when ``accelerator`` runs DeepSpeed (None otherwise); raises for the stages and
    options the trainers do not support."""
    from accelerate.utils import DistributedType  # noqa: PLC0415

    if getattr(accelerator, "distributed_type", None) != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    stage = int(zero.get("stage", plugin.zero_stage if plugin.zero_stage is not None else 0))
    if stage not in (1, 2):
        what = ("ZeRO stage 3 partitions the parameters themselves, which the sampler, the EMA and the checkpoints "
                "do not handle" if stage == 3 else f"ZeRO stage {stage} is plain data parallel: run without DeepSpeed")
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported by the diffrl trainers ({what}); supported: "
                         "DeepSpeed ZeRO stages 1 and 2, or FSDP2 (fsdp_version: 2) to shard the model")
    for key in ("offload_optimizer", "offload_param"):
        if str(zero.get(key, {}).get("device", "none")).lower() not in ("none", "auto"):
            raise ValueError(f"DeepSpeed zero_optimization.{key} is not supported by the diffrl trainers (offload "
                             "replaces the optimizer by DeepSpeed's, outside the trainer's LR schedule)")
    return stage


def _set(config: dict, key: str, value, what: str) -> None:
    """Fill ``config[key]`` (absent or ``auto``) with the trainer's ``value``; a different explicit value
    would silently change the run, so it is an error."""
    have = config.get(key, "auto")
    if have == "auto":
        config[key] = value
    elif have != value:
        raise ValueError(f"the DeepSpeed config has {key}={have!r} but the diffrl config implies {value!r} ({what}); "
                         f"set {key}: auto (or leave it out) in the DeepSpeed config")


def configure(accelerator, config) -> None:
    """Before ``accelerator.prepare``: the entries of the DeepSpeed config that the trainer decides."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    _set(ds, "gradient_clipping", float(config.max_grad_norm), "max_grad_norm")
    # the engine never derives an accumulation boundary or a loss scale from these two: backward()
    # marks the boundaries and the loss is scaled by the trainer. They only have to be consistent
    # (train_batch_size = micro batch x accumulation x processes, which accelerate fills in).
    _set(ds, "train_micro_batch_size_per_gpu", int(config.train_batch_size), "train_batch_size")
    if ds.get("gradient_accumulation_steps", "auto") == "auto":
        ds["gradient_accumulation_steps"] = 1
    if ds.get("bf16", {}).get("enabled") in (True, "true"):
        # bf16 skips no non-finite step by default; the trainers' contract is to skip it
        ds["bf16"].setdefault("check_grad_overflow", True)


def backward(engine, loss: torch.Tensor, *, boundary: bool, finite: bool) -> None:
    """One backward pass of ``loss`` (already scaled by the trainer). ``boundary``: the last pass of the
    optimizer step (the engine reduces the accumulated gradients then). ``finite``: whether the
    (unscaled) loss was finite; if not, the gradient is made NaN, so that :func:`step` skips the
    update on every rank (even where the loss was non-finite but its gradient happened to be finite)."""
    engine.set_gradient_accumulation_boundary(boundary)
    if not finite:
        loss = loss * float("nan")
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> tuple[bool, float]:
    """The optimizer step at the accumulation boundary: ``(applied, grad_norm)``, the norm before
    clipping (inf for a skipped step). Every rank gets the same answer (the norm is global)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return bool(engine.was_step_applied()), float(norm) if norm is not None else float("nan")


def torch_optimizer(optimizer):
    """The ``torch.optim.Optimizer`` inside accelerate's and DeepSpeed's wrappers (the one whose
    ``param_groups`` hold the learning rate that each step reads)."""
    while hasattr(optimizer, "optimizer"):  # (accelerate's wrapper is a torch Optimizer itself)
        optimizer = optimizer.optimizer
    return optimizer


def _zero_params(optimizer) -> list[list[torch.nn.Parameter]]:
    """The model parameters of each ZeRO parameter group (in the order of the optimizer built by the trainer)."""
    zero = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # accelerate's wrapper
    return zero.bit16_groups


def load_weights(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """Write full tensors into the trained parameters and into this rank's part of ZeRO's float32 master
    copy (otherwise the next step would start from the master weights of before the load)."""
    from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415

    with torch.no_grad():
        for n, p in params.items():
            full = weights[n].to(p.device)
            p.copy_(full.to(p.dtype))
            safe_set_full_fp32_param(p, full.float())


def _fragments(p):
    """(slice of ``p.flatten()``, slice of its group's flat partition) held by this rank, or None."""
    m = getattr(p, "_hp_mapping", None)
    if m is None:
        return None
    lp, hp = m.lp_fragment_address, m.get_hp_fragment_address()
    return slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel)


def full_optimizer_state(optimizer, keep: bool = True) -> dict[str, Any]:
    """The state dict of an unpartitioned torch optimizer over the trained parameters (indices in the
    order the trainer gave them), assembled from ZeRO's flat partitions: every rank adds its fragments
    to zero tensors and they are summed across ranks (a collective). ``keep=False``: joins, returns {}."""
    import torch.distributed as dist  # noqa: PLC0415

    base = torch_optimizer(optimizer)
    sd = base.state_dict()
    state: dict[int, dict[str, Any]] = {}
    idx = 0
    for g, params in enumerate(_zero_params(optimizer)):
        flat = base.param_groups[g]["params"][0]
        flat_state = base.state.get(flat, {})
        for p in params:
            row = {}
            for k, v in flat_state.items():
                if isinstance(v, torch.Tensor) and v.shape == flat.shape:
                    full = torch.zeros(p.numel(), dtype=v.dtype, device=v.device)
                    fr = _fragments(p)
                    if fr is not None:
                        full[fr[0]] = v[fr[1]]
                    dist.all_reduce(full)
                    row[k] = full.view(p.shape).cpu()
                else:  # the step count: one per group, the same for each of its parameters
                    row[k] = v.clone().cpu() if isinstance(v, torch.Tensor) else v
            if row and keep:
                state[idx] = row
            idx += 1
    if not keep:
        return {}
    groups = []
    first = 0
    for g, params in zip(sd["param_groups"], _zero_params(optimizer)):
        groups.append({**g, "params": list(range(first, first + len(params)))})
        first += len(params)
    return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer, sd: dict[str, Any]) -> None:
    """Load an unpartitioned state dict (:func:`full_optimizer_state`, or a single-process run's): the
    hyperparameters of each group, and the moments cut into this rank's flat partitions."""
    base = torch_optimizer(optimizer)
    zparams = _zero_params(optimizer)
    if len(sd["param_groups"]) != len(zparams) or any(
            len(g["params"]) != len(ps) for g, ps in zip(sd["param_groups"], zparams)):
        raise ValueError("the checkpoint's optimizer state does not match the trained parameters")
    for g, saved in zip(base.param_groups, sd["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
    for g, params in enumerate(zparams):
        flat = base.param_groups[g]["params"][0]
        rows = [sd["state"].get(i, sd["state"].get(str(i))) for i in sd["param_groups"][g]["params"]]
        if all(r is None for r in rows):
            continue  # no step taken yet
        st: dict[str, Any] = {}
        for p, row in zip(params, rows):
            for k, v in (row or {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    buf = st.setdefault(k, torch.zeros_like(flat))
                    fr = _fragments(p)
                    if fr is not None:
                        buf[fr[1]] = v.reshape(-1)[fr[0]].to(buf.device, buf.dtype)
                else:
                    st.setdefault(k, v.clone() if isinstance(v, torch.Tensor) else v)
        base.state[flat] = st

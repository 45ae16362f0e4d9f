"""What the trainers need to know about DeepSpeed (through accelerate), in one place.

Supported: ZeRO stages 1, 2 and 3. Stages 1 and 2 partition the optimizer's float32 master weights and
moments (1) and the reduced gradients (2); the parameters stay whole on every rank, so the pipeline's
own denoiser samples as it is and the EMA reads them as they are. Stage 3 partitions the parameters
themselves; ``deepspeed.initialize`` converts them in place and hooks the denoiser's modules so that
each forward gathers them, so the pipeline's denoiser still samples, but (as under FSDP2):

* every rank must make the same model calls (each gathers: a collective): ``prompts_per_epoch`` must
  be a multiple of the number of processes, and grids are sampled on every rank;
* a parameter's data is empty between forwards; this rank's partition is ``p.ds_tensor``
  (:func:`local`). The EMA is kept per partition, checkpoints gather one tensor at a time
  (:func:`gather`), a resume cuts full tensors into the partitions, ZeRO-3's float32 master copy and
  moments included (:func:`cut`);
* small parameters stay gathered after a forward (``stage3_param_persistence_threshold``): before
  partitions are written in place (EMA swap, resume) those copies are dropped (:func:`release`);
* the KL reference of full fine-tuning (a frozen copy of the initial denoiser) stays a whole module on
  every process; of LoRA it is the partitioned model itself with its adapters off;
* transformers would build the pipeline's text encoders partitioned (accelerate registers the ZeRO-3
  config with it): the pipeline is loaded outside that registration (:func:`plain_init`).

Refused: stage 0 (plain data parallel: run without DeepSpeed) and CPU/NVMe offload (it swaps in
DeepSpeed's own optimizer, bypassing the LR schedule, and needs the accumulation count up front).

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
* Checkpoints hold the single-process format: the full trained tensors (the parameters as the
  sampler and ``ema_weights()`` see them) and a per-parameter optimizer state dict. ZeRO keeps the
  moments as one flat float32 partition per parameter group (ZeRO-3: per sub-group) and rank;
  :func:`full_optimizer_state` reassembles them (a collective) and :func:`load_optimizer_state` cuts
  a full state back into this rank's partitions. Loaded weights are written to the parameters and to
  ZeRO's float32 master copy (:func:`load_weights`), which is what the next step starts from.

Mixed precision under DeepSpeed is DeepSpeed's (its ``bf16``/``fp16`` config, which accelerate fills
from the trainer's ``mixed_precision``): the denoiser is cast to bf16 and ZeRO keeps float32 master
weights; the checkpoints then hold the bf16 parameters. Tested only in float32, on CPU processes.

``import deepspeed`` happens only here, and only when accelerate runs DeepSpeed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["zero_stage", "configure", "backward", "step", "load_weights", "full_optimizer_state",
           "load_optimizer_state", "torch_optimizer", "partitioned", "local", "gather", "cut", "release", "plain_init"]


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage when ``accelerator`` runs DeepSpeed (None otherwise); raises for the stages and
    options the trainers do not support."""
    from accelerate.utils import DistributedType  # noqa: PLC0415

    if getattr(accelerator, "distributed_type", None) != DistributedType.DEEPSPEED:
        return None
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    stage = int(zero.get("stage", plugin.zero_stage if plugin.zero_stage is not None else 0))
    if stage not in (1, 2, 3):
        what = "plain data parallel: run without DeepSpeed" if stage == 0 else "no such stage"
        raise ValueError(f"DeepSpeed ZeRO stage {stage} is not supported by the diffrl trainers ({what}); supported: "
                         "DeepSpeed ZeRO stages 1, 2 and 3")
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
    zero = ds.get("zero_optimization", {})
    # accelerate derives these three from the model's config.hidden_size, which diffusers models lack
    # (it raises): DeepSpeed's own defaults instead
    for key, value in (("reduce_bucket_size", 500_000_000), ("stage3_prefetch_bucket_size", 50_000_000),
                       ("stage3_param_persistence_threshold", 100_000)):
        if zero.get(key) == "auto":
            zero[key] = value
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


def load_weights(tensors: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Write full tensors into the model's ``tensors`` (parameters by name, as ``state_dict(keep_vars=True)``
    gives them, and buffers), and for trained parameters into this rank's part of ZeRO's float32 master
    copy (otherwise the next step would start from the master weights of before the load). ZeRO-3: into
    the partitions (after :func:`release`)."""
    from deepspeed.utils import safe_set_full_fp32_param  # noqa: PLC0415

    with torch.no_grad():
        for n, p in tensors.items():
            full = weights[n].to(p.device)
            if partitioned(p):
                p.ds_tensor.copy_(cut(full, p, p.ds_tensor))
                if p.requires_grad:
                    master = _fp32_partition(p)
                    master.copy_(cut(full, p, master))
                continue
            p.copy_(full.to(p.dtype))
            if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                safe_set_full_fp32_param(p, full.float())


def _fragments(p):
    """(slice of ``p.flatten()``, slice of its group's flat partition) held by this rank, or None."""
    m = getattr(p, "_hp_mapping", None)
    if m is None:
        return None
    lp, hp = m.lp_fragment_address, m.get_hp_fragment_address()
    return slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel)


def full_optimizer_state(optimizer, trained: list[torch.nn.Parameter], keep: bool = True) -> dict[str, Any]:
    """The state dict of an unpartitioned torch optimizer over the trained parameters ``trained`` (in the
    order the trainer gave them to the optimizer), assembled from ZeRO's flat partitions (a collective:
    ZeRO-1/2 sum every rank's fragments, ZeRO-3 gathers each parameter's partitions). ``keep=False``:
    joins, returns {}."""
    import torch.distributed as dist  # noqa: PLC0415

    if _is_zero3(optimizer):
        return _full_optimizer_state3(optimizer, trained, keep)

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


def load_optimizer_state(optimizer, trained: list[torch.nn.Parameter], sd: dict[str, Any]) -> None:
    """Load an unpartitioned state dict (:func:`full_optimizer_state`, or a single-process run's) over the
    trained parameters ``trained``: the hyperparameters of each group, and the moments cut into this rank's flat
    partitions."""
    if _is_zero3(optimizer):
        _load_optimizer_state3(optimizer, trained, sd)
        return
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


# ---- ZeRO-3: partitioned parameters ---------------------------------------------------------------
#
# deepspeed.initialize converts the denoiser's parameters in place (same Parameter objects, so the
# trainer's ``trainable`` dict stays valid): ``p.data`` is empty (shape [0]) except while a forward
# hook has gathered it, ``p.ds_shape`` / ``p.ds_numel`` are the full shape and size, and ``p.ds_tensor``
# is this rank's partition: rank r holds elements [r n, (r + 1) n) of the flattened tensor, n =
# ``p.partition_numel()``, the last partition zero-padded. ZeRO-3's float32 master weights and Adam
# moments use the same layout, inside one flat tensor per sub-group. Everything below reads and writes
# these partitions directly (no GatheredParameters around whole modules: one tensor is gathered at a time).


def partitioned(t) -> bool:
    """Whether ``t`` is a ZeRO-3 parameter (its data is partitioned across the ranks)."""
    return hasattr(t, "ds_id")


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's flat partition of a ZeRO-3 parameter (its up-to-date value, whether or not a forward
    has gathered it); any other tensor as it is. The EMA of a ZeRO-3 run is kept in this layout."""
    return p.ds_tensor if partitioned(p) else p


def gather(p: torch.Tensor, part: torch.Tensor | None = None) -> torch.Tensor:
    """The full tensor of ZeRO-3 parameter ``p`` (or of ``part``, a partition in ``p``'s layout such as
    its EMA or an optimizer moment), on every rank: an all-gather, which every rank must join."""
    import torch.distributed as dist  # noqa: PLC0415

    part = (p.ds_tensor if part is None else part).detach().contiguous()
    group = p.ds_process_group
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, part, group=group)  # (all_gather of a list: also on gloo)
    return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)


def cut(full: torch.Tensor, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's partition of ``full`` (a tensor of ZeRO-3 parameter ``p``'s shape), in ``like``'s dtype
    and device, zero-padded; no communication (every rank holds the same ``full``)."""
    import torch.distributed as dist  # noqa: PLC0415

    n = p.partition_numel()
    start = dist.get_rank(p.ds_process_group) * n
    flat = full.reshape(-1)[start:start + n]
    out = torch.zeros(n, dtype=like.dtype, device=like.device)
    out[:flat.numel()] = flat.to(like.device, like.dtype)
    return out


def release(module: torch.nn.Module) -> None:
    """Free the gathered copies of ``module``'s ZeRO-3 parameters (those small enough to stay gathered
    after a forward, ``stage3_param_persistence_threshold``), so that the next forward gathers the
    partitions again: before partitions are written in place (EMA swap, resume). Local, no communication."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: PLC0415

    ready = [p for p in module.parameters() if partitioned(p) and p.ds_status == ZeroParamStatus.AVAILABLE]
    if ready:  # (ds_tensor already holds the values: nothing is copied back, the full copies are dropped)
        ready[0].partition(param_list=ready, has_been_updated=False)


def _fp32_partition(p, key: str | None = None) -> torch.Tensor:
    """View of this rank's partition of ``p`` in ZeRO-3's float32 master weights (``key`` None) or in the
    optimizer state ``key`` of its sub-group's flat tensor (the lookup safe_get_full_* use; their setters
    narrow the full tensor without padding, which fails on the last rank when the size does not divide)."""
    return p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)[0]


def _flat_of(p) -> torch.Tensor:
    """The float32 flat tensor (the torch optimizer's parameter) of ``p``'s ZeRO-3 sub-group."""
    z = p._z3_optimizer
    return z.fp32_partitioned_groups_flat[z.grad_position[z.get_param_id(p)][0]]


def _is_zero3(optimizer) -> bool:
    zero = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer  # accelerate's wrapper
    return hasattr(zero, "fp32_partitioned_groups_flat")


def _full_optimizer_state3(optimizer, params: list[torch.nn.Parameter], keep: bool) -> dict[str, Any]:
    base = torch_optimizer(optimizer)
    if len(base.param_groups) != 1:
        raise ValueError("ZeRO-3 checkpoints support one optimizer parameter group (the trainers build one)")
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):  # one parameter at a time: never the whole state gathered
        flat = _flat_of(p)
        row = {}
        for k, v in base.state.get(flat, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == flat.shape:
                row[k] = gather(p, _fp32_partition(p, k)).cpu()
            else:  # the step count: one per sub-group, the same for each of its parameters
                row[k] = v.clone().cpu() if isinstance(v, torch.Tensor) else v
        if row and keep:
            state[i] = row
    if not keep:
        return {}
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(params)))}]}


def _load_optimizer_state3(optimizer, params: list[torch.nn.Parameter], sd: dict[str, Any]) -> None:
    base = torch_optimizer(optimizer)
    if len(sd["param_groups"]) != 1 or len(sd["param_groups"][0]["params"]) != len(params):
        raise ValueError("the checkpoint's optimizer state does not match the trained parameters")
    base.param_groups[0].update({k: v for k, v in sd["param_groups"][0].items() if k != "params"})
    for i, p in enumerate(params):
        row = sd["state"].get(i, sd["state"].get(str(i)))
        if row is None:
            continue  # no step taken yet
        flat = _flat_of(p)
        st = base.state.setdefault(flat, {})  # a fresh engine has no state yet: moments made here
        for k, v in row.items():
            if isinstance(v, torch.Tensor) and v.shape == p.ds_shape:
                if k not in st:
                    st[k] = torch.zeros_like(flat)
                part = _fp32_partition(p, k)
                part.copy_(cut(v, p, part))
            else:
                st[k] = v.clone() if isinstance(v, torch.Tensor) else v


@contextlib.contextmanager
def plain_init():
    """A context in which models are built whole. Under a ZeRO-3 config accelerate registers it with
    transformers (``HfDeepSpeedConfig``; also with ``zero3_init_flag`` off), and transformers then builds
    its models partitioned (``deepspeed.zero.Init``): the pipeline's frozen text encoders would be left
    partitioned without the hooks that gather them for a forward. The trainer partitions only the
    denoiser, through ``accelerator.prepare``; the registration is restored after the block."""
    try:
        from transformers.integrations import deepspeed as hf_ds  # noqa: PLC0415
    except ImportError:
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref  # (what unset_hf_deepspeed_config() clears)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved

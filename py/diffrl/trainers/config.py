"""Trainer configurations: dataclasses, loadable from YAML and overridable from the command line.

A config file is a flat YAML mapping of field names to values (a field that is itself a mapping,
such as ``reward``, is given as a nested mapping). Command-line overrides are ``key=value`` or
``--key value`` pairs; a nested entry is addressed with a dot (``reward.weights.jpeg=0.5``). Values
are parsed as YAML and then coerced to the field's declared type, so ``lr=1e-4`` is a float and
``sde_window=[0,4]`` a list. Unknown keys are errors that name the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "GRPOConfig", "NFTConfig", "DDPOConfig", "DPOConfig", "load_config", "apply_overrides",
           "config_to_dict"]


ADVANTAGES = ("group", "win_rate", "dense")  # GRPOConfig.advantage (diffrl.trainers.advantage)
AGGREGATIONS = ("sum", "per_reward")        # GRPOConfig.reward_aggregation
WINDOW_MOVES = ("fixed", "random", "slide")  # GRPOConfig.sde_window_move


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"config: {msg}")


@dataclass
class TrainConfig:
    """Fields shared by every trainer."""

    # model and sampling
    pretrained: str = ""                 # a diffusers folder or hub id (or a preset's built-in model)
    prompts: list[str] = field(default_factory=list)  # training prompts (or prompts_file)
    prompts_file: str = ""               # one prompt per line (.jsonl: {"prompt": ..., <metadata>} per line)
    eval_prompts: list[str] = field(default_factory=list)  # fixed held-out prompts: image grid and eval/reward
    eval_prompts_file: str = ""          # more eval prompts, as prompts_file
    num_inference_steps: int = 10
    guidance_scale: float = 4.5
    resolution: int = 512
    # one epoch = prompts_per_epoch prompts x group_size images
    epochs: int = 10
    max_minutes: float = 0.0             # stop after the epoch that passes this wall time (0: no limit)
    prompts_per_epoch: int = 8
    group_size: int = 4
    sample_batch_size: int = 8           # images per sampler call
    same_initial_noise: bool = False     # a group's images start from one initial latent (DanceGRPO)
    share_prefix: bool = False           # with same_initial_noise: the steps before the first stochastic one
                                         # run once per prompt, the group branches there (Flow-GRPO-Fast)
    # PPO
    inner_epochs: int = 1
    train_batch_size: int = 4            # samples per optimiser minibatch
    gradient_accumulation_steps: int = 1  # minibatches per optimiser step (their mean gradient)
    timestep_fraction: float = 1.0       # fraction of the recorded steps trained on, per sample
    clip_range: float = 1e-4
    kl_coef: float = 0.0                 # KL to the reference policy (adapters disabled)
    adv_clip: float = 5.0
    adv_std: str = "group"               # group | global | none
    lr: float = 3e-4
    lr_scheduler: str = "constant"       # constant | linear | cosine (to 0 over the optimiser steps of `epochs`)
    lr_warmup_steps: int = 0             # optimiser steps of linear warm-up to lr
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    # what is trained
    use_lora: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=list)  # empty: the family's default
    mixed_precision: str = "no"          # no | fp16 | bf16
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0               # 0: no EMA of the trained weights
    # reward: a name, or names with weights; kwargs per reward under reward_kwargs
    reward: dict[str, float] = field(default_factory=lambda: {"jpeg_incompressibility": 1.0})
    reward_kwargs: dict[str, dict] = field(default_factory=dict)
    # bookkeeping
    seed: int = 0
    output_dir: str = "runs/diffrl"
    save_every: int = 1                  # epochs between checkpoints
    keep_last: int = 2                   # checkpoints kept
    eval_every: int = 0                  # epochs between evaluations of eval_prompts (0: never)
    overlap_scoring: bool = False        # score each sampler call's images while the next one samples
    max_nonfinite: int = 3               # consecutive non-finite epochs before stopping
    log_with: list[str] = field(default_factory=list)  # tensorboard, wandb (when installed)
    device: str = "auto"                 # auto | cpu | cuda

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the first key with a bad value (each config class checks its own keys)."""
        _need(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        _need(self.group_size >= 2,
              f"group_size must be >= 2 (advantages compare images of a prompt), got {self.group_size}")
        _need(self.prompts_per_epoch >= 1, "prompts_per_epoch must be >= 1")
        _need(self.num_inference_steps >= 1, "num_inference_steps must be >= 1")
        _need(0 < self.timestep_fraction <= 1, f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        _need(self.train_batch_size >= 1 and self.sample_batch_size >= 1, "batch sizes must be >= 1")
        _need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
        _need(self.inner_epochs >= 1, f"inner_epochs must be >= 1, got {self.inner_epochs}")
        _need(self.lr_scheduler in ("constant", "linear", "cosine"),
              f"lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")
        _need(self.lr_warmup_steps >= 0, f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        _need(not self.share_prefix or self.same_initial_noise,
              "share_prefix needs same_initial_noise: true (a group shares its prefix only from one start)")
        _need(self.clip_range > 0, "clip_range must be > 0")
        _need(self.kl_coef >= 0, "kl_coef must be >= 0")
        _need(self.adv_std in ("group", "global", "none"),
              f"adv_std must be group, global or none, got {self.adv_std!r}")
        _need(self.mixed_precision in ("no", "fp16", "bf16"),
              f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        _need(0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)")
        _need(self.keep_last >= 1, "keep_last must be >= 1")
        _need(self.max_nonfinite >= 1, "max_nonfinite must be >= 1")
        _need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        _need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"unknown device {self.device!r}")
        _need(len(self.reward) >= 1, "reward must name at least one reward")
        _need(all(n in ("tensorboard", "wandb") for n in self.log_with),
              f"log_with entries must be tensorboard or wandb, got {list(self.log_with)}")


@dataclass
class GRPOConfig(TrainConfig):
    """Flow-GRPO style: SDE sampling of a flow-matching model, group-normalised advantages."""

    noise_level: float = 0.7
    sde_type: str = "sde"                # sde | cps
    sde_window: list[int] = field(default_factory=list)  # [start, end) of stochastic steps; empty: all
    sde_window_move: str = "fixed"       # fixed | random (a start per epoch, Flow-GRPO-Fast) | slide (MixGRPO)
    sde_window_slide_every: int = 1      # slide: epochs per one-step move of the window (it wraps at the end)
    # advantages (diffrl.trainers.advantage)
    advantage: str = "group"             # group | win_rate (Pref-GRPO: win rate in the group, then normalised)
                                         # | dense (DenseGRPO: each step's reward gain, normalised per step)
    reward_aggregation: str = "sum"      # sum | per_reward (each reward normalised in its group, then summed)
    step_weights: list[float] = field(default_factory=list)  # PPO: the advantage's weight at each trained step
                                         # (one per recorded step; empty: 1)
    grpo_guard: bool = False             # GRPO-Guard: re-centred, re-scaled step ratios and 1/|dt| step weights

    def validate(self) -> None:
        super().validate()
        _need(self.advantage in ADVANTAGES, f"advantage must be one of {', '.join(ADVANTAGES)}, got {self.advantage!r}")
        _need(self.reward_aggregation in AGGREGATIONS,
              f"reward_aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.reward_aggregation!r}")
        _need(all(math.isfinite(w) for w in self.step_weights),
              f"step_weights must be finite, got {list(self.step_weights)}")
        _need(self.advantage != "dense" or self.reward_aggregation == "sum",
              "advantage: dense takes reward_aggregation: sum (one reward gain per step)")
        _need(self.sde_type in ("sde", "cps"), f"sde_type must be sde or cps, got {self.sde_type!r}")
        _need(self.noise_level >= 0, "noise_level must be >= 0")
        _need(len(self.sde_window) in (0, 2), f"sde_window must be [start, end] or empty, got {self.sde_window}")
        if self.sde_window:
            a, b = self.sde_window
            _need(0 <= a < b <= self.num_inference_steps,
                  f"sde_window {self.sde_window} must satisfy 0 <= start < end <= num_inference_steps")
        _need(self.sde_window_move in WINDOW_MOVES,
              f"sde_window_move must be one of {', '.join(WINDOW_MOVES)}, got {self.sde_window_move!r}")
        _need(self.sde_window_move == "fixed" or bool(self.sde_window),
              f"sde_window_move: {self.sde_window_move} moves a window: set sde_window: [start, end] (its first "
              "position and size)")
        _need(self.sde_window_slide_every >= 1, f"sde_window_slide_every must be >= 1, got {self.sde_window_slide_every}")
        recorded = (self.sde_window[1] - self.sde_window[0]) if self.sde_window else self.num_inference_steps
        _need(not self.step_weights or len(self.step_weights) == recorded,
              f"step_weights needs one weight per recorded (stochastic) step: {recorded}, got {len(self.step_weights)}")


@dataclass
class NFTConfig(GRPOConfig):
    """Forward-process group-relative training (``NFTTrainer``): advantage-weighted flow matching on
    the sampled images; sampling is deterministic by default (no log-probs are needed). The PPO keys
    (``clip_range``, ``timestep_fraction``) do not apply; ``kl_coef`` must stay 0."""

    noise_level: float = 0.0
    nft_beta: float = 1.0                # how far the implicit positive / negative policies lie from the old one
    nft_adv_scale: float = 2.0           # advantage that counts as fully good: r = 0.5 + A / (2 nft_adv_scale)
    train_guided: bool = False           # train the CFG-guided velocity (as sampled) rather than the conditional
    nft_negative_weight: float = 1.0     # how hard the worse-than-average samples push away (0: they only
                                         # anchor the update to the sampling policy, a trust region)
    nft_group_noise: bool = False        # one noise level and draw per group (common random numbers: the
                                         # group's advantage-weighted sum then cancels the noise's part)
    nft_old_policy: str = "current"      # current: sample with the trained weights | ema: with an EMA of them
                                         # (DiffusionNFT's off-policy sampler, also the loss's 'old' policy)
    nft_old_decay: float = 0.5           # ema: old <- d old + (1 - d) trained, after each epoch's updates
    nft_old_decay_ramp: int = 0          # ema: d grows linearly from 0 to nft_old_decay over this many epochs

    def validate(self) -> None:
        super().validate()
        _need(self.nft_beta > 0, f"nft_beta must be > 0, got {self.nft_beta}")
        _need(self.nft_adv_scale > 0, f"nft_adv_scale must be > 0, got {self.nft_adv_scale}")
        _need(0.0 <= self.nft_negative_weight <= 1.0,
              f"nft_negative_weight must be in [0, 1], got {self.nft_negative_weight}")
        _need(self.kl_coef == 0, "kl_coef is not supported by the nft trainer (nft_beta bounds each update instead)")
        _need(not self.step_weights, "step_weights do not apply to the nft trainer (its loss has no sampling steps)")
        _need(not self.grpo_guard, "grpo_guard applies to the PPO objective (trainer grpo), not to nft")
        _need(self.advantage != "dense", "advantage: dense needs sampling steps to credit; the nft trainer has none "
                                         "(use group or win_rate)")
        _need(self.nft_old_policy in ("current", "ema"),
              f"nft_old_policy must be current or ema, got {self.nft_old_policy!r}")
        _need(0.0 <= self.nft_old_decay < 1.0, f"nft_old_decay must be in [0, 1), got {self.nft_old_decay}")
        _need(self.nft_old_decay_ramp >= 0, f"nft_old_decay_ramp must be >= 0, got {self.nft_old_decay_ramp}")


@dataclass
class DDPOConfig(TrainConfig):
    """DDPO: DDIM sampling with eta, per-prompt stat tracker for the advantages."""

    eta: float = 1.0
    use_tracker: bool = True
    tracker_buffer_size: int = 16
    tracker_min_count: int = 16
    clip_range: float = 1e-4

    def validate(self) -> None:
        super().validate()
        _need(self.eta >= 0, "eta must be >= 0")


@dataclass
class RewardBackpropConfig(TrainConfig):
    """Reward backpropagation (AlignProp / DRaFT): deterministic sampling with autograd on the last
    ``grad_steps`` steps, a differentiable reward, ``-reward`` as the loss. The PPO keys do not apply."""

    grad_steps: int = 1                  # DRaFT-K: steps with autograd (num_inference_steps: AlignProp's full chain)
    checkpoint_steps: bool = True        # recompute each differentiable step's model call in the backward
    draft_lv: int = 0                    # DRaFT-LV: re-noisings of the final latent stepped with autograd (0: off)

    def validate(self) -> None:
        super().validate()
        _need(1 <= self.grad_steps <= self.num_inference_steps,
              f"grad_steps must be in [1, num_inference_steps = {self.num_inference_steps}], got {self.grad_steps}")
        _need(self.draft_lv >= 0, f"draft_lv must be >= 0, got {self.draft_lv}")
        _need(self.draft_lv == 0 or self.grad_steps == 1, "draft_lv (DRaFT-LV) takes grad_steps: 1")
        _need(self.kl_coef == 0, "kl_coef is not supported by the reward_backprop trainer")


DPO_DATA = ("online", "offline")          # DPOConfig.dpo_data


@dataclass
class DPOConfig(TrainConfig):
    """Diffusion-DPO (``DPOTrainer``, docs/dpo.md): preference pairs, the frozen base model as the reference.

    ``dpo_beta`` is the official implementation's ``beta_dpo`` (errors are means over the latent's
    elements; its released SD1.5 and SDXL runs use 5000). ``dpo_data``: ``online`` = each epoch samples
    ``prompts_per_epoch`` prompts x ``group_size`` images of the trained model and pairs the best and the
    worst image of each group by the reward; ``offline`` = ``prompts_per_epoch`` pairs per epoch drawn from
    ``dpo_dataset`` (Pick-a-Pic layout: a folder with ``metadata.jsonl`` and image files, or parquet).
    The PPO keys (``clip_range``, ``timestep_fraction``, ``kl_coef``, advantages) do not apply."""

    dpo_beta: float = 5000.0
    dpo_data: str = "online"             # online | offline
    dpo_dataset: str = ""                # offline: a folder or a .parquet file in the Pick-a-Pic layout

    def validate(self) -> None:
        super().validate()
        _need(math.isfinite(self.dpo_beta) and self.dpo_beta > 0,
              f"dpo_beta must be finite and > 0, got {self.dpo_beta}")
        _need(self.dpo_data in DPO_DATA, f"dpo_data must be one of {', '.join(DPO_DATA)}, got {self.dpo_data!r}")
        _need(self.dpo_data != "offline" or bool(self.dpo_dataset),
              "dpo_data: offline needs dpo_dataset (a folder or a .parquet file in the Pick-a-Pic layout)")
        _need(self.kl_coef == 0, "kl_coef is not used by the dpo trainer (dpo_beta sets the pull to the reference)")


def config_to_dict(cfg) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known) -> KeyError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return KeyError(f"unknown config key {key!r}{hint}")


def _coerce(name: str, value, tp):
    """``value`` (parsed YAML) as the declared type ``tp``, or a ValueError naming the key."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return "" if value is None else str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            args = typing.get_args(tp)
            items = [_coerce(name, v, args[0] if args else Any) for v in value]
            if origin is tuple:
                if len(args) == 2 and args[1] is not Ellipsis and len(items) != 2:
                    raise ValueError
                return tuple(items)
            return items
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            kt, vt = typing.get_args(tp) or (Any, Any)
            return {_coerce(name, k, kt): _coerce(name, v, vt) for k, v in value.items()}
        return value
    except (TypeError, ValueError):
        raise ValueError(f"config key {name!r} expects {getattr(tp, '__name__', tp)}, got {value!r}") from None


def _parse_value(text: str):
    import yaml  # noqa: PLC0415

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _split_overrides(overrides) -> list[tuple[str, str]]:
    pairs, items, i = [], list(overrides), 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                key, val = key.split("=", 1)
            elif i + 1 < len(items):
                i += 1
                val = items[i]
            else:
                raise ValueError(f"override {item!r} has no value")
        elif "=" in item:
            key, val = item.split("=", 1)
        else:
            raise ValueError(f"override {item!r} is not key=value or --key value")
        pairs.append((key.replace("-", "_"), val))
        i += 1
    return pairs


def _set(data: dict, types: dict, key: str, value) -> None:
    top, _, rest = key.partition(".")
    if top not in types:
        raise _unknown(top, types)
    if rest:  # nested entry of a mapping field
        node = data.setdefault(top, {})
        if not isinstance(node, dict):
            raise ValueError(f"config key {top!r} is not a mapping, cannot set {key!r}")
        *path, leaf = rest.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    else:
        data[top] = value


def apply_overrides(cfg, overrides) -> Any:
    """A copy of ``cfg`` with ``key=value`` / ``--key value`` overrides applied and type-checked."""
    cls = type(cfg)
    types = _field_types(cls)
    data = config_to_dict(cfg)
    for key, text in _split_overrides(overrides):
        _set(data, types, key, _parse_value(text))
    return _build(cls, data, types)


def _build(cls, data: dict, types: dict):
    for key in data:
        if key not in types:
            raise _unknown(key, types)
    values = {k: _coerce(k, v, types[k]) for k, v in data.items()}
    return cls(**values)  # (validated by __post_init__)


def load_config(cls, path: str | Path | None = None, *, base=None, overrides=()) -> Any:
    """``cls`` built from ``base`` (a config or a dict; default: the defaults), then the YAML file at
    ``path``, then ``overrides``. Every value is type-checked and the result validated."""
    types = _field_types(cls)
    if base is None:
        data = config_to_dict(cls())
    elif isinstance(base, dict):
        data = config_to_dict(cls())
        for k, v in base.items():
            _set(data, types, k, v)
    else:
        data = config_to_dict(base)
    if path is not None:
        import yaml  # noqa: PLC0415

        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file is a YAML mapping of keys to values")
        for k, v in loaded.items():
            if k in types and isinstance(v, dict) and isinstance(data.get(k), dict):
                data[k] = v  # a mapping field given whole replaces the default
            else:
                _set(data, types, k, v)
    cfg = _build(cls, data, types)
    return apply_overrides(cfg, overrides) if overrides else cfg

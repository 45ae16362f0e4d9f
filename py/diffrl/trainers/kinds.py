"""The trainer kinds, declared once: a preset's ``trainer``, a config file's ``trainer:`` key, ``diffrl train
--trainer``. Importing this module imports no torch (the CLI builds its parser from it); the trainer
class is imported when it is asked for."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from diffrl.trainers.config import DDPOConfig, DPOConfig, GRPOConfig, NFTConfig, RewardBackpropConfig, TrainConfig

__all__ = ["TrainerKind", "KINDS", "get_kind"]


@dataclass(frozen=True)
class TrainerKind:
    name: str
    title: str                  # how the CLI and the demo name it
    config: type[TrainConfig]
    trainer_path: str           # "module:Class"

    @property
    def trainer(self) -> type:
        module, _, cls = self.trainer_path.partition(":")
        return getattr(importlib.import_module(module), cls)


KINDS: dict[str, TrainerKind] = {k.name: k for k in (
    TrainerKind("grpo", "GRPO (Flow-GRPO)", GRPOConfig,
                "diffrl.trainers.grpo:GRPOTrainer"),
    TrainerKind("nft", "NFT (forward-process GRPO)", NFTConfig, "diffrl.trainers.nft:NFTTrainer"),
    TrainerKind("ddpo", "DDPO", DDPOConfig, "diffrl.trainers.ddpo:DDPOTrainer"),
    TrainerKind("reward_backprop", "reward backprop (AlignProp / DRaFT)", RewardBackpropConfig,
                "diffrl.trainers.reward_backprop:RewardBackpropTrainer"),
    TrainerKind("dpo", "Diffusion-DPO", DPOConfig, "diffrl.trainers.dpo:DPOTrainer"),
)}


def get_kind(name: str) -> TrainerKind:
    if name not in KINDS:
        raise ValueError(f"trainer must be one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]


def kind_of(trainer_cls: type) -> str:
    """The kind of a trainer class: its own entry, or that of the nearest registered base class ("" if none)."""
    paths = {k.trainer_path: k.name for k in KINDS.values()}
    for c in trainer_cls.__mro__:
        name = paths.get(f"{c.__module__}:{c.__qualname__}")
        if name is not None:
            return name
    return ""

"""Trainers (GRPO, NFT, DDPO, Diffusion-DPO, reward backprop) and what they are built on: configs, atomic
checkpoints, metrics logs."""

from diffrl.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffrl.trainers.config import (DDPOConfig, DPOConfig, GRPOConfig, NFTConfig, RewardBackpropConfig, TrainConfig,
                                    apply_overrides, load_config)
from diffrl.trainers.metrics import MetricsLog

# the trainers import torch/diffusers machinery lazily; these names are cheap to import
from diffrl.trainers.base import BaseTrainer, NonFiniteError, load_pipeline  # noqa: E402
from diffrl.trainers.ddpo import DDPOTrainer  # noqa: E402
from diffrl.trainers.dpo import DPOTrainer  # noqa: E402
from diffrl.trainers.grpo import GRPOTrainer  # noqa: E402
from diffrl.trainers.nft import NFTTrainer  # noqa: E402
from diffrl.trainers.presets import PRESETS, get_preset  # noqa: E402
from diffrl.trainers.reward_backprop import RewardBackpropTrainer  # noqa: E402
from diffrl.trainers.rewards_factory import build_reward, build_rewards  # noqa: E402

from diffrl.trainers.kinds import KINDS, get_kind  # noqa: E402

# trainer kind (a preset's "trainer", a config file's ``trainer:`` key) -> (config class, trainer class)
TRAINER_CLASSES = {name: (k.config, k.trainer) for name, k in KINDS.items()}

__all__ = ["TrainConfig", "GRPOConfig", "NFTConfig", "DDPOConfig", "DPOConfig", "RewardBackpropConfig", "load_config",
           "apply_overrides", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "MetricsLog",
           "BaseTrainer", "GRPOTrainer", "NFTTrainer", "DDPOTrainer", "DPOTrainer", "RewardBackpropTrainer",
           "NonFiniteError", "load_pipeline",
           "PRESETS", "get_preset", "build_reward", "build_rewards", "TRAINER_CLASSES",
           "KINDS", "get_kind"]

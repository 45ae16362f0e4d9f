"""Trainers (GRPO, DDPO) and what they are built on: configs, atomic checkpoints, metrics logs."""

from diffrl.trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffrl.trainers.config import DDPOConfig, GRPOConfig, TrainConfig, apply_overrides, load_config
from diffrl.trainers.metrics import MetricsLog

__all__ = ["TrainConfig", "GRPOConfig", "DDPOConfig", "load_config", "apply_overrides", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "MetricsLog"]

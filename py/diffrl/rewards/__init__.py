"""Reward functions for RL fine-tuning: callables ``reward(images, prompts, group_ids=None)`` that return a
dict of float32 [B] tensors, with the training signal under "reward"."""

from diffrl.rewards.shapes import ShapesReward

__all__ = ["ShapesReward"]

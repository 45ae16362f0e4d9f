"""Reward functions for RL fine-tuning: callables ``reward(images, prompts, group_ids=None)`` that return a
dict of float32 [B] tensors, with the training signal under "reward". ``FrameWise`` scores videos with an
image reward; a reward whose signature takes ``condition_images`` also gets an editing family's input
images, one that takes ``metadata`` each image's per-prompt metadata (see ``diffrl.rewards.base``).
``RemoteReward`` is a reward served over HTTP by ``diffrl serve-reward``."""

from diffrl.rewards.base import (MultiReward, Reward, accepts_condition_images, accepts_metadata, call_reward,
                                 check_inputs, check_metadata)
from diffrl.rewards.clip import AestheticScore, CLIPScore, PickScore
from diffrl.rewards.colour import ColourTarget
from diffrl.rewards.frames import FrameWise
from diffrl.rewards.hps import HPSv2Score
from diffrl.rewards.image_reward import ImageRewardScore
from diffrl.rewards.jpeg import JpegCompressibility, JpegIncompressibility
from diffrl.rewards.remote import RemoteReward, RemoteRewardError
from diffrl.rewards.shapes import ShapesReward

__all__ = ["ShapesReward", "Reward", "MultiReward", "check_inputs", "JpegCompressibility", "JpegIncompressibility",
           "CLIPScore", "PickScore", "AestheticScore", "FrameWise", "accepts_condition_images", "ColourTarget",
           "RemoteReward", "RemoteRewardError", "check_metadata", "accepts_metadata", "call_reward"]
__all__ += ["HPSv2Score", "ImageRewardScore"]

"""diffrl's fused ops. Each has one plain-PyTorch reference (``diffrl.ops.reference``) that is its
spec and several backends selected in one place (``diffrl.ops._dispatch``)."""

from diffrl.ops._dispatch import backend_status, describe as backends
from diffrl.ops.advantages import group_advantages, win_rate
from diffrl.ops.attention import reward_attention
from diffrl.ops.dpo import diffusion_dpo_loss
from diffrl.ops.loss import grpo_loss
from diffrl.ops.sde import SDEStepOutput, sde_step

__all__ = ["sde_step", "SDEStepOutput", "group_advantages", "win_rate", "grpo_loss", "diffusion_dpo_loss", "backends",
           "backend_status", "reward_attention"]

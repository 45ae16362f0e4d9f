"""diffrl: fused kernels, samplers and trainers for reinforcement-learning fine-tuning of diffusion models."""

__version__ = "0.1.0"

from diffrl import ops, schedules  # noqa: E402
from diffrl.ops import SDEStepOutput, diffusion_dpo_loss, group_advantages, grpo_loss, sde_step, win_rate  # noqa: E402
from diffrl.schedules import StepCoeffs  # noqa: E402
from diffrl.tracker import PerPromptStatTracker  # noqa: E402

__all__ = ["__version__", "ops", "schedules", "sde_step", "SDEStepOutput", "StepCoeffs", "group_advantages",
           "win_rate", "grpo_loss", "diffusion_dpo_loss", "PerPromptStatTracker"]

"""diffrl's fused ops. Each has one plain-PyTorch reference (``diffrl.ops.reference``) that is its
spec and several backends selected in one place (``diffrl.ops._dispatch``)."""

from diffrl.ops._dispatch import backend_status, describe as backends
from diffrl.ops.sde import SDEStepOutput, sde_step

__all__ = ["sde_step", "SDEStepOutput", "backends", "backend_status"]

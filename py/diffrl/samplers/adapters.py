"""Compatibility module: the families now live in ``diffrl.samplers.families`` (one module per
family, the contract documented there) and the LoRA helpers in ``diffrl.samplers.lora``. Importing
this module imports every built-in family."""

from __future__ import annotations

from diffrl.samplers.families import (_REGISTRY, Adapter, _resolve, get_adapter, model_dtype,  # noqa: F401
                                      register_adapter, supported_pipelines)
from diffrl.samplers.families import quiet_transformers as _quiet_transformers  # noqa: F401
from diffrl.samplers.families.flux import FluxAdapter
from diffrl.samplers.families.sd import StableDiffusionAdapter
from diffrl.samplers.families.sd3 import StableDiffusion3Adapter
from diffrl.samplers.families.sdxl import StableDiffusionXLAdapter
from diffrl.samplers.families.shapes import ShapesAdapter
from diffrl.samplers.lora import adapters_disabled

__all__ = ["Adapter", "FluxAdapter", "ShapesAdapter", "StableDiffusion3Adapter", "StableDiffusionAdapter",
           "StableDiffusionXLAdapter", "adapters_disabled", "get_adapter", "model_dtype", "register_adapter",
           "supported_pipelines"]

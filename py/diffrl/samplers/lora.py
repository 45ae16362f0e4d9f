"""LoRA (peft) helpers the samplers and trainers share: running a model with its adapters off,
which is the reference policy of a LoRA run (the base weights)."""

from __future__ import annotations

import contextlib

__all__ = ["adapters_disabled"]


@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` with its (peft) adapters switched off: a PeftModel's ``disable_adapter()``
    context, or diffusers' ``disable_adapters()`` / ``enable_adapters()`` pair."""
    if hasattr(model, "disable_adapter") and callable(model.disable_adapter):
        with model.disable_adapter():
            yield model
        return
    if (callable(getattr(model, "disable_adapters", None)) and callable(getattr(model, "enable_adapters", None))
            and getattr(model, "_hf_peft_config_loaded", True)):  # diffusers models: only with adapters loaded
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()
        return
    raise ValueError(f"reference='disable_adapters' needs a model with peft adapters ({type(model).__name__} has "
                     "neither disable_adapter() nor disable_adapters()); pass a reference model instead")

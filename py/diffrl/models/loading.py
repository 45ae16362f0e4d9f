"""Loading a pipeline by name: a diffusers folder or hub id, a saved shapes pipeline, a random tiny
one (``tiny:<family>``) or a packaged shapes model (``builtin:shapes``, ``builtin:shapes-swapped``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["load_pipeline"]


def load_pipeline(pretrained: str, *, seed: int = 0, dtype=torch.float32):
    """A diffusers pipeline from a folder (a saved shapes pipeline too) / hub id, ``tiny:<family>`` for a
    random tiny one, or ``builtin:shapes`` / ``builtin:shapes-swapped`` for a packaged pre-trained shapes model."""
    if not pretrained:
        raise ValueError("config.pretrained is empty: give a diffusers folder or hub id, 'tiny:<family>' or "
                         "'builtin:shapes' (or pass pipeline= to the trainer)")
    if pretrained.startswith("builtin:"):
        from diffrl.models.shapes_model import load_base_pipeline  # noqa: PLC0415

        return load_base_pipeline(dtype=dtype, name=pretrained.split(":", 1)[1])  # (unknown names: a clear error)
    if pretrained.startswith("tiny:"):
        from diffrl.models.tiny import tiny_pipeline  # noqa: PLC0415

        return tiny_pipeline(pretrained.split(":", 1)[1], seed=seed, dtype=dtype)
    from diffusers import DiffusionPipeline  # noqa: PLC0415

    from diffrl.models.shapes_model import ShapesPipeline, dtype_kwarg  # noqa: PLC0415

    index = Path(pretrained) / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("_class_name") == ShapesPipeline.__name__:
        # a saved shapes pipeline (a retrained base model, a fine-tuned one): diffusers' loader looks
        # its pipeline class up in the diffusers module, where ours is not
        return ShapesPipeline.from_pretrained(pretrained, local_files_only=True, **dtype_kwarg(dtype))
    return DiffusionPipeline.from_pretrained(pretrained, **dtype_kwarg(dtype))

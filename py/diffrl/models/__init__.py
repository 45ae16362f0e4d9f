"""Toy generative tasks and models for diffrl's demos and tests, and model loading.

``shapes`` / ``shapes_model``: the shapes task and the built-in model; ``tiny``: random-weight
pipelines of each supported family (tests, benchmarks, CPU presets); ``loading.load_pipeline``: a
pipeline from a name. The last two import diffusers, so they are not imported here."""

from diffrl.models.shapes import (BACKGROUND, COLORS, RELATIONS, SHAPES, ObjectSpec, Scene, format_prompt, parse_prompt,
                                  random_prompt, random_scene, render, render_batch)

__all__ = ["BACKGROUND", "COLORS", "RELATIONS", "SHAPES", "ObjectSpec", "Scene", "format_prompt", "parse_prompt",
           "random_prompt", "random_scene", "render", "render_batch"]

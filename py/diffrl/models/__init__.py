"""Toy generative tasks and models for diffrl's demos and tests."""

from diffrl.models.shapes import (BACKGROUND, COLORS, RELATIONS, SHAPES, ObjectSpec, Scene, format_prompt, parse_prompt,
                                  random_prompt, random_scene, render, render_batch)

__all__ = ["BACKGROUND", "COLORS", "RELATIONS", "SHAPES", "ObjectSpec", "Scene", "format_prompt", "parse_prompt",
           "random_prompt", "random_scene", "render", "render_batch"]

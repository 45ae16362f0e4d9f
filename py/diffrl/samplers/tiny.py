"""Compatibility module: the random-weight test pipelines now live in ``diffrl.models.tiny``."""

from diffrl.models.tiny import (FAMILIES, clip_tokenizer, sd3_medium_pipeline, sd3_medium_transformer,  # noqa: F401
                                t5_tokenizer, tiny_pipeline)

__all__ = ["FAMILIES", "clip_tokenizer", "sd3_medium_pipeline", "sd3_medium_transformer", "t5_tokenizer",
           "tiny_pipeline"]

"""Named configurations, runnable with ``diffrl train --preset NAME``.

A preset is a trainer kind (``grpo`` | ``ddpo``) and config values. ``pretrained: "tiny:<family>"``
means a random-weight pipeline from ``diffrl.samplers.tiny`` (nothing is downloaded), which is
what makes the ``tiny-*`` presets run an epoch on a CPU in seconds. They are smoke tests of the
whole loop, not models that learn anything useful.
"""

from __future__ import annotations

import copy
import difflib

__all__ = ["PRESETS", "get_preset"]

_TINY_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]

_TINY_COMMON = {
    "prompts": _TINY_PROMPTS,
    "eval_prompts": _TINY_PROMPTS[:2],
    "resolution": 32,            # tiny pipelines: latents 16 x 16
    "num_inference_steps": 3,
    "guidance_scale": 4.5,
    "epochs": 3,
    "prompts_per_epoch": 2,
    "group_size": 2,
    "sample_batch_size": 4,
    "train_batch_size": 2,
    "lr": 1e-3,
    "lora_rank": 4,
    "lora_alpha": 8,
    "save_every": 1,
    "keep_last": 2,
    "reward": {"jpeg_incompressibility": 1.0},
}

PRESETS: dict[str, dict] = {
    "tiny-sd3-jpeg": {
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-jpeg",
                   "clip_range": 0.2, "kl_coef": 0.01, "noise_level": 0.7},
    },
    "tiny-sd-ddpo-jpeg": {
        "trainer": "ddpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd", "output_dir": "runs/tiny-sd-ddpo-jpeg",
                   "clip_range": 0.2, "eta": 1.0, "tracker_buffer_size": 16, "tracker_min_count": 4},
    },
}


def get_preset(name: str) -> tuple[str, dict]:
    """``(trainer kind, config values)`` of preset ``name`` (a copy: callers may edit it)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    return p["trainer"], copy.deepcopy(p["config"])

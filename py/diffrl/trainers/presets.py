"""Named configurations, runnable with ``diffrl train --preset NAME``.

A preset is a trainer kind (``grpo`` | ``nft`` | ``ddpo`` | ``dpo``) and config values (a value may be a function,
called when the preset is used). ``pretrained: "builtin:shapes"`` is the packaged shapes model of ``diffrl
demo`` (preset ``shapes-grpo``); ``pretrained: "tiny:<family>"``
means a random-weight pipeline from ``diffrl.models.tiny`` (nothing is downloaded), which is
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

def _shapes_prompts() -> list[str]:
    from diffrl.models.shapes_eval import training_prompts  # noqa: PLC0415

    return training_prompts(2000, seed=123)


# the shapes task of `diffrl demo`: the packaged model against its rule-based verifier, on a CPU;
# 8 prompts x 8 images per epoch, 10 sampling steps at CFG 4, full fine-tuning, the weights' EMA is
# the result (docs/demo.md: what was measured)
_SHAPES_COMMON = {
    "pretrained": "builtin:shapes", "prompts": _shapes_prompts,
    "eval_prompts": ["two red circles", "a blue square left of a yellow triangle", "three green triangles",
                     "a purple circle above a red square"],
    "resolution": 32, "num_inference_steps": 10, "guidance_scale": 4.0, "prompts_per_epoch": 8, "group_size": 8,
    "sample_batch_size": 64, "use_lora": False, "ema_decay": 0.98, "adv_clip": 5.0, "save_every": 0, "keep_last": 1,
    "reward": {"shapes": 1.0},
}

PRESETS: dict[str, dict] = {
    # the demo's default: NFTTrainer (forward-process, advantage-weighted flow matching) on the base model
    # with a colour-swap habit (builtin:shapes-swapped), CFG-free (sampled and trained at guidance 1, one model
    # call per step), LoRA rank 32 on the attention projections at lr 1e-3 (cosine to 0 over 100 epochs),
    # sampled by an EMA of the trained weights (DiffusionNFT's old policy: decay 0.5, ramped over 25 epochs),
    # the weights' EMA (0.9) as the result; 100 epochs or 7 minutes (docs/demo.md: what was measured)
    "shapes-nft": {
        "trainer": "nft",
        "config": {**_SHAPES_COMMON, "pretrained": "builtin:shapes-swapped", "guidance_scale": 1.0,
                   "output_dir": "runs/shapes-nft", "noise_level": 0.0, "epochs": 100, "max_minutes": 7.0,
                   "train_batch_size": 32, "inner_epochs": 2, "lr": 1e-3, "lr_scheduler": "cosine",
                   "adam_betas": [0.9, 0.99], "adam_weight_decay": 0.0, "nft_beta": 1.0, "nft_adv_scale": 2.0,
                   "use_lora": True, "lora_rank": 32, "lora_alpha": 32,
                   "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "ema_decay": 0.9,
                   "nft_old_policy": "ema", "nft_old_decay": 0.5, "nft_old_decay_ramp": 25},
    },
    # the demo's first configuration (until 2026-12-03), kept for comparison: full fine-tuning of the
    # packaged base model at CFG 4, lr 3e-5 (it gains nothing measurable: docs/demo.md, history)
    "shapes-nft-base": {
        "trainer": "nft",
        "config": {**_SHAPES_COMMON, "output_dir": "runs/shapes-nft-base", "noise_level": 0.0, "epochs": 60,
                   "max_minutes": 9.0, "train_batch_size": 32, "inner_epochs": 2, "lr": 3e-5,
                   "lr_scheduler": "cosine", "adam_betas": [0.9, 0.99], "adam_weight_decay": 0.0, "nft_beta": 1.0,
                   "nft_adv_scale": 2.0},
    },
    # Flow-GRPO on the same task (`diffrl demo --preset shapes-grpo`): SDE sampling with the first 5
    # (layout) steps stochastic and trained, a small constant lr, 8 minutes
    "shapes-grpo": {
        "trainer": "grpo",
        "config": {**_SHAPES_COMMON, "output_dir": "runs/shapes-grpo", "noise_level": 0.7, "epochs": 10_000,
                   "max_minutes": 8.0, "train_batch_size": 16, "sde_window": [0, 5], "timestep_fraction": 1.0,
                   "clip_range": 1e-3, "kl_coef": 0.0, "lr": 2e-5},
    },
    # the GRPO options on the shapes model (same task as shapes-grpo; not tuned: docs/algorithms.md)
    "shapes-mixgrpo": {
        "trainer": "grpo",
        "config": {**_SHAPES_COMMON, "output_dir": "runs/shapes-mixgrpo", "noise_level": 0.7, "epochs": 10_000,
                   "max_minutes": 8.0, "train_batch_size": 16, "sde_window": [0, 3], "sde_window_move": "slide",
                   "sde_window_slide_every": 10, "same_initial_noise": True, "share_prefix": True,
                   "timestep_fraction": 1.0, "clip_range": 1e-3, "kl_coef": 0.0, "lr": 2e-5},
    },
    "shapes-densegrpo": {
        "trainer": "grpo",
        "config": {**_SHAPES_COMMON, "output_dir": "runs/shapes-densegrpo", "noise_level": 0.7, "epochs": 10_000,
                   "max_minutes": 8.0, "train_batch_size": 16, "sde_window": [0, 5], "advantage": "dense",
                   "timestep_fraction": 1.0, "clip_range": 1e-3, "kl_coef": 0.0, "lr": 2e-5},
    },
    "shapes-grpo-guard": {
        "trainer": "grpo",
        "config": {**_SHAPES_COMMON, "output_dir": "runs/shapes-grpo-guard", "noise_level": 0.7, "epochs": 10_000,
                   "max_minutes": 8.0, "train_batch_size": 16, "sde_window": [0, 5], "grpo_guard": True,
                   "timestep_fraction": 1.0, "clip_range": 1e-3, "kl_coef": 0.0, "lr": 2e-5},
    },
    # online Diffusion-DPO on the shapes task (the colour-swapped model at CFG 1, like the demo; not tuned)
    "shapes-dpo": {
        "trainer": "dpo",
        "config": {**_SHAPES_COMMON, "pretrained": "builtin:shapes-swapped", "guidance_scale": 1.0,
                   "output_dir": "runs/shapes-dpo", "epochs": 100, "max_minutes": 8.0, "train_batch_size": 8,
                   "dpo_beta": 1000.0, "lr": 1e-3, "use_lora": True, "lora_rank": 32, "lora_alpha": 32,
                   "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "ema_decay": 0.9},
    },
    "tiny-sd3-jpeg": {
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-jpeg",
                   "clip_range": 0.2, "kl_coef": 0.01, "noise_level": 0.7},
    },
    "tiny-sd3-nft-jpeg": {
        "trainer": "nft",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-nft-jpeg"},
    },
    # the GRPO family's options (docs/algorithms.md), one preset each on the tiny SD3 pipeline
    "tiny-sd3-mixgrpo-jpeg": {  # MixGRPO: a 2-step SDE window sliding every epoch, the group's prefix shared
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-mixgrpo-jpeg",
                   "num_inference_steps": 4, "sde_window": [0, 2], "sde_window_move": "slide",
                   "same_initial_noise": True, "share_prefix": True, "clip_range": 0.2, "noise_level": 0.7},
    },
    "tiny-sd3-fast-jpeg": {  # Flow-GRPO-Fast: one stochastic step at a random position per epoch
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-fast-jpeg",
                   "num_inference_steps": 4, "sde_window": [0, 1], "sde_window_move": "random",
                   "same_initial_noise": True, "share_prefix": True, "clip_range": 0.2, "noise_level": 0.7},
    },
    "tiny-sd3-dense-jpeg": {  # DenseGRPO: per-step reward gains on ODE completions
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-dense-jpeg",
                   "advantage": "dense", "sde_window": [0, 2], "clip_range": 0.2, "noise_level": 0.7},
    },
    "tiny-sd3-guard-jpeg": {  # GRPO-Guard: regulated clipping
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-guard-jpeg",
                   "grpo_guard": True, "clip_range": 0.2, "noise_level": 0.7},
    },
    "tiny-sd3-pref-jpeg": {  # Pref-GRPO: win rates within the group (here from the scalar reward)
        "trainer": "grpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-pref-jpeg",
                   "advantage": "win_rate", "clip_range": 0.2, "noise_level": 0.7},
    },
    "tiny-sd3-nft-ema-jpeg": {  # DiffusionNFT's off-policy sampler: an EMA of the trained weights
        "trainer": "nft",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-nft-ema-jpeg",
                   "nft_old_policy": "ema", "nft_old_decay": 0.5, "nft_old_decay_ramp": 2},
    },
    # reward backpropagation (DRaFT-K, K = 2 of 3 steps) towards a colour: a differentiable toy reward
    "tiny-sd3-draft-colour": {
        "trainer": "reward_backprop",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-draft-colour",
                   "reward": {"colour_target": 1.0}, "grad_steps": 2, "lr": 3e-2},
    },
    "tiny-sd-draft-colour": {
        "trainer": "reward_backprop",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd", "output_dir": "runs/tiny-sd-draft-colour",
                   "reward": {"colour_target": 1.0}, "grad_steps": 1, "lr": 3e-2},
    },
    # RLCM: DDPO's objective on a latent consistency model's own 4-step stochastic sampler
    "tiny-lcm-ddpo-jpeg": {
        "trainer": "ddpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:lcm", "output_dir": "runs/tiny-lcm-ddpo-jpeg",
                   "num_inference_steps": 4, "guidance_scale": 6.0, "clip_range": 0.2, "tracker_buffer_size": 16,
                   "tracker_min_count": 4},
    },
    "tiny-sd-ddpo-jpeg": {
        "trainer": "ddpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd", "output_dir": "runs/tiny-sd-ddpo-jpeg",
                   "clip_range": 0.2, "eta": 1.0, "tracker_buffer_size": 16, "tracker_min_count": 4},
    },
    # Diffusion-DPO on online pairs (the best vs the worst of each group by the reward); dpo_beta is
    # the official code's beta_dpo (5000 for SD1.5 / SDXL), smaller here for the random tiny models
    "tiny-sd-dpo-jpeg": {
        "trainer": "dpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd", "output_dir": "runs/tiny-sd-dpo-jpeg", "dpo_beta": 500.0,
                   "group_size": 4},
    },
    "tiny-sd3-dpo-jpeg": {
        "trainer": "dpo",
        "config": {**_TINY_COMMON, "pretrained": "tiny:sd3", "output_dir": "runs/tiny-sd3-dpo-jpeg", "dpo_beta": 500.0,
                   "group_size": 4},
    },
}


def get_preset(name: str) -> tuple[str, dict]:
    """``(trainer kind, config values)`` of preset ``name`` (a copy: callers may edit it)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    p = PRESETS[name]
    # values given as functions are computed on demand (the shapes prompt list)
    return p["trainer"], {k: v() if callable(v) else copy.deepcopy(v) for k, v in p["config"].items()}

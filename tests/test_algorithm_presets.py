"""Every algorithm preset runs from the CLI (one epoch on its tiny pipeline) and writes its metrics; the shapes
variants build their configs (their runs take minutes: docs/algorithms.md)."""

import json

import pytest

from diffrl.cli import main
from diffrl.trainers import get_kind, get_preset, load_config

TINY = ["tiny-sd3-mixgrpo-jpeg", "tiny-sd3-fast-jpeg", "tiny-sd3-dense-jpeg", "tiny-sd3-guard-jpeg",
        "tiny-sd3-pref-jpeg", "tiny-sd3-nft-ema-jpeg", "tiny-sd3-draft-colour", "tiny-sd-draft-colour",
        "tiny-lcm-ddpo-jpeg"]


@pytest.mark.parametrize("preset", TINY)
def test_tiny_algorithm_preset_runs_from_the_cli(tmp_path, preset):
    out = tmp_path / preset
    main(["train", "--preset", preset, "--epochs", "1", "--output-dir", str(out), "--no-progress"])
    (rec,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rec["epoch"] == 1 and rec["optimizer_steps"] >= 1


@pytest.mark.parametrize("preset", ["shapes-mixgrpo", "shapes-densegrpo", "shapes-grpo-guard", "shapes-dpo"])
def test_shapes_algorithm_presets_build(preset):
    kind, values = get_preset(preset)
    cfg = load_config(get_kind(kind).config, base=values)
    assert cfg.pretrained.startswith("builtin:shapes")

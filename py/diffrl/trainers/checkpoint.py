"""Checkpoints that survive a kill at any moment, and exact resume.

A checkpoint is a folder ``<root>/epoch-000012/`` holding

* ``weights.safetensors``   the trained tensors (LoRA adapters or the full model), by name
* ``<name>.pt``             other state dicts (optimizer, LR scheduler, EMA, tracker, ...)
* ``rng.pt``                Python, numpy and torch (CPU and every CUDA device) generator states
* ``state.json``            counters and metadata (epoch, global step, config), written last

It is written into a temporary sibling folder and renamed into place, so that a reader sees either
a complete checkpoint or none (a rename within one filesystem is atomic); leftovers of a killed
write are removed by the next save. Only the newest ``keep_last`` checkpoints are kept, and the
previous ones are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "rng_state",
           "set_rng_state"]

_NAME = re.compile(r"^epoch-(\d{6,})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, epoch: int, *, weights: dict[str, torch.Tensor],
                    states: dict[str, Any] | None = None, meta: dict[str, Any] | None = None,
                    keep_last: int = 2) -> Path:
    """Write checkpoint ``epoch`` under ``root`` atomically and prune old ones; returns its path."""
    from safetensors.torch import save_file  # noqa: PLC0415

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-epoch-*"):  # a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"epoch-{epoch:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-epoch-{epoch:06d}-", dir=root))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / "weights.safetensors"))
        for name, state in (states or {}).items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in ("weights", "rng", "state"):
                raise ValueError(f"bad state name {name!r}")
            torch.save(state, tmp / f"{name}.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        info = {"epoch": int(epoch), "states": sorted((states or {}).keys()), **(meta or {})}
        with open(tmp / "state.json", "w") as f:  # last: its presence marks a complete checkpoint
            json.dump(info, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving an epoch (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, *, restore_rng: bool = True) -> dict[str, Any]:
    """``{"weights": {...}, "states": {name: state}, "meta": {...}}``; restores the RNG states too."""
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete diffrl checkpoint (no state.json)")
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    states = {name: torch.load(path / f"{name}.pt", weights_only=False) for name in meta.get("states", [])}
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return {"weights": weights, "states": states, "meta": meta}

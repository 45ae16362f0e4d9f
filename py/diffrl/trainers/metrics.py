"""Per-epoch metrics as JSON lines: one object per epoch, flushed as it is written.

On resume the log is cut back to the epochs the checkpoint covers, so that a resumed run's
``metrics.jsonl`` reads like an uninterrupted one (no duplicated or orphaned epochs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


def _plain(v):
    """JSON-friendly scalars: tensors and numpy numbers to Python; non-finite floats to strings."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class MetricsLog:
    def __init__(self, path: str | Path, *, resume_after_epoch: int | None = None):
        """Append to ``path``; with ``resume_after_epoch=k``, first drop the records of epochs > k
        (those written after the checkpoint we resume from). ``None`` starts a new log."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_epoch is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("epoch", -1) <= resume_after_epoch:
                    kept.append(line)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if "epoch" not in record:
            raise ValueError("a metrics record needs an 'epoch'")
        line = json.dumps(_plain(record), sort_keys=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

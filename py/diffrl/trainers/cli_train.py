"""``diffrl train (--config FILE | --preset NAME) [--epochs N] [--output-dir DIR] [--resume] [--key value ...]``.

The trainer kind (``diffrl.trainers.kinds``: grpo, nft, ddpo) comes from the preset, or from a ``trainer:``
key of the config file, or ``--trainer``. Precedence: config defaults < preset < config file < ``--key value`` overrides <
``--epochs`` / ``--output-dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["add_train_parser", "cmd_train", "build_trainer_from_args"]

from diffrl.trainers.kinds import KINDS, get_kind  # (no torch import: the parser is built from it)

TRAINERS = tuple(KINDS)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", allow_abbrev=False,
                       help=f"train ({', '.join(KINDS)}; a config file or a preset, plus overrides)",
                       description=__doc__.split("\n\n", 1)[1] if "\n\n" in __doc__ else None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML config file")
    src.add_argument("--preset", help="a named preset (see diffrl.trainers.presets.PRESETS)")
    p.add_argument("--trainer", choices=TRAINERS, help="trainer kind (default: the preset's or the file's)")
    p.add_argument("--epochs", type=int, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--output-dir", help="where metrics.jsonl and checkpoints/ go")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, allow_extra=True)


def build_trainer_from_args(args, overrides, *, pipeline=None, reward=None):
    from diffrl.trainers.config import load_config  # noqa: PLC0415
    from diffrl.trainers.presets import get_preset  # noqa: PLC0415

    kind, base = None, {}
    if args.preset:
        kind, base = get_preset(args.preset)
    if args.config:
        import yaml  # noqa: PLC0415

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file is a YAML mapping of keys to values")
        kind = loaded.pop("trainer", kind)
        base.update(loaded)
    spec = get_kind(args.trainer or kind or "grpo")
    cls, trainer_cls = spec.config, spec.trainer
    overrides = list(overrides)
    if args.epochs is not None:
        overrides += ["--epochs", str(args.epochs)]
    if args.output_dir:
        overrides += ["--output_dir", str(args.output_dir)]
    cfg = load_config(cls, base=base, overrides=overrides)
    return trainer_cls(cfg, pipeline=pipeline, reward=reward, resume=args.resume, progress=not args.no_progress)


def cmd_train(args, overrides=()) -> int:
    from diffrl.trainers.base import NonFiniteError  # noqa: PLC0415

    try:
        trainer = build_trainer_from_args(args, overrides)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"diffrl train: error: {msg}", file=sys.stderr)
        return 2
    if trainer.resumed_from is not None and trainer.accelerator.is_main_process:
        print(f"resuming after epoch {trainer.resumed_from}", file=sys.stderr)
    try:
        trainer.train()
    except NonFiniteError as e:
        print(f"diffrl train: {e}", file=sys.stderr)
        return 3
    finally:
        if trainer.accelerator.trackers:  # close the TensorBoard writer / finish the W&B run
            trainer.accelerator.end_training()
    return 0

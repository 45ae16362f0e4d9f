"""The ``diffrl`` command line: ``diffrl info``, ``diffrl train``, ``diffrl demo``, ``diffrl serve-reward``."""

from __future__ import annotations

import argparse
import sys


def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import torch

    import diffrl
    from diffrl import _native
    from diffrl.ops import _dispatch
    from diffrl.ops import sde as sde_step_mod

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    info = _native.build_info()
    print(f"diffrl {diffrl.__version__}  (python {platform.python_version()}, {platform.machine()})")
    # CuPy is distributed per CUDA major version
    cupy_dist = next((d for d in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if version(d) != "not installed"), "cupy")
    print(f"torch {torch.__version__}  triton {version('triton')}  cupy {version(cupy_dist)}")
    if info:
        archs = info.get("cuda_archs") or "-"
        print(f"extension diffrl._C: CUDA kernels {'yes' if info['cuda'] else 'no'} (archs {archs}), "
              f"OpenMP {'yes' if info['openmp'] else 'no'} ({info['omp_max_threads']} threads), "
              f"CPU kernels {getattr(_native.load()[0], 'cpu_isa', lambda: 'baseline')()}")
    else:
        print(f"extension diffrl._C: missing ({_native.load()[1]})")
    if torch.cuda.is_available():
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"GPU: {torch.cuda.get_device_name()} (capability {capability})")
    else:
        print("GPU: none visible to torch")
    print("backends:")
    for name, (ok, reason) in _dispatch.describe().items():
        print(f"  {name:<7} {'available' if ok else 'unavailable'}{'' if ok else ': ' + reason}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        chosen = _dispatch.resolve("sde_step", sde_step_mod.IMPLEMENTED, "auto", torch.device(dev))
        print(f"auto on {dev}: sde_step -> {chosen}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffrl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="version, build and the backends available here")
    p.set_defaults(func=cmd_info)
    from diffrl.trainers.cli_train import add_train_parser  # torch only; diffusers/accelerate load when training

    add_train_parser(sub)
    from diffrl.demo import add_demo_parser

    add_demo_parser(sub)
    from diffrl.rewards.server import add_serve_parser

    add_serve_parser(sub)
    # `diffrl train` takes free-form `--key value` config overrides; other subcommands take none
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "allow_extra", False):
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

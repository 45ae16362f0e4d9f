"""Registry of latent shapes and batch sizes the benchmarks draw from (no hard-coded sizes in bench_<op>.py).

A latent is ``[B, *shape]``; what matters to the memory-bound ops is the number of elements per
sample, so FLUX's packed latents at 1024 px ([4096 tokens, 64 channels] = 262 144 elements) are
written as (64, 64, 64).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod


@dataclass(frozen=True)
class Latent:
    name: str
    shape: tuple[int, ...]  # per sample, without the batch dimension
    note: str = ""

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def __str__(self) -> str:
        return "x".join(map(str, self.shape))


LATENTS: dict[str, Latent] = {
    "sd15": Latent("sd15", (4, 64, 64), "Stable Diffusion 1.5 at 512 px"),
    "sdxl": Latent("sdxl", (4, 128, 128), "SDXL at 1024 px"),
    "sd3": Latent("sd3", (16, 128, 128), "SD3 / SD3.5 at 1024 px"),
    "flux": Latent("flux", (64, 64, 64), "FLUX at 1024 px: packed latents [4096 tokens, 64 channels]"),
    # the per-call overhead case: small enough that only the Python and launch cost remains
    "tiny": Latent("tiny", (4, 8, 8), "per-call overhead probe"),
}

MODEL_LATENTS = ("sd15", "sdxl", "sd3", "flux")

# batch sizes per device: GPU runs see the training-size batches; the CPU defaults keep `make bench`
# within a few minutes on a 2-core machine.
BATCHES = {
    "cuda": {"full": (1, 8, 32), "quick": (8,)},
    "cpu": {"full": (1, 4), "quick": (1,)},
}

LATENT_SETS = {
    "full": MODEL_LATENTS,
    "quick": ("sd15", "sd3"),
}


def latents(quick: bool = False) -> list[Latent]:
    return [LATENTS[n] for n in LATENT_SETS["quick" if quick else "full"]]


def batches(device_type: str, quick: bool = False) -> tuple[int, ...]:
    return BATCHES.get(device_type, BATCHES["cpu"])["quick" if quick else "full"]

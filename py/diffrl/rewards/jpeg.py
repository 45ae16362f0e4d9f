"""DDPO's JPEG rewards: the size of the image encoded as JPEG at quality 95, in kB (1000 bytes).

``JpegIncompressibility`` rewards large files (detail, texture, noise), ``JpegCompressibility``
small ones (flat, smooth images): ``reward`` = +kB or -kB, with the size itself under ``jpeg_kb``.
No weights. The encoder *is* the measure, so this reward necessarily leaves the device: images
are quantised to uint8 as DDPO does (``round(x * 255)``) and encoded by Pillow's libjpeg with
Pillow's defaults otherwise (4:2:0 chroma subsampling at quality 95, baseline, no optimisation),
which is what DDPO's numbers were measured with.
"""

from __future__ import annotations

import io

import torch

from diffrl.rewards.base import Reward

QUALITY = 95


def jpeg_sizes_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """JPEG size in kB of each image of a checked float [B, 3, H, W] batch in [0, 1]; float32 [B] on its device."""
    from PIL import Image  # noqa: PLC0415 - Pillow is only needed by this reward

    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for px in pixels:
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32).to(images.device)


class JpegIncompressibility(Reward):
    """``reward`` = JPEG size in kB at quality 95 (DDPO's incompressibility); ``jpeg_kb`` the same."""

    heads = ("reward", "jpeg_kb")
    sign = 1.0

    def __init__(self, quality: int = QUALITY):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"{type(self).__name__}: quality must be an int in [1, 100], got {quality!r}")
        self.quality = quality

    def score(self, images, prompts, group_ids):
        kb = jpeg_sizes_kb(images, self.quality)
        return {"reward": self.sign * kb, "jpeg_kb": kb}


class JpegCompressibility(JpegIncompressibility):
    """``reward`` = minus the JPEG size in kB at quality 95 (DDPO's compressibility); ``jpeg_kb`` the size."""

    sign = -1.0

"""JPEG compressibility, DDPO's baseline reward: minus the JPEG size in kB, on the host (PIL)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from parrot_jax.rewards.base import HostReward


def jpeg_sizes_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """images ``[B, H, W, 3]`` in [0, 1] -> ``[B]`` JPEG sizes in kB (1000 bytes), each image
    quantised to 8 bits (``round(255 x)``) and encoded by PIL at ``quality``.

    An image with any NaN or infinite pixel gets NaN, not the size of whatever 8-bit image the
    cast would make of it (an all-NaN image used to score as black, silently): a NaN reward marks
    the sample invalid (``rl.pareto.valid_rows``), as a NaN image's rewards computed on the device
    are NaN too, so a broken image is never trained on.
    """
    images = np.asarray(images, np.float32)
    finite = np.isfinite(images).all(axis=tuple(range(1, images.ndim)))
    sizes = np.full(images.shape[:1], np.nan, np.float32)
    for i in np.flatnonzero(finite):
        # Clipping before scaling: same pixels as clipping after, and no overflow to inf.
        pixels = np.round(np.clip(images[i], 0.0, 1.0) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000
    return sizes


class JpegCompressibility(HostReward):
    """``-size_kB`` at ``quality`` (95 as in ddpo-pytorch): smaller files score higher.
    Reads the image only; ``incompressible=True`` gives DDPO's opposite reward ``+size_kB``.
    A non-finite image scores NaN (an invalid sample)."""

    def __init__(self, name: str = "jpeg_compressibility", quality: int = 95, *,
                 incompressible: bool = False, workers: int = 2):
        if not 1 <= quality <= 100:
            raise ValueError(f"{name}: quality must be in 1..100, got {quality}")
        super().__init__(workers)
        self.name, self.quality, self.sign = name, quality, 1.0 if incompressible else -1.0

    def compute(self, images: np.ndarray) -> np.ndarray:
        return self.sign * jpeg_sizes_kb(images, self.quality)

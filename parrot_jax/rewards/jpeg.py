"""JPEG compressibility, DDPO's baseline reward: minus the JPEG size in kB, on the host (PIL)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from parrot_jax.rewards.base import HostReward


def jpeg_sizes_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """images ``[B, H, W, 3]`` in [0, 1] -> ``[B]`` JPEG sizes in kB (1000 bytes), each image
    quantised to 8 bits (``round(255 x)``) and encoded by PIL at ``quality``."""
    pixels = np.clip(np.round(np.asarray(images, np.float32) * 255), 0, 255).astype(np.uint8)
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return np.asarray(sizes, np.float32)


class JpegCompressibility(HostReward):
    """``-size_kB`` at ``quality`` (95 as in ddpo-pytorch): smaller files score higher.
    Reads the image only; ``incompressible=True`` gives DDPO's opposite reward ``+size_kB``."""

    def __init__(self, name: str = "jpeg_compressibility", quality: int = 95, *,
                 incompressible: bool = False, workers: int = 2):
        if not 1 <= quality <= 100:
            raise ValueError(f"{name}: quality must be in 1..100, got {quality}")
        super().__init__(workers)
        self.name, self.quality, self.sign = name, quality, 1.0 if incompressible else -1.0

    def compute(self, images: np.ndarray) -> np.ndarray:
        return self.sign * jpeg_sizes_kb(images, self.quality)

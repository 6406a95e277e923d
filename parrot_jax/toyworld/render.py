"""Vectorised renderer: scenes -> ``[N, H, W, 3]`` float32 images in [0, 1].

Each shape is a signed distance field (negative inside) on the pixel grid, in image-width units;
coverage comes from the distance: sharp edges antialias over one pixel, soft edges blend over
about five (a wide smoothstep). Outlines are a ~2 px rim centred on the edge, dark on bright
fills and light on dark ones. Position, size and colours get small per-image jitter from ``rng``
so the models learn distributions, not 24,000 fixed pictures.

The palette and geometry are public: labels.py derives its scores from the same colours.
"""

from __future__ import annotations

import numpy as np

from parrot_jax.toyworld.world import ATTRIBUTES, Scenes, num_scenes

IMAGE_SIZE = 32

VIVID_RGB = np.array([  # in ATTRIBUTES["colour"] order
    [0.90, 0.10, 0.10],  # red
    [0.98, 0.55, 0.05],  # orange
    [0.95, 0.90, 0.10],  # yellow
    [0.10, 0.75, 0.20],  # green
    [0.10, 0.30, 0.95],  # blue
    [0.55, 0.15, 0.80],  # purple
    [0.98, 0.40, 0.70],  # pink
    [0.97, 0.97, 0.97],  # white
], np.float32)
BACKGROUND_RGB = np.array([  # in ATTRIBUTES["background"] order
    [0.05, 0.05, 0.05],  # black
    [0.08, 0.10, 0.35],  # navy
    [0.50, 0.50, 0.50],  # gray
    [0.96, 0.93, 0.80],  # cream
    [0.98, 0.98, 0.98],  # white
], np.float32)
PASTEL_MIX = 0.5  # pastel = this much white mixed into the vivid colour
RIM_DARK, RIM_LIGHT = 0.08, 0.95  # outline grey levels
RADIUS = np.array([0.16, 0.24, 0.32])  # small, medium, large; in image widths
CENTRES = np.array([[0.5, 0.5], [0.33, 0.5], [0.67, 0.5], [0.5, 0.33], [0.5, 0.67]])  # (x, y)
SOFT_HALF_WIDTH_PX = 2.5  # soft edges blend over +-2.5 px
RIM_HALF_WIDTH_PX = 0.9
JITTER_POS, JITTER_SIZE, JITTER_RGB = 0.02, 0.07, 0.02
LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)


def fill_rgb(colour: np.ndarray, saturation: np.ndarray) -> np.ndarray:
    """Shape fill colours ``[N, 3]`` before jitter (pastel = vivid mixed toward white)."""
    vivid = VIVID_RGB[np.asarray(colour)]
    pastel = np.asarray(saturation)[:, None] == ATTRIBUTES["saturation"].index("pastel")
    return np.where(pastel, (1 - PASTEL_MIX) * vivid + PASTEL_MIX, vivid).astype(np.float32)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Relative luminance ``[...]`` of ``[..., 3]`` colours (Rec. 709 weights on the values)."""
    return np.asarray(rgb, np.float32) @ LUMA


def shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of ``shape`` of size ``r`` centred at the origin.

    ``x``, ``y``: offsets from the centre (y down), broadcast against ``r``; all in image widths.
    Radii are scaled per shape so that the five shapes look about equally big.
    """
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        return _box(x, y, 0.85 * r, 0.85 * r)
    if shape == "triangle":  # equilateral, pointing up, centroid at the origin
        rc = 1.25 * r  # circumradius
        s = np.float32(np.sqrt(3.0) / 2)
        return np.maximum(np.maximum(y, s * x - 0.5 * y), -s * x - 0.5 * y) - rc / 2
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.8 * r) - 0.2 * r
    if shape == "cross":
        return np.minimum(_box(x, y, r, 0.35 * r), _box(x, y, 0.35 * r, r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(ATTRIBUTES['shape'])}")


def _box(x: np.ndarray, y: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    dx, dy = np.abs(x) - hx, np.abs(y) - hy
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0)


def coverage(d: np.ndarray, soft: np.ndarray, px: float) -> np.ndarray:
    """Alpha in [0, 1] from signed distance ``d``; ``soft`` (broadcastable bool) blurs the edge."""
    sharp_a = np.clip(np.float32(0.5) - d * np.float32(1 / px), 0, 1)
    t = np.clip(np.float32(0.5) - d * np.float32(1 / (2 * SOFT_HALF_WIDTH_PX * px)), 0, 1)
    soft_a = t * t * (3 - 2 * t)
    return np.where(soft, soft_a, sharp_a)


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``x, y`` ``[size, size]`` in image widths (y down)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def render(scenes: Scenes, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Images ``[N, size, size, 3]`` float32 in [0, 1] for ``scenes``; jitter drawn from ``rng``."""
    n = num_scenes(scenes)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    px = 1.0 / size
    centre = (CENTRES[scenes["position"]]
              + rng.uniform(-JITTER_POS, JITTER_POS, (n, 2))).astype(np.float32)
    radius = (RADIUS[scenes["size"]]
              * rng.uniform(1 - JITTER_SIZE, 1 + JITTER_SIZE, n)).astype(np.float32)
    fill = np.clip(fill_rgb(scenes["colour"], scenes["saturation"])
                   + rng.normal(0, JITTER_RGB, (n, 3)), 0, 1)
    bg = np.clip(BACKGROUND_RGB[scenes["background"]] + rng.normal(0, JITTER_RGB, (n, 3)), 0, 1)
    gx, gy = grid(size)
    x = gx[None] - centre[:, 0, None, None]  # [N, S, S]
    y = gy[None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    d = np.empty((n, size, size), np.float32)
    for k, shape in enumerate(ATTRIBUTES["shape"]):
        sel = scenes["shape"] == k
        if sel.any():
            d[sel] = shape_sdf(shape, x[sel], y[sel], r[sel])
    soft = (scenes["edges"] == ATTRIBUTES["edges"].index("soft"))[:, None, None]
    alpha = coverage(d, soft, px)[..., None]
    img = bg[:, None, None] * (1 - alpha) + fill[:, None, None] * alpha
    outlined = scenes["outline"] == ATTRIBUTES["outline"].index("outlined")
    rim_alpha = coverage(np.abs(d) - RIM_HALF_WIDTH_PX * px, soft, px)[..., None]
    rim = np.where(luminance(fill) > 0.45, RIM_DARK, RIM_LIGHT)[:, None, None, None]
    img = np.where(outlined[:, None, None, None], img * (1 - rim_alpha) + rim * rim_alpha, img)
    return np.clip(img, 0, 1).astype(np.float32)

"""Oracle metrics from pixels only (never the scene): the yardstick beside the learned rewards.

A learned reward that rises while its oracle falls is being hacked. Every metric is finite for
every image (an image with no visible shape gets the worst value), so they average safely.

Foreground = pixels whose RGB distance from the border's median colour (the background) exceeds
``min(FG_THRESHOLD, half the largest distance)``. The shape's colour is the median of the
foreground's interior (the mask eroded by 2 px, so outline rims and soft edges barely count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from parrot_jax.toyworld.captions import parse
from parrot_jax.toyworld.render import VIVID_RGB, grid, luminance, shape_sdf
from parrot_jax.toyworld.world import ATTRIBUTES

FG_THRESHOLD, MIN_VISIBLE = 0.15, 0.1  # RGB distances
TEMPLATE_RADII = np.linspace(0.06, 0.46, 33)  # image widths, searched for the best IoU
SATURATION_FLOOR = 0.2  # below this fg saturation a hue is unreliable
METRICS = ("contrast", "saturation", "hue_error", "shape_iou", "area", "centroid_offset",
           "sharpness")


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in [0, 1) turns, saturation, value of ``[..., 3]`` colours."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1)
    hue = np.where(mx == r, (g - b) / safe, np.where(mx == g, 2 + (b - r) / safe,
                                                     4 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6) % 1.0, 0.0)
    return hue, np.where(mx > 0, delta / np.where(mx > 0, mx, 1), 0.0), mx


def colour_error(rgb: np.ndarray, colour: str) -> np.ndarray:
    """``[N]`` in [0, 1]: how far ``[N, 3]`` colours are from the named colour.

    Chromatic colours: circular hue distance (0.5 turn = 1), pulled to 1 as saturation drops
    below ``SATURATION_FLOOR``. White: saturation or darkness, whichever is worse.
    """
    hue, sat, val = _rgb_to_hsv(rgb)
    if colour == "white":
        return np.clip(np.maximum(sat / 0.3, (0.85 - val) / 0.3), 0, 1)
    ref_hue = _rgb_to_hsv(VIVID_RGB[ATTRIBUTES["colour"].index(colour)])[0]
    dist = np.abs((hue - ref_hue + 0.5) % 1.0 - 0.5) * 2
    w = np.clip(sat / SATURATION_FLOOR, 0, 1)
    return w * dist + (1 - w)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion of ``[N, H, W]`` (outside the image counts as foreground)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    h, w = mask.shape[1:]
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[:, dy:dy + h, dx:dx + w]
    return out


def _best_iou(mask: np.ndarray, cx: np.ndarray, cy: np.ndarray, shapes: Sequence[str]
              ) -> np.ndarray:
    """``[N]`` max IoU of ``mask`` with any template (shape, radius) centred on its centroid."""
    x, y = grid(mask.shape[1])
    dx, dy = x[None] - cx[:, None, None], y[None] - cy[:, None, None]
    best = np.zeros(len(mask))
    for shape in shapes:
        for r in TEMPLATE_RADII:
            t = shape_sdf(shape, dx, dy, np.float32(r)) < 0
            inter = (t & mask).sum((1, 2))
            union = (t | mask).sum((1, 2))
            best = np.maximum(best, inter / np.maximum(union, 1))
    return best


def oracle_metrics(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Pixel metrics of ``images`` ``[N, H, W, 3]`` in [0, 1] against ``prompts``; each ``[N]``.

    contrast: |luminance(shape) - luminance(background)|; saturation: HSV saturation of the
    shape's colour; hue_error: ``colour_error`` vs the prompted colour (the nearest colour when
    the prompt names none); shape_iou: IoU with the best template of the prompted shape (of any
    shape when none); area: foreground fraction; centroid_offset: distance of the foreground's
    centroid from the image centre in image widths; sharpness: mean slope of the normalised
    foreground-distance across the shape's boundary per pixel (about 0.5 sharp, 0.15 soft).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {images.shape}")
    n, h, w, _ = images.shape
    if len(prompts) != n:
        raise ValueError(f"oracle_metrics: {len(prompts)} prompts for {n} images")
    border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0],
                             images[:, 1:-1, -1]], axis=1)  # [N, perimeter, 3]
    bg = np.median(border, axis=1)  # [N, 3]
    dist = np.linalg.norm(images - bg[:, None, None], axis=-1)  # [N, H, W]
    dmax = dist.reshape(n, -1).max(1)
    visible = dmax > MIN_VISIBLE
    mask = (dist > np.minimum(FG_THRESHOLD, 0.5 * dmax)[:, None, None]) & visible[:, None, None]
    area = mask.mean((1, 2))

    interior = _erode(_erode(mask))
    core = np.where(interior.any((1, 2))[:, None, None], interior, mask)
    fg = np.array([np.median(images[i][core[i]], axis=0) if core[i].any() else bg[i]
                   for i in range(n)])
    contrast = np.abs(luminance(fg) - luminance(bg))
    saturation = _rgb_to_hsv(fg)[1]

    x, y = grid(h)
    count = np.maximum(mask.sum((1, 2)), 1)
    cx = (mask * x).sum((1, 2)) / count
    cy = (mask * y).sum((1, 2)) / count
    centroid_offset = np.where(visible, np.hypot(cx - 0.5, cy - 0.5), np.sqrt(0.5))

    named = [parse(p) for p in prompts]
    hue_error = np.ones(n)
    shape_iou = np.zeros(n)
    for i in range(n):
        colours = [named[i]["colour"]] if "colour" in named[i] else ATTRIBUTES["colour"]
        hue_error[i] = min(colour_error(fg[i:i + 1], c)[0] for c in colours)
    for shape in (*ATTRIBUTES["shape"], None):  # batched by the prompted shape
        rows = np.array([i for i in range(n) if named[i].get("shape") == shape], int)
        if rows.size:
            shapes = [shape] if shape else ATTRIBUTES["shape"]
            shape_iou[rows] = _best_iou(mask[rows], cx[rows], cy[rows], shapes)
    shape_iou = np.where(visible, shape_iou, 0.0)
    hue_error = np.where(visible, hue_error, 1.0)

    norm = np.clip(dist / np.maximum(dmax, 1e-6)[:, None, None], 0, 1)
    gy, gx = np.gradient(norm, axis=(1, 2))
    slope = np.hypot(gx, gy)
    edge = slope > 0.05
    sharpness = np.where(visible, (slope * edge).sum((1, 2)) / np.maximum(edge.sum((1, 2)), 1),
                         0.0)
    out = dict(contrast=contrast, saturation=saturation, hue_error=hue_error,
               shape_iou=shape_iou, area=area, centroid_offset=centroid_offset,
               sharpness=sharpness)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def image_metrics(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """``oracle_metrics`` named ``oracle/<metric>``: the ``parrot_jax.image_metrics`` entry
    point ``toy_oracle`` (``config.final_eval.image_metrics``)."""
    return {f"oracle/{k}": v for k, v in oracle_metrics(images, prompts).items()}

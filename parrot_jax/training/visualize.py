"""PNG pictures of a run: a grid of the evaluation prompts' images and a scatter of the batch's
reward vectors with the selected (non-dominated) samples highlighted.

``image_grid`` and ``pareto_scatter`` draw with PIL and return ``uint8 [H, W, 3]`` arrays;
``png_bytes`` encodes one for a file or TensorBoard. ``write_pictures`` renders them during
training, every ``eval_every`` iterations, into ``workdir/eval`` and TensorBoard.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from parrot_jax import parallel, policy, storage
from parrot_jax.expansion import decode, identifier_prefix, tokenize_conditioning, tokenize_prompts
from parrot_jax.training.metrics import host

SELECTED = (220, 40, 40)  # selected (non-dominated) samples
OTHER = (150, 150, 150)  # the rest of the batch
INK = (0, 0, 0)
PANEL = 200  # scatter panel side in pixels
MARGIN = 30  # room for axis labels around each panel
RADIUS = 3  # scatter point radius
HEADER = 16  # the scatter's title line


def png_bytes(image: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` -> PNG file contents."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(images: np.ndarray, columns: int, cell: int | None = None,
               pad: int = 2) -> np.ndarray:
    """Images ``[N, h, w, 3]`` in [0, 1] -> one ``uint8`` grid, row-major with ``columns`` per
    row and ``pad`` white pixels between cells. ``cell``: the longer side of each cell in
    pixels (nearest-neighbour resize: tiny 8 x 8 images stay visible); None keeps the size."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"images must be [N, H, W, 3] with N > 0, got {images.shape}")
    if columns <= 0:
        raise ValueError(f"columns={columns} must be positive")
    pixels = np.round(np.clip(np.nan_to_num(images), 0.0, 1.0) * 255).astype(np.uint8)
    h, w = images.shape[1:3]
    if cell is not None:
        scale = cell / max(h, w)
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        pixels = np.stack([np.asarray(Image.fromarray(p).resize((w, h), Image.NEAREST))
                           for p in pixels])
    rows = math.ceil(len(pixels) / columns)
    grid = np.full((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, 3), 255,
                   np.uint8)
    for i, p in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = p
    return grid


def scatter_position(value: float, low: float, high: float, start: int,
                     flip: bool = False) -> int:
    """Pixel coordinate of ``value`` on a panel axis spanning [low, high] over ``PANEL``
    pixels from ``start`` (``flip``: larger values upwards, for the y axis)."""
    span = high - low
    t = 0.5 if span <= 0 else (value - low) / span
    inner = PANEL - 2 * RADIUS  # points stay inside the frame
    offset = RADIUS + round(t * inner)
    return start + (PANEL - 1 - offset if flip else offset)


def reward_pairs(num_rewards: int) -> list[tuple[int, int]]:
    """The (x, y) reward columns of the scatter's panels, in drawing order."""
    if num_rewards < 2:
        raise ValueError(f"a reward scatter needs at least 2 rewards, got {num_rewards}")
    return list(itertools.combinations(range(num_rewards), 2))


def panel_origin(index: int, num_panels: int) -> tuple[int, int]:
    """Top-left pixel ``(x, y)`` of panel ``index``'s plotting area."""
    columns = math.ceil(math.sqrt(num_panels))
    r, c = divmod(index, columns)
    return MARGIN + c * (PANEL + 2 * MARGIN), HEADER + MARGIN + r * (PANEL + 2 * MARGIN)


def pareto_scatter(rewards: np.ndarray, selected: np.ndarray, names: Sequence[str],
                   title: str = "") -> np.ndarray:
    """Rewards ``[B, K]`` and the selection mask ``[B]`` -> ``uint8`` picture: one panel per
    pair of rewards (x = the first, y = the second, each axis spanning its batch range and
    labelled with the reward's name and range); selected samples red, drawn over the rest in
    grey. Rows with a NaN reward are left out and counted in the header."""
    rewards = np.asarray(rewards, np.float64)
    selected = np.asarray(selected, bool)
    if rewards.ndim != 2 or selected.shape != rewards.shape[:1]:
        raise ValueError(f"rewards must be [B, K] and selected [B], got {rewards.shape} and "
                         f"{selected.shape}")
    if len(names) != rewards.shape[1]:
        raise ValueError(f"{len(names)} reward names for {rewards.shape[1]} reward columns")
    pairs = reward_pairs(rewards.shape[1])
    valid = ~np.any(np.isnan(rewards), axis=1)
    points, chosen = rewards[valid], selected[valid]
    columns = math.ceil(math.sqrt(len(pairs)))
    rows = math.ceil(len(pairs) / columns)
    canvas = Image.new("RGB", (columns * (PANEL + 2 * MARGIN),
                               rows * (PANEL + 2 * MARGIN) + HEADER), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"{title}  red: selected {int(chosen.sum())}/{len(points)}, grey: rest"
              + (f", {int((~valid).sum())} NaN" if (~valid).any() else ""), fill=INK)
    low = points.min(axis=0) if len(points) else np.zeros(rewards.shape[1])
    high = points.max(axis=0) if len(points) else np.ones(rewards.shape[1])
    for index, (i, j) in enumerate(pairs):
        x0, y0 = panel_origin(index, len(pairs))
        draw.rectangle((x0 - 1, y0 - 1, x0 + PANEL, y0 + PANEL), outline=INK)
        draw.text((x0, y0 + PANEL + 2), f"{names[i]} [{low[i]:.3g}, {high[i]:.3g}]", fill=INK)
        draw.text((x0 - MARGIN + 2, y0 - 13), f"{names[j]} [{low[j]:.3g}, {high[j]:.3g}]",
                  fill=INK)
        # Unselected first, so the selected points are drawn on top.
        for keep in (False, True):
            for p in points[chosen == keep]:
                x = scatter_position(p[i], low[i], high[i], x0)
                y = scatter_position(p[j], low[j], high[j], y0, flip=True)
                draw.ellipse((x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS),
                             fill=SELECTED if keep else OTHER)
    return np.asarray(canvas)


# --- the run's evaluation pictures -----------------------------------------------------------

EVAL_COLUMNS = 8  # images per evaluation prompt shown in the grid (of the N rolled out)
EVAL_KEY = 13  # fold_in index of the evaluation key (10-12: training.state.initial_state's)


def eval_images(run: Any, state: dict) -> tuple[np.ndarray, list[str]]:
    """Images ``[G, N, H, W, 3]`` in [0, 1] of the current policy (PEN LoRA and T2I model of
    ``state``) for ``config.eval_prompts``, cycled over the G groups, and the G conditioning
    texts. Row g is conditioned as training conditions a group, on one identifier, k = g mod K
    (the paper's all-identifier inference text does not fit small CLIP contexts, e.g. the tiny
    models' 16 tokens). The PEN and the noise use a fixed key apart from the training stream,
    so successive grids differ only by the policy and a resumed run draws what an
    uninterrupted one does."""
    s, m, sizes = run.settings, run.models, run.settings.sizes
    # Placed as the training keys are, so the training compilations are reused.
    k_pen, k_roll = parallel.replicate(
        jax.random.split(jax.random.fold_in(jax.random.key(s.seed), EVAL_KEY)), run.mesh)
    prompts = [s.eval_prompts[g % len(s.eval_prompts)] for g in range(sizes.groups)]
    ids, mask = tokenize_prompts(m.pen_tokenizer, prompts, s.max_prompt_length)
    expansion = policy.expand_tokens(m.pen, s.pen_sampling, m.pen_params, state["pen"]["lora"],
                                     ids, mask, k_pen)
    expanded = decode(m.pen_tokenizer, expansion.tokens, expansion.mask)
    prefixes = [identifier_prefix([g % len(m.rewards.names)]) for g in range(sizes.groups)]
    cond = tokenize_conditioning(m.clip_tokenizer, prefixes, expanded, m.context_length)
    images = host(run.rollout(state, cond["input_ids"], k_roll)[0])
    return images.reshape(sizes.groups, sizes.group_size, *images.shape[1:]), cond["texts"]


def write_pictures(run: Any, state: dict, step: int, rewards: jax.Array, selected: jax.Array,
                   workdir: str | os.PathLike, tensorboard: Any | None) -> None:
    """``workdir/eval/grid_<step>.png`` (``eval_images``, up to ``EVAL_COLUMNS`` per prompt)
    and ``pareto_<step>.png`` (the batch's rewards and selection), also as TensorBoard images.
    Every process takes part in the rollout; process 0 writes."""
    images, texts = eval_images(run, state)
    host_rewards, host_selected = host(rewards), host(selected)
    if jax.process_index() != 0:
        return
    side = max(images.shape[2:4])
    grid = image_grid(images[:, :EVAL_COLUMNS].reshape(-1, *images.shape[2:]),
                      min(EVAL_COLUMNS, images.shape[1]), cell=64 if side < 64 else min(side, 256))
    scatter = pareto_scatter(host_rewards, host_selected, run.models.rewards.names,
                             title=f"iteration {step}")
    out = storage.path(workdir) / "eval"
    out.mkdir(exist_ok=True)
    (out / f"grid_{step:06d}.png").write_bytes(png_bytes(grid))
    (out / f"pareto_{step:06d}.png").write_bytes(png_bytes(scatter))
    logging.info("iteration %d: evaluation grid rows %s", step, texts)
    if tensorboard is not None:
        tensorboard.image(step, "eval/grid", grid)
        tensorboard.image(step, "pareto/scatter", scatter)
        tensorboard.flush()

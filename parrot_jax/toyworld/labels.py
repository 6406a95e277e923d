"""Attribute-derived labels that train the toy world's learned reward heads.

Each label is a hand-written score of the scene's attributes (never of pixels), so the heads
that learn them from CLIP image embeddings are real models with real errors. The scores are built
to conflict, so a weighted sum of rewards trades one against another and the Pareto front is real:

- aesthetics favours luminance contrast between shape and background, sharp edges, the centre,
  medium and large shapes;
- sentiment favours warm colours (red, orange, yellow, pink), bright backgrounds (cream, white),
  round shapes (circle, ring) and soft edges;
- preference (prompt-conditioned, stands for PickScore) favours the prompted shape and colour
  (a large penalty for the wrong ones), the other attributes the prompt names, vivid colour,
  large size and an outline.

Conflicts by construction: on cold-colour prompts ("a blue square") sentiment wants a warm round
shape and preference wants the blue square; for bright shapes sentiment's bright backgrounds kill
aesthetics' contrast; sentiment wants soft edges, aesthetics sharp ones; preference's vivid
colour lowers contrast for dark hues on dark backgrounds while pastel raises it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from parrot_jax.toyworld.captions import parse
from parrot_jax.toyworld.render import BACKGROUND_RGB, fill_rgb, luminance
from parrot_jax.toyworld.world import ATTRIBUTES, Scenes, num_scenes

SENTIMENT_CLASSES = ("positive", "neutral", "negative")

# Per-value score tables, in ATTRIBUTES order.
AESTHETIC_SIZE = np.array([-0.4, 0.2, 0.3])  # small, medium, large
AESTHETIC_SHARP, AESTHETIC_CENTRE, AESTHETIC_CONTRAST = 0.6, 0.4, 2.0
SENTIMENT_COLOUR = np.array([1.0, 1.0, 1.0, -0.5, -1.0, -1.0, 1.0, 0.0])  # red ... white
SENTIMENT_BACKGROUND = np.array([-1.0, -0.7, -0.2, 1.0, 0.8])  # black navy gray cream white
SENTIMENT_SHAPE = np.array([0.8, -0.3, -0.6, 0.5, -0.6])  # circle square triangle ring cross
SENTIMENT_SOFT = 0.7
# Tertiles of sentiment_score over all_scenes(): about a third of the world per class.
SENTIMENT_THRESHOLDS = (-0.15, 1.15)
PREFERENCE_WRONG, PREFERENCE_RIGHT = -3.0, 1.0  # named shape / colour
PREFERENCE_OTHER_WRONG = -1.0  # any other named attribute not matched
PREFERENCE_VIVID, PREFERENCE_OUTLINED = 0.5, 0.4
PREFERENCE_SIZE = np.array([-0.4, 0.0, 0.4])


def _is(scenes: Scenes, attribute: str, value: str) -> np.ndarray:
    return np.asarray(scenes[attribute]) == ATTRIBUTES[attribute].index(value)


def contrast(scenes: Scenes) -> np.ndarray:
    """``[N]`` |luminance(fill) - luminance(background)| from the renderer's palette."""
    num_scenes(scenes)
    fill = luminance(fill_rgb(scenes["colour"], scenes["saturation"]))
    return np.abs(fill - luminance(BACKGROUND_RGB[scenes["background"]]))


def aesthetic_label(scenes: Scenes) -> np.ndarray:
    """``[N]`` float32 aesthetic score (about -0.4 .. 3.2; higher is better)."""
    score = (AESTHETIC_CONTRAST * contrast(scenes) + AESTHETIC_SIZE[scenes["size"]]
             + AESTHETIC_SHARP * _is(scenes, "edges", "sharp")
             + AESTHETIC_CENTRE * _is(scenes, "position", "centre"))
    return score.astype(np.float32)


def sentiment_score(scenes: Scenes) -> np.ndarray:
    """``[N]`` float32 continuous sentiment (higher = more positive); thresholded into labels."""
    num_scenes(scenes)
    score = (SENTIMENT_COLOUR[scenes["colour"]] + SENTIMENT_BACKGROUND[scenes["background"]]
             + SENTIMENT_SHAPE[scenes["shape"]] + SENTIMENT_SOFT * _is(scenes, "edges", "soft"))
    return score.astype(np.float32)


def sentiment_label(scenes: Scenes) -> np.ndarray:
    """``[N]`` int32 class: 0 positive, 1 neutral, 2 negative (``SENTIMENT_CLASSES``)."""
    score = sentiment_score(scenes)
    lo, hi = SENTIMENT_THRESHOLDS
    return np.where(score > hi, 0, np.where(score < lo, 2, 1)).astype(np.int32)


def preference_label(scenes: Scenes, prompts: Sequence[str]) -> np.ndarray:
    """``[N]`` float32 prompt-conditioned preference of scene i for ``prompts[i]``."""
    n = num_scenes(scenes)
    if len(prompts) != n:
        raise ValueError(f"preference_label: {len(prompts)} prompts for {n} scenes")
    score = (PREFERENCE_VIVID * _is(scenes, "saturation", "vivid")
             + PREFERENCE_OUTLINED * _is(scenes, "outline", "outlined")
             + PREFERENCE_SIZE[scenes["size"]]).astype(np.float64)
    for i, prompt in enumerate(prompts):
        for a, v in parse(prompt).items():
            match = scenes[a][i] == ATTRIBUTES[a].index(v)
            if a in ("shape", "colour"):
                score[i] += PREFERENCE_RIGHT if match else PREFERENCE_WRONG
            elif not match:
                score[i] += PREFERENCE_OTHER_WRONG
    return score.astype(np.float32)

"""A small synthetic Promptist-style dataset: short prompts and rule-based expansions.

The expansion is a deterministic function of the prompt (the subject picks a style, the colour
picks a lighting phrase, a fixed quality tail follows), so a PEN trained on it must lower its
held-out loss by learning the rule: what the SFT smoke runs and tests need, with no download.
"""

from __future__ import annotations

import numpy as np

from parrot_jax.data.promptist import PromptPair

SUBJECTS = ("cat", "dog", "house", "tree", "car", "bird", "mountain", "ship", "flower", "robot")
COLOURS = ("red", "blue", "green", "yellow", "white", "black")
SIZES = ("small", "large", "tiny", "huge")
# subject -> style phrase; colour -> lighting phrase.
STYLES = ("oil painting", "digital art", "watercolor", "concept art", "photograph")
LIGHTS = ("golden hour", "soft light", "studio lighting", "dramatic light", "neon glow")
TAIL = "highly detailed, sharp focus, trending on artstation"


def synthetic_pairs(n: int, seed: int = 0) -> list[PromptPair]:
    """``n`` pairs like ``a small red cat`` -> ``a small red cat, oil painting, golden hour,
    highly detailed, ...``; sources are ``synthetic:<index>``."""
    if n <= 0:
        raise ValueError(f"synthetic dataset size must be positive, got {n}")
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        s, c, z = (int(rng.integers(len(SUBJECTS))), int(rng.integers(len(COLOURS))),
                   int(rng.integers(len(SIZES))))
        prompt = f"a {SIZES[z]} {COLOURS[c]} {SUBJECTS[s]}"
        expansion = f"{prompt}, {STYLES[s % len(STYLES)]}, {LIGHTS[c % len(LIGHTS)]}, {TAIL}"
        pairs.append(PromptPair(prompt, expansion, f"synthetic:{i}"))
    return pairs

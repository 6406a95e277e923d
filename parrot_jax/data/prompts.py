"""The RL prompts of a run (``config.data.prompts``) and the draw of each iteration's prompts.

Every host reads the whole list; the draw of an iteration's prompts is a pure function of
(seed, position), so all hosts agree on the global batch without communicating, and a resumed
run repeats nothing and skips nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from parrot_jax.data.promptist import DatasetError, read_prompts

# The built-in RL prompts (data.prompts = 'builtin'): short user prompts of the kind the PEN
# expands, varied enough that groups differ.
BUILTIN_PROMPTS = (
    "a red circle on a white background", "a blue square at night", "a small green triangle",
    "a yellow star in the sky", "an orange cat sitting on a sofa", "a dog running on the beach",
    "a castle on a hill", "a bowl of fruit on a table", "a portrait of an old man",
    "a city street in the rain", "a forest in autumn", "a lighthouse by the sea",
    "a cup of coffee", "a mountain lake at sunrise", "a red car on a bridge",
    "a bird on a branch", "a vase of flowers", "a snowy village", "a robot reading a book",
    "a sailing boat at sunset", "a field of sunflowers", "a teddy bear on a bed",
    "a house with a garden", "a horse in a meadow", "a bicycle against a wall",
    "an astronaut riding a horse", "a desert with cactus", "a waterfall in the jungle",
    "a plate of pasta", "a train in the mountains", "a penguin on the ice", "a purple balloon",
)
TFDS_PREFIX = "tfds:"


def tfds_prompts(spec: str) -> list[str]:
    """``'tfds:<data_dir>[:<split>]'`` (split ``train`` by default): the distinct user prompts
    of a prepared ``promptist_pairs`` TFDS dataset (the PEN SFT data), in record order."""
    from parrot_jax.data.pipeline import as_pair
    from parrot_jax.data.tfds_promptist import data_source

    data_dir, _, split = spec[len(TFDS_PREFIX):].rpartition(":")
    if not data_dir:  # no split given
        data_dir, split = spec[len(TFDS_PREFIX):], "train"
    source = data_source(data_dir, split)
    prompts = list(dict.fromkeys(as_pair(source[i]).prompt for i in range(len(source))))
    if not prompts:
        raise DatasetError(f"config.data.prompts={spec!r}: the split holds no prompts")
    return prompts


def load_prompts(source: str) -> list[str]:
    """``config.data.prompts``: 'builtin', a text file with one prompt per line, or a prepared
    TFDS dataset ``'tfds:<data_dir>[:<split>]'`` (``tfds_prompts``)."""
    if source == "builtin":
        return list(BUILTIN_PROMPTS)
    if source.startswith(TFDS_PREFIX):
        return tfds_prompts(source)
    if not Path(source).is_file():
        raise FileNotFoundError(f"config.data.prompts={source!r}: no such file (or 'builtin')")
    return read_prompts(source)


def draw_prompts(prompts: Sequence[str], seed: int, position: int,
                 count: int) -> np.ndarray:
    """int ``[count]``: the prompt indices of draw number ``position`` (a pure function of the
    seed and the position, so resuming at a position repeats nothing and skips nothing)."""
    rng = np.random.default_rng([seed, position])
    return rng.choice(len(prompts), count, replace=len(prompts) < count)

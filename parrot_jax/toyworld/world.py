"""The toy world's attributes and scene sampling.

A scene is one shape on a plain background, described by eight discrete attributes. A batch of
scenes is a dict ``attribute -> int array [N]`` of indices into ``ATTRIBUTES[attribute]``, so
sampling, rendering and labelling stay vectorised over N.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "ring", "cross"),
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white"),
    "background": ("black", "navy", "gray", "cream", "white"),
    "size": ("small", "medium", "large"),
    "position": ("centre", "left", "right", "top", "bottom"),
    "saturation": ("vivid", "pastel"),
    "edges": ("sharp", "soft"),
    "outline": ("none", "outlined"),
}

Scenes = dict[str, np.ndarray]


def value_index(attribute: str, value: str) -> int:
    """Index of ``value`` in ``ATTRIBUTES[attribute]``, with an error naming what is allowed."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {list(ATTRIBUTES)}")
    values = ATTRIBUTES[attribute]
    if value not in values:
        raise ValueError(f"{attribute}={value!r}: expected one of {list(values)}")
    return values.index(value)


def num_scenes(scenes: Scenes) -> int:
    """N, after checking that ``scenes`` has every attribute as an in-range int array ``[N]``."""
    missing = [a for a in ATTRIBUTES if a not in scenes]
    if missing:
        raise ValueError(f"scenes lack attributes {missing}")
    extra = [a for a in scenes if a not in ATTRIBUTES]
    if extra:
        raise ValueError(f"scenes have unknown attributes {extra}")
    sizes = {a: np.shape(scenes[a]) for a in ATTRIBUTES}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"scene attributes must be 1-D arrays of one length, got shapes {sizes}")
    for a, values in ATTRIBUTES.items():
        idx = np.asarray(scenes[a])
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"scenes[{a!r}] must be integer indices, got dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(values)):
            raise ValueError(f"scenes[{a!r}] has indices outside [0, {len(values)})")
    return int(sizes["shape"][0])


def sample_scenes(rng: np.random.Generator, n: int,
                  fixed: Mapping[str, str] | None = None) -> Scenes:
    """N scenes with every attribute uniform, except those in ``fixed`` (attribute -> value)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fixed = dict(fixed or {})
    for a, v in fixed.items():
        value_index(a, v)  # validates
    scenes = {}
    for a, values in ATTRIBUTES.items():  # always draw, so `fixed` does not shift the stream
        draw = rng.integers(0, len(values), n)
        scenes[a] = np.full(n, value_index(a, fixed[a])) if a in fixed else draw
    return scenes


def all_scenes() -> Scenes:
    """Every combination of attribute values (24,000 scenes), in ``np.ndindex`` order."""
    grids = np.meshgrid(*[np.arange(len(v)) for v in ATTRIBUTES.values()], indexing="ij")
    return {a: g.reshape(-1) for a, g in zip(ATTRIBUTES, grids)}


def describe(scenes: Scenes, i: int) -> dict[str, str]:
    """Scene ``i`` as attribute -> value name (for logs and tests)."""
    return {a: ATTRIBUTES[a][int(scenes[a][i])] for a in ATTRIBUTES}


def select(scenes: Scenes, index: np.ndarray) -> Scenes:
    """The scenes at ``index`` (int array or boolean mask over N)."""
    return {a: np.asarray(v)[index] for a, v in scenes.items()}

"""Random parameters of a module, drawn with numpy (no compiled ``init``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def random_params(module: Any, seed: int, dtype: Any = None,
                  put: Callable[[np.ndarray], Any] | None = None) -> Any:
    """Random parameters of ``module`` (its ``init_params`` shapes) drawn with numpy from
    ``seed``: kernels ~ N(0, 1/fan_in), norm scales 1, biases 0, ``logit_scale`` log(1/0.07),
    other tables ~ N(0, 0.02^2). Compiling ``init`` costs tens of seconds on a CPU even for tiny
    models; this costs nothing and is as random. ``dtype``: store every leaf in it (default:
    the module's); ``put``: applied to each leaf as it is drawn (e.g. ``jnp.asarray``: a
    full-size model then never exists twice in host memory)."""
    shapes = jax.eval_shape(lambda: module.init_params(jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def draw(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = str(getattr(path[-1], "key", path[-1]))
        shape = leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif name in ("scale", "weight") and len(shape) == 1:
            value = np.ones(shape)
        elif name == "bias":
            value = np.zeros(shape)
        elif name == "logit_scale":
            value = np.full(shape, np.log(1 / 0.07))
        else:
            value = 0.02 * rng.standard_normal(shape)
        value = np.asarray(value, leaf.dtype if dtype is None else dtype)
        return value if put is None else put(value)

    return jax.tree_util.tree_map_with_path(draw, shapes)

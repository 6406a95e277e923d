"""Reward sets and image metrics by name, found through Python entry points.

``config.model.rewards = '<name>[:<argument>]'`` names a reward set of the entry-point group
``parrot_jax.reward_sets``: a function ``(argument, *, sharding, dtype) -> RewardSet``.
``config.final_eval.image_metrics = '<name>,...'`` names functions of the group
``parrot_jax.image_metrics``: ``(images [B, H, W, 3] in [0, 1], prompts [B]) -> {metric name:
values [B]}``, measured beside the rewards at the end of training (recorded under the names
returned). This package registers the paper's reward set (``parrot``) and the toy world's
rewards and pixel oracle (``toy``, ``toy_oracle``) in ``pyproject.toml``, exactly as another
package would register its own, so the core never imports the toy world.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

REWARD_SETS = "parrot_jax.reward_sets"
IMAGE_METRICS = "parrot_jax.image_metrics"


class PluginError(ValueError):
    """A name no installed package registers (the message lists those that are)."""


def registered(group: str) -> dict[str, Any]:
    """``{name: entry point}`` of ``group`` over every installed package."""
    return {e.name: e for e in entry_points(group=group)}


def load(group: str, name: str) -> Callable[..., Any]:
    """The function registered as ``name`` in ``group``."""
    found = registered(group)
    if name not in found:
        raise PluginError(f"no installed package registers {name!r} in the entry-point group "
                          f"{group!r} (registered: {sorted(found)}; is parrot-jax installed, "
                          "e.g. with pip install -e .?)")
    return found[name].load()


def reward_set(spec: str, *, sharding: Any = None, dtype: str = "float32") -> Any:
    """The ``RewardSet`` that ``config.model.rewards = '<name>[:<argument>]'`` names."""
    name, _, argument = spec.partition(":")
    return load(REWARD_SETS, name)(argument, sharding=sharding, dtype=dtype)


def image_metrics(spec: str) -> list[Callable[..., dict[str, Any]]]:
    """The functions ``config.final_eval.image_metrics = 'a,b'`` names ('' = none)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    try:
        return [load(IMAGE_METRICS, n) for n in names]
    except PluginError as e:
        raise PluginError(f"config.final_eval.image_metrics={spec!r}: {e}") from e

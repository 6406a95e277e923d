"""``config.matmul_precision``: the precision every program of a run compiles its float32
matmuls and convolutions with (training, its closing evaluation, sampling, the diagnostics, the
AOT planner). The field's values and its check are in ``parrot_jax.config``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections


def matmul_precision(config: ml_collections.ConfigDict) -> Any:
    """A context that compiles everything inside with ``config.matmul_precision``.

    The PPO ratio compares the update's recomputed log-probs with the rollout's: two programs
    that XLA fuses differently, so reduced-precision float32 matmuls make the ratio at the
    sampling policy differ from 1 by more than the clip range (``t2i/clipfrac_first``)."""
    return jax.default_matmul_precision(config.matmul_precision)


def under_matmul_precision(config_of: Callable[[Any], ml_collections.ConfigDict] = lambda c: c
                           ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(first, ...)`` runs under ``matmul_precision(config_of(first))``; the
    first argument is the config itself by default (a policy's: ``lambda p: p.config``)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(first: Any, *args: Any, **kwargs: Any) -> Any:
            with matmul_precision(config_of(first)):
                return fn(first, *args, **kwargs)

        return wrapped

    return decorate

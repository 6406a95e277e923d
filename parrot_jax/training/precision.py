"""``config.matmul_precision``: the precision every program of a run compiles its float32
matmuls and convolutions with (training, its closing evaluation, sampling, the AOT planner)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

# jax.default_matmul_precision's names for float32 matmuls and convolutions on accelerators
# (CPUs compute float32 whatever the setting): 'default' is one bfloat16 pass on a TPU and TF32
# on recent GPUs; 'highest' is float32; 'high' and the explicit names lie between.
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


def check_matmul_precision(config: ml_collections.ConfigDict) -> str:
    """``config.matmul_precision`` ('default' when absent, as in older workdirs), checked."""
    value = config.get("matmul_precision", "default")
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"config.matmul_precision={value!r}; one of {MATMUL_PRECISIONS}")
    return value


def matmul_precision(config: ml_collections.ConfigDict) -> Any:
    """A context that compiles everything inside with ``config.matmul_precision``.

    The PPO ratio compares the update's recomputed log-probs with the rollout's: two programs
    that XLA fuses differently, so reduced-precision float32 matmuls make the ratio at the
    sampling policy differ from 1 by more than the clip range (``t2i/clipfrac_first``)."""
    return jax.default_matmul_precision(check_matmul_precision(config))


def under_matmul_precision(config_of: Callable[[Any], ml_collections.ConfigDict] = lambda c: c
                           ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(first, ...)`` runs under ``matmul_precision(config_of(first))``; the
    first argument is the config itself by default (a loaded run's: ``lambda r: r.config``)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(first: Any, *args: Any, **kwargs: Any) -> Any:
            with matmul_precision(config_of(first)):
                return fn(first, *args, **kwargs)

        return wrapped

    return decorate

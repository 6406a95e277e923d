"""The optimizer both policies use: global-norm clipping, then AdamW."""

from __future__ import annotations

from typing import Any

import optax


def clipped_adamw(config: Any, warmup_steps: int = 0) -> optax.GradientTransformation:
    """AdamW from ``config``'s ``learning_rate``, ``b1``, ``b2``, ``eps`` and ``weight_decay``,
    preceded by ``optax.clip_by_global_norm(config.max_grad_norm)`` unless that is None.

    ``warmup_steps > 0``: the rate rises linearly from 0 at the first step to
    ``learning_rate`` at step ``warmup_steps`` and stays there. AdamW's first steps move every
    weight by about the rate whatever the gradient's size (its moments start from one sample),
    which a warm-up tempers."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    rate = (optax.linear_schedule(0.0, config.learning_rate, warmup_steps) if warmup_steps
            else config.learning_rate)
    adamw = optax.adamw(rate, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)

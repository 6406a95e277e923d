"""The optimizer both policies use: global-norm clipping, then AdamW."""

from __future__ import annotations

from typing import Any

import optax


def clipped_adamw(config: Any) -> optax.GradientTransformation:
    """AdamW from ``config``'s ``learning_rate``, ``b1``, ``b2``, ``eps`` and ``weight_decay``,
    preceded by ``optax.clip_by_global_norm(config.max_grad_norm)`` unless that is None."""
    adamw = optax.adamw(config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)

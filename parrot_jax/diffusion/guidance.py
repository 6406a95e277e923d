"""Classifier-free guidance and Parrot's original-prompt-centred guidance (Eq. 5).

A guidance rule has ``G`` branches (text conditions) and combines the model's ``G`` predictions
into one. The guided model output is computed with **one** batched model call over all branches:
the branches of a sample sit next to each other (``[B, G, ...]`` flattened to ``[B*G, ...]``), so
a batch sharded over devices stays sharded without moving data.

Guidance weights are pytree leaves: changing them does not recompile a jitted sampler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
from flax import struct

# The denoiser: ``(params, x [N, h, w, c], t [N], context [N, L, D]) -> prediction like x``.
DenoiseFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def classifier_free_guidance(eps_uncond: jax.Array, eps_cond: jax.Array,
                             w: float | jax.Array) -> jax.Array:
    """Parrot's Eq. 1: ``w eps(c) + (1 - w) eps(null) = eps(null) + w (eps(c) - eps(null))``."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def prompt_centred_guidance(eps_null: jax.Array, eps_orig: jax.Array, eps_expanded: jax.Array,
                            w1: float | jax.Array = 5.0,
                            w2: float | jax.Array = 5.0) -> jax.Array:
    """Parrot's Eq. 5: ``eps(null) + w1 (eps(c) - eps(null)) + w2 (eps(c_hat) - eps(null))``.

    ``c`` is the user's original prompt and ``c_hat`` its expansion; w1 = w2 = 5 in the paper.
    """
    return eps_null + w1 * (eps_orig - eps_null) + w2 * (eps_expanded - eps_null)


class Guidance(Protocol):
    """A guidance rule: ``num_branches`` contexts per sample in, one prediction out."""

    num_branches: ClassVar[int]

    def combine(self, preds: jax.Array) -> jax.Array:
        """``[B, G, ...]`` per-branch predictions -> ``[B, ...]`` guided prediction."""
        ...


@struct.dataclass
class CFG:
    """Classifier-free guidance; branches ``(null, prompt)``. ``scale`` is the paper's ``w``."""

    scale: float | jax.Array = 5.0
    num_branches: ClassVar[int] = 2

    def combine(self, preds: jax.Array) -> jax.Array:
        return classifier_free_guidance(preds[:, 0], preds[:, 1], self.scale)


@struct.dataclass
class PromptCentredGuidance:
    """Original-prompt-centred guidance; branches ``(null, original, expanded)``."""

    w1: float | jax.Array = 5.0
    w2: float | jax.Array = 5.0
    num_branches: ClassVar[int] = 3

    def combine(self, preds: jax.Array) -> jax.Array:
        return prompt_centred_guidance(preds[:, 0], preds[:, 1], preds[:, 2], self.w1, self.w2)


def branch_contexts(*contexts: jax.Array, batch: int | None = None) -> jax.Array:
    """Stack per-branch text contexts into ``[B, G, L, D]``, in the rule's branch order.

    Each context is ``[B, L, D]``, or ``[L, D]`` / ``[1, L, D]`` (e.g. the null prompt), which is
    broadcast to the batch (``batch`` when every context is unbatched).
    """
    batched = [c.shape[0] for c in contexts if c.ndim == 3 and c.shape[0] != 1]
    b = batched[0] if batched else (batch or 1)
    if any(n != b for n in batched):
        raise ValueError(f"contexts have different batch sizes: {[c.shape for c in contexts]}")
    full = [jnp.broadcast_to(c if c.ndim == 3 else c[None], (b,) + c.shape[-2:])
            for c in contexts]
    return jnp.stack(full, axis=1)


def guided_model_output(denoise_fn: DenoiseFn, params: Any, x: jax.Array,
                        timestep: jax.Array | int, contexts: jax.Array,
                        guidance: Guidance) -> jax.Array:
    """The guided prediction for ``x`` ``[B, h, w, c]`` at ``timestep`` (scalar or ``[B]``).

    contexts: ``[B, G, L, D]`` with ``G = guidance.num_branches``. One model call on
    ``[B*G, ...]``.
    """
    b, g = contexts.shape[:2]
    if g != guidance.num_branches or b != x.shape[0]:
        raise ValueError(f"contexts {contexts.shape} do not fit x {x.shape} and "
                         f"{type(guidance).__name__} ({guidance.num_branches} branches)")
    xs = jnp.broadcast_to(x[:, None], (b, g) + x.shape[1:]).reshape((b * g,) + x.shape[1:])
    t = jnp.broadcast_to(jnp.asarray(timestep)[..., None], (b, g)).reshape(b * g)
    preds = denoise_fn(params, xs, t, contexts.reshape((b * g,) + contexts.shape[2:]))
    return guidance.combine(preds.reshape((b, g) + preds.shape[1:]))

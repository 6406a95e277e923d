"""Teacher-forced scoring of given expansions under the PEN: ``log p(ĉ | c)`` token by token.

One function serves SFT (cross-entropy is ``-sum(token_log_probs) / sum(target_mask)``), the
REINFORCE update (``sequence_log_prob`` of the sampled expansion, differentiable in the
parameters) and the check that the log-probs recorded while sampling are the model's own.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from parrot_jax.models.t5 import T5ForConditionalGeneration


def shift_right(targets: jax.Array, start_token: int) -> jax.Array:
    """Teacher-forcing decoder inputs ``[start, t_0, ..., t_{T-2}]`` from targets ``[B, T]``."""
    start = jnp.full(targets.shape[:1] + (1,), start_token, targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def gather_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log_softmax(logits)[..., token]`` in float32: logits ``[..., V]``, tokens ``[...]``."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_log_probs(module: T5ForConditionalGeneration, params: Any, input_ids: jax.Array,
                    attention_mask: jax.Array | None, targets: jax.Array,
                    target_mask: jax.Array) -> jax.Array:
    """``log p(targets[:, j] | input, targets[:, :j])`` -> float32 ``[B, T]``, 0 where masked.

    input_ids / attention_mask ``[B, S]`` (the templated prompt); targets / target_mask
    ``[B, T]`` (the expansion including its EOS, 1 at real tokens). The decoder reads
    ``config.start_token`` then the targets shifted right, causally, so a position's score never
    depends on later (padding) tokens and equals the cached sampler's step at that position.
    Targets under a zero mask may hold any value (e.g. -100). Differentiable in ``params``.
    """
    targets = jnp.asarray(targets)
    valid = jnp.asarray(target_mask).astype(bool)
    safe = jnp.where(valid, targets, 0).astype(jnp.int32)
    decoder_ids = shift_right(safe, module.config.start_token)
    logits = module.apply({"params": params}, input_ids, attention_mask, decoder_ids)
    return jnp.where(valid, gather_log_probs(logits, safe), 0.0)


def sequence_log_prob(module: T5ForConditionalGeneration, params: Any, input_ids: jax.Array,
                      attention_mask: jax.Array | None, targets: jax.Array,
                      target_mask: jax.Array) -> jax.Array:
    """``log p(ĉ | c)`` = the sum over T of ``token_log_probs`` -> float32 ``[B]``."""
    return jnp.sum(token_log_probs(module, params, input_ids, attention_mask, targets,
                                   target_mask), axis=-1)

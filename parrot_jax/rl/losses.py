"""The DDPO importance-sampling objective for the diffusion policy (DDPO_IS, Black et al. 2023).

Arrays in, arrays out. The only model contact is ``rescore_log_prob``, which takes the denoiser
as a callable and re-evaluates stored transitions through the sampler's own ``policy_step``
(same guidance rule, same weights, same DDIM step), so an unchanged policy gives ratio 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from parrot_jax.diffusion import DDIMSchedule, Guidance, policy_step
from parrot_jax.diffusion.sampler import Denoiser


def rescore_log_prob(denoiser: Denoiser, params: Any, schedule: DDIMSchedule,
                     contexts: jax.Array, guidance: Guidance, x_t: jax.Array,
                     timestep: jax.Array | int, prev_sample: jax.Array, *,
                     eta: float | jax.Array) -> jax.Array:
    """``log pi_params(prev_sample | x_t, c)`` ``[B]`` for stored transitions.

    x_t, prev_sample: ``[B, h, w, c]``; timestep: scalar or per-sample ``[B]`` (e.g. after
    shuffling timesteps per sample); contexts ``[B, G, L, D]``, guidance and eta as sampled.
    Differentiable in ``params``; ``prev_sample`` is stop-gradient.
    """
    _, log_prob = policy_step(denoiser, params, schedule, contexts, guidance, x_t, timestep,
                              eta=eta, prev_sample=prev_sample)
    return log_prob


def ddpo_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, *,
              clip_range: float = 1e-4,
              adv_clip: float | None = 5.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped importance-ratio loss ``mean(max(-A rho, -A clip(rho, 1-eps, 1+eps)))``.

    log_prob: ``[B]`` (or ``[B, ...]``) under the current parameters; old_log_prob: the same
    shape, recorded at sampling (treated as data); advantages: broadcastable to it, clipped to
    ``+-adv_clip`` (None: unclipped). ``rho = exp(log_prob - old_log_prob)``; eps =
    ``clip_range``.

    Returns ``(loss, metrics)``; metrics (no gradient): ``approx_kl = mean(dlogp^2) / 2``,
    ``clipfrac`` (share of ``|rho - 1| > eps``), ``ratio`` / ``ratio_min`` / ``ratio_max``
    (mean, min and max rho).
    """
    old_log_prob = jax.lax.stop_gradient(old_log_prob)
    advantages = jax.lax.stop_gradient(advantages)
    if adv_clip is not None:
        advantages = jnp.clip(advantages, -adv_clip, adv_clip)
    advantages = jnp.broadcast_to(advantages, log_prob.shape)
    log_ratio = log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = jnp.mean(jnp.maximum(unclipped, clipped))
    log_ratio, ratio = jax.lax.stop_gradient((log_ratio, ratio))
    metrics = {
        "approx_kl": 0.5 * jnp.mean(log_ratio**2),
        "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
        "ratio": jnp.mean(ratio),
        "ratio_min": jnp.min(ratio),
        "ratio_max": jnp.max(ratio),
    }
    return loss, metrics


def ddpo_timestep_loss(denoiser: Denoiser, params: Any, schedule: DDIMSchedule,
                       contexts: jax.Array, guidance: Guidance, x_t: jax.Array,
                       timestep: jax.Array | int, prev_sample: jax.Array,
                       old_log_prob: jax.Array, advantages: jax.Array, *,
                       eta: float | jax.Array, clip_range: float = 1e-4,
                       adv_clip: float | None = 5.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``ddpo_loss`` of one (per-sample) timestep's transitions, re-scored under ``params``.

    The function to differentiate in the training step's scan over timesteps.
    """
    log_prob = rescore_log_prob(denoiser, params, schedule, contexts, guidance, x_t, timestep,
                                prev_sample, eta=eta)
    return ddpo_loss(log_prob, old_log_prob, advantages, clip_range=clip_range,
                     adv_clip=adv_clip)

"""The DDPO policy rollout: S guided, stochastic DDIM steps in one ``lax.scan``.

``policy_step`` is the policy ``pi_theta(x_{t-1} | x_t, c)``: one batched, guided model call and a
``ddim_step``. The rollout samples with it; training re-scores stored transitions with it (see
``parrot_jax.rl.losses.rescore_log_prob``), so both compute the log-prob by the same code.

The model enters as a ``DenoiseFn`` ``(params, x, t, context) -> prediction`` or as a linen module
(applied as ``module.apply({'params': params}, x, t, context)``), e.g. the UNet.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from parrot_jax import parallel
from parrot_jax.diffusion.ddim import ddim_step, static_value
from parrot_jax.diffusion.guidance import DenoiseFn, Guidance, guided_model_output
from parrot_jax.diffusion.schedule import DDIMSchedule

Denoiser = DenoiseFn | nn.Module


@struct.dataclass
class Trajectory:
    """A batch of sampled chains.

    latents: ``[B, S+1, h, w, c]``, ``x_T`` first, ``x_0`` last; step ``j`` maps
    ``latents[:, j]`` to ``latents[:, j+1]`` at ``timesteps[j]``.
    log_probs: ``[B, S]``, ``log pi(latents[:, j+1] | latents[:, j])``; None when not computed.
    timesteps: int32 ``[S]``.
    """

    latents: jax.Array
    log_probs: jax.Array | None
    timesteps: jax.Array


def denoise_fn(denoiser: Denoiser) -> DenoiseFn:
    """A ``DenoiseFn``; a linen module is applied with ``{'params': params}``."""
    if isinstance(denoiser, nn.Module):
        return lambda params, x, t, ctx: denoiser.apply({"params": params}, x, t, ctx)
    return denoiser


def policy_step(denoiser: Denoiser, params: Any, schedule: DDIMSchedule, contexts: jax.Array,
                guidance: Guidance, x_t: jax.Array, timestep: jax.Array | int, *,
                eta: float | jax.Array, key: jax.Array | None = None,
                noise: jax.Array | None = None, prev_sample: jax.Array | None = None,
                with_log_prob: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """``(x_{t-1} [B, h, w, c], log_prob [B])`` from ``x_t`` ``[B, h, w, c]``.

    contexts: ``[B, G, L, D]`` in ``guidance``'s branch order; timestep: scalar or ``[B]``.
    ``key`` / ``noise`` / ``prev_sample`` as in ``ddim_step``.
    """
    pred = guided_model_output(denoise_fn(denoiser), params, x_t, timestep, contexts, guidance)
    return ddim_step(schedule, pred, timestep, x_t, eta=eta, key=key, noise=noise,
                     prev_sample=prev_sample, with_log_prob=with_log_prob)


def rollout(denoiser: Denoiser, params: Any, schedule: DDIMSchedule, contexts: jax.Array,
            guidance: Guidance, key: jax.Array, *, latent_shape: tuple[int, int, int],
            eta: float = 1.0, with_log_probs: bool = True,
            sharding: jax.sharding.Sharding | None = None,
            chunks: int = 1) -> tuple[jax.Array, Trajectory]:
    """Sample ``x_0`` ``[B, h, w, c]`` from ``x_T ~ N(0, I)`` and return it with its trajectory.

    contexts: ``[B, G, L, D]`` (see ``branch_contexts``); latent_shape: ``(h, w, c)``. ``key``
    fixes ``x_T`` and every step's noise. ``sharding`` (e.g. ``NamedSharding(mesh,
    P('data'))``) constrains the latents ``[B, h, w, c]`` inside the loop, keeping the batch
    sharded. ``with_log_probs=False`` (required for ``eta=0``) skips the log-probs.
    ``chunks`` > 1 runs the batch as that many chunks in turn (``parallel.chunk_rows``: rows
    ``j, j + chunks, ...``), each a whole S-step chain: the activation memory of one chunk,
    the same samples (each chunk takes its rows of the full batch's noise). Traceable;
    ``sample`` is this function jitted.
    """
    batch = contexts.shape[0]
    if batch % chunks:
        raise ValueError(f"rollout: {chunks} chunks do not divide the batch of {batch}")
    init_key, steps_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, (batch, *latent_shape), jnp.float32)
    constrain = ((lambda x: x) if sharding is None
                 else functools.partial(jax.lax.with_sharding_constraint, shardings=sharding))
    x_T = constrain(x_T)
    deterministic = static_value(eta) == 0.0  # no noise to draw (and no log-prob: raises)
    steps = (schedule.timesteps, jax.random.split(steps_key, schedule.num_inference_steps))

    def chain(j):
        """Chunk j's S steps: (x_0, latents [S, B/c, ...], log-probs [S, B/c] or None)."""
        ctx = parallel.chunk_rows(contexts, j, chunks)

        def body(x, step):
            t, step_key = step
            noise = None
            if not deterministic:  # the full batch's draw (as ddim_step's key would), our rows
                noise = constrain(jax.random.normal(step_key, (batch, *latent_shape)))
                noise = parallel.chunk_rows(noise, j, chunks)
            x_prev, log_prob = policy_step(denoiser, params, schedule, ctx, guidance, x, t,
                                           eta=eta, noise=noise, with_log_prob=with_log_probs)
            x_prev = constrain(x_prev)
            return x_prev, (x_prev, log_prob)

        return jax.lax.scan(body, parallel.chunk_rows(x_T, j, chunks), steps)

    if chunks == 1:
        x_0, (chain_latents, log_probs) = chain(0)  # [S, B, ...], [S, B]
    else:  # [c, ...] stacks of [B/c, ...], [c, S, B/c, ...], [c, S, B/c]
        x_0, (chain_latents, log_probs) = jax.lax.map(chain, jnp.arange(chunks))
        x_0 = constrain(parallel.unchunk_rows(x_0))
        chain_latents = jax.vmap(parallel.unchunk_rows, 1)(chain_latents)
        if log_probs is not None:
            log_probs = jax.vmap(parallel.unchunk_rows, 1)(log_probs)
    latents = jnp.moveaxis(jnp.concatenate([x_T[None], chain_latents]), 0, 1)
    log_probs = None if log_probs is None else log_probs.T
    return x_0, Trajectory(latents=latents, log_probs=log_probs, timesteps=schedule.timesteps)


# The rollout compiled once per (denoiser, shapes, latent_shape, eta, with_log_probs, sharding).
sample = jax.jit(rollout, static_argnames=("denoiser", "latent_shape", "eta", "with_log_probs",
                                           "sharding", "chunks"))

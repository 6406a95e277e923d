"""The stochastic DDIM step as a Gaussian policy ``pi(x_{t-1} | x_t)`` with its log-density.

Sampling and re-scoring run the same function: given a PRNG key (or the noise itself) it draws
``x_{t-1}``; given ``prev_sample`` it only evaluates that sample's log-probability. Either way
the mean and std come from one computation, so the importance ratio of an unchanged policy is 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from parrot_jax.diffusion.schedule import DDIMSchedule

STD_FLOOR = 1e-6  # the log-density's std is floored here (DDPO), so eta -> 0 stays finite


def static_value(x: float | jax.Array) -> float | None:
    """``x`` as a Python float when it is known at trace time, else None (a traced value)."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return None


def _per_sample(value: jax.Array, ndim: int) -> jax.Array:
    """A scalar or ``[B]`` value shaped to broadcast against ``[B, ...]`` of rank ``ndim``."""
    return value if value.ndim == 0 else value.reshape(value.shape + (1,) * (ndim - 1))


def ddim_step(schedule: DDIMSchedule, model_output: jax.Array, timestep: jax.Array | int,
              sample: jax.Array, *, eta: float | jax.Array, key: jax.Array | None = None,
              noise: jax.Array | None = None, prev_sample: jax.Array | None = None,
              with_log_prob: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """One DDIM step ``x_t -> x_{t-1}`` and ``log pi(x_{t-1} | x_t)``.

    model_output: ``[B, ...]`` the (guided) eps, v or x0 prediction, per
    ``schedule.prediction_type``. sample: ``x_t`` ``[B, ...]``. timestep: ``t``, a scalar or
    per-sample ``[B]`` (int, values from ``schedule.timesteps``). eta: 0 is deterministic DDIM, 1
    the DDPM posterior variance.

    Give at most one of ``key`` (draw the noise), ``noise`` (``[B, ...]`` standard normal) and
    ``prev_sample`` (``x_{t-1}`` to re-score); none only for deterministic sampling, ``eta=0``.

    Returns ``(prev_sample [B, ...], log_prob [B])``: the Gaussian log-density of
    ``stop_gradient(prev_sample)`` under ``N(mean, std^2)``, averaged over the non-batch
    dimensions, std floored at 1e-6; gradients reach it through the mean. With
    ``with_log_prob=False`` the log-prob is None. A log-prob with ``eta=0`` (known at trace time)
    raises: the policy is then deterministic and has no density.
    """
    given = [name for name, v in (("key", key), ("noise", noise), ("prev_sample", prev_sample))
             if v is not None]
    eta_value = static_value(eta)
    if len(given) > 1:
        raise ValueError(f"ddim_step: give at most one of key, noise, prev_sample; got {given}")
    if not given and eta_value != 0.0:
        raise ValueError("ddim_step: give key, noise or prev_sample (only eta=0 needs none)")
    if with_log_prob and eta_value == 0.0:
        raise ValueError("ddim_step: the log-prob is undefined with eta=0 (a deterministic "
                         "step); use eta > 0, or with_log_prob=False for plain sampling")
    t = jnp.asarray(timestep)
    if t.ndim > 1 or (t.ndim == 1 and t.shape != sample.shape[:1]):
        raise ValueError(f"timestep must be a scalar or [B] with B={sample.shape[0]}; "
                         f"got shape {t.shape}")

    x = sample.astype(jnp.float32)
    out = model_output.astype(jnp.float32)
    alpha_t, alpha_prev = (_per_sample(a, x.ndim) for a in schedule.alpha_bars(t))
    beta_t = 1.0 - alpha_t
    if schedule.prediction_type == "epsilon":
        x0, eps = (x - jnp.sqrt(beta_t) * out) / jnp.sqrt(alpha_t), out
    elif schedule.prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_t) * x - jnp.sqrt(beta_t) * out
        eps = jnp.sqrt(alpha_t) * out + jnp.sqrt(beta_t) * x
    elif schedule.prediction_type == "sample":
        x0, eps = out, (x - jnp.sqrt(alpha_t) * out) / jnp.sqrt(beta_t)
    else:
        raise ValueError(f"unknown prediction_type {schedule.prediction_type!r}")
    if schedule.clip_sample_range is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)

    # DDIM (Song et al. 2021, Eq. 12/16): sigma_t^2 = eta^2 (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev).
    variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev)
    std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)
    mean = (jnp.sqrt(alpha_prev) * x0
            + jnp.sqrt(jnp.maximum(1.0 - alpha_prev - std**2, 0.0)) * eps)

    if prev_sample is None:
        if key is not None:
            noise = jax.random.normal(key, x.shape, jnp.float32)
        prev_sample = (mean if noise is None else mean + std * noise).astype(sample.dtype)
    if not with_log_prob:
        return prev_sample, None
    return prev_sample, gaussian_log_prob(prev_sample, mean, std)


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """``log N(stop_gradient(x); mean, max(std, 1e-6)^2)`` averaged over non-batch dims: ``[B]``."""
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    std = jnp.maximum(std, STD_FLOOR)
    log_density = (-((x - mean) ** 2) / (2.0 * std**2) - jnp.log(std)
                   - 0.5 * math.log(2.0 * math.pi))
    log_density = jnp.broadcast_to(log_density, jnp.broadcast_shapes(x.shape, log_density.shape))
    return jnp.mean(log_density, axis=tuple(range(1, log_density.ndim)))

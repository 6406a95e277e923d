"""The jitted, sharded T2I update: DDPO's clipped importance-ratio objective over stored
trajectories, gradients accumulated over the trained timesteps inside one ``lax.scan``, then one
optax update (docs/method.md).

Each sample trains on a random subset of its own timesteps (``timestep_fraction`` of S, permuted
independently per sample as DDPO does). Every scan step re-scores one transition per sample under
the same guidance rule, weights and DDIM step as sampling (``rl.rescore_log_prob``), so in
float32 the ratio is 1 (to rounding, ~1e-6) before the first update. With bfloat16
activations the rollout's log-probs are too far from the update's for the 1e-4 clip;
``behaviour_log_probs`` re-scores the stored transitions with the update's own forward pass
first. Only the trainable subset has gradients and optimizer state: cross-attention
(``attn2``, the paper's choice), everything, or LoRA factors; the frozen rest is carried
unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from parrot_jax import parallel
from parrot_jax.diffusion import DDIMSchedule, Guidance
from parrot_jax.optim import clipped_adamw
from parrot_jax.rl.losses import ddpo_timestep_loss, rescore_log_prob
from parrot_jax.weights import (
    T2I_LORA_ALPHA,
    T2I_LORA_RANK,
    T2I_LORA_TARGETS,
    merged_params,
    split_params,
)


@dataclasses.dataclass(frozen=True)
class T2IUpdateConfig:
    """The T2I policy update (hashable: static under jit). Defaults follow DDPO's JAX config and
    the paper (cross-attention only, lr 1e-5, ratio clip 1e-4)."""

    trainable: str = "cross_attention"  # 'cross_attention' | 'all' | 'lora' | 'regex'
    trainable_regex: str = ""  # trainable='regex': parameters whose path matches (re.search)
    lora_targets: str = T2I_LORA_TARGETS  # trainable='lora'
    lora_rank: int = T2I_LORA_RANK  # trainable='lora': rank of the factors
    lora_alpha: float = T2I_LORA_ALPHA  # trainable='lora': scale numerator (alpha / rank * A @ B)
    learning_rate: float = 1e-5  # AdamW step size
    warmup_steps: int = 0  # optimiser steps of linear warm-up of the rate from 0 (0: constant)
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 1e-4  # AdamW decoupled weight decay (DDPO 1e-4; Parrot supp. says 0.1)
    max_grad_norm: float | None = 1.0  # global-norm clipping before AdamW (None: off)
    clip_range: float = 1e-4  # PPO ratio clip epsilon
    adv_clip: float | None = None  # advantages arrive clipped from rl.advantages; None: no re-clip
    timestep_fraction: float = 1.0  # share of each sample's S timesteps trained per update
    eta: float = 1.0  # DDIM eta, as sampled (must match the rollout)
    remat_policy: str | None = "nothing_saveable"  # UNet per-block remat (jax.checkpoint_policies)
    # Timesteps per iteration of the scan's loop (True: no loop). XLA:CPU runs the UNet's
    # forward+backward about 2x slower inside a loop body than unrolled (benchmarks/
    # train_step.py): CPU runs may unroll at the cost of compile time; on accelerators a rolled
    # loop keeps compile time and program size independent of the number of trained timesteps.
    scan_unroll: int | bool = 1
    # Re-score the stored transitions with the update's own forward pass before the first
    # optimiser step (``behaviour_log_probs``), so that narrow activations keep the ratio at 1.
    rescore: bool = False
    # Chunks each minibatch is processed in, one after another inside the step (1: all at once):
    # activation memory scales with the chunk, results are the unchunked step's (config
    # t2i.microbatch sets it per device).
    microbatches: int = 1

    def train_timesteps(self, num_steps: int) -> int:
        """How many of ``num_steps`` timesteps each sample trains on (at least 1)."""
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        return max(1, math.ceil(self.timestep_fraction * num_steps))


@struct.dataclass
class T2IBatch:
    """One minibatch of sampled trajectories (B samples, S steps, per-device B divisible).

    latents ``[B, S+1, h, w, c]`` (x_T first); log_probs ``[B, S]`` recorded at sampling;
    timesteps int32 ``[S]``; contexts ``[B, G, L, D]`` in the guidance's branch order (e.g.
    null, prompt); advantages ``[B]``; selected bool ``[B]`` (the non-dominated samples).
    """

    latents: jax.Array
    log_probs: jax.Array
    timesteps: jax.Array
    contexts: jax.Array
    advantages: jax.Array
    selected: jax.Array


@struct.dataclass
class T2ITrainState:
    """trainable: the optimised pytree (a flat ``{path: array}`` subset, or a ``LoRA``);
    frozen: the rest of the parameters (all of them under LoRA); opt_state for ``trainable``."""

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any


def make_optimizer(config: T2IUpdateConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (with ``config.warmup_steps`` of linear warm-up)."""
    return clipped_adamw(config, config.warmup_steps)


def state_shardings(state_shape: T2ITrainState, mesh: Mesh,
                    rules: Sequence[tuple[str, str]] = parallel.REPLICATE_ALL) -> T2ITrainState:
    """NamedShardings for a (possibly abstract) state: parameters and the optimizer moments by
    ``rules`` over their paths (moments mirror their parameter's path), scalars replicated."""
    return parallel.param_shardings(state_shape, _state_rules(rules), mesh)


def _state_rules(rules: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    # Paths look like 'trainable/<param path>' or 'opt_state/1/0/mu/<param path>'; parameter
    # rules apply to the parameter part (they use re.search, so they still match).
    return [(r"^step$", "replicate"), (r"(^|/)count$", "replicate"), *rules]


def init_train_state(params: Any, config: T2IUpdateConfig, *, key: jax.Array | None = None,
                     mesh: Mesh | None = None,
                     rules: Sequence[tuple[str, str]] = parallel.REPLICATE_ALL) -> T2ITrainState:
    """Split ``params``, build the optimizer state, and (with a mesh) place everything by
    ``rules`` with ``jit(out_shardings=...)`` from ``eval_shape``."""
    trainable, frozen = split_params(params, config, key)
    optimizer = make_optimizer(config)

    def build(trainable, frozen):
        return T2ITrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                             opt_state=optimizer.init(trainable))

    if mesh is None:
        return jax.jit(build)(trainable, frozen)
    shardings = state_shardings(jax.eval_shape(build, trainable, frozen), mesh, rules)
    return jax.jit(build, out_shardings=shardings)(trainable, frozen)


def _denoiser_for_training(denoiser: Any, config: T2IUpdateConfig) -> Any:
    """The UNet with per-block rematerialisation as configured (other denoisers unchanged)."""
    if isinstance(denoiser, nn.Module) and hasattr(denoiser, "remat_policy"):
        return denoiser.clone(remat_policy=config.remat_policy)
    return denoiser


def _timestep_slots(key: jax.Array, batch: int, steps: int, trained: int) -> jax.Array:
    """int32 ``[trained, B]``: per-sample random permutations of the S steps, first ``trained``."""
    perms = jax.vmap(lambda k: jax.random.permutation(k, steps))(jax.random.split(key, batch))
    return perms[:, :trained].T.astype(jnp.int32)


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[b, idx[b]]`` for ``x [B, S, ...]``, ``idx [B]``."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, idx, axis=1)[:, 0]


def _scan_order(slots: jax.Array, chunks: int) -> tuple[jax.Array, jax.Array]:
    """The update's scan steps: ``(chunk [chunks * n], slots [chunks * n, B / chunks])``, chunk
    by chunk, each chunk's n trained timesteps in turn (``slots [n, B]``)."""
    n, b = slots.shape
    per_chunk = jnp.moveaxis(slots.reshape(n, b // chunks, chunks), 2, 0)  # [chunks, n, B/c]
    return (jnp.repeat(jnp.arange(chunks, dtype=jnp.int32), n),
            per_chunk.reshape(chunks * n, b // chunks))


def _transition(batch: T2IBatch, j: jax.Array, idx: jax.Array, chunks: int) -> dict[str, Any]:
    """Scan step ``(j, idx)``'s inputs: chunk ``j``'s samples at their slots ``idx``."""
    latents = parallel.chunk_rows(batch.latents, j, chunks)
    return dict(x_t=_take(latents, idx), x_prev=_take(latents, idx + 1),
                timestep=batch.timesteps[idx],
                old_log_prob=_take(parallel.chunk_rows(batch.log_probs, j, chunks), idx),
                contexts=parallel.chunk_rows(batch.contexts, j, chunks),
                advantages=parallel.chunk_rows(batch.advantages, j, chunks))


def accumulate_gradients(denoiser: Any, schedule: DDIMSchedule, guidance: Guidance,
                         config: T2IUpdateConfig, trainable: Any, frozen: Any, batch: T2IBatch,
                         slots: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
    """Sum over scan steps of the per-timestep loss gradients w.r.t. ``trainable``.

    slots: int32 ``[n, B]``, the step index each sample trains at in scan step j (see
    ``_timestep_slots``). The scan runs ``config.microbatches`` chunks of the batch in turn, n
    steps each. Returns ``(gradient sum, metric sums and extremes)`` over its steps.
    """
    denoiser = _denoiser_for_training(denoiser, config)

    def loss_fn(trainable, step):
        return ddpo_timestep_loss(denoiser, merged_params(trainable, frozen), schedule,
                                  step["contexts"], guidance, step["x_t"], step["timestep"],
                                  step["x_prev"], step["old_log_prob"], step["advantages"],
                                  eta=config.eta, clip_range=config.clip_range,
                                  adv_clip=config.adv_clip)

    if config.rescore and config.remat_policy is None:
        # The log-probs must be computed as ``behaviour_log_probs`` computes them: a forward pass
        # whose activations are kept for the backward pass is fused, and so rounded, otherwise.
        # Per-block remat already keeps them only at block boundaries; without it, recompute.
        loss_fn = jax.checkpoint(loss_fn)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def body(carry, order):
        grads, sums = carry
        (loss, m), g = grad_fn(trainable, _transition(batch, *order, config.microbatches))
        grads = jax.tree.map(jnp.add, grads, g)
        sums = {"loss": sums["loss"] + loss, "approx_kl": sums["approx_kl"] + m["approx_kl"],
                "clipfrac": sums["clipfrac"] + m["clipfrac"], "ratio": sums["ratio"] + m["ratio"],
                "ratio_min": jnp.minimum(sums["ratio_min"], m["ratio_min"]),
                "ratio_max": jnp.maximum(sums["ratio_max"], m["ratio_max"])}
        return (grads, sums), None

    zero = jnp.zeros((), jnp.float32)
    sums = {"loss": zero, "approx_kl": zero, "clipfrac": zero, "ratio": zero,
            "ratio_min": jnp.array(jnp.inf), "ratio_max": jnp.array(-jnp.inf)}
    grads = jax.tree.map(jnp.zeros_like, trainable)
    (grads, sums), _ = jax.lax.scan(body, (grads, sums),
                                    _scan_order(slots, config.microbatches),
                                    unroll=config.scan_unroll)
    return grads, sums


def behaviour_log_probs(denoiser: Any, schedule: DDIMSchedule, guidance: Guidance,
                        config: T2IUpdateConfig, trainable: Any, frozen: Any, batch: T2IBatch,
                        key: jax.Array) -> jax.Array:
    """``batch.log_probs`` ``[B, S]`` with the transitions ``train_step(..., key)`` will train on
    re-scored by the update's own forward pass under ``trainable`` (the sampling policy).

    The same scan over the same timestep slots, shapes and remat as ``accumulate_gradients``,
    without the backward pass. With bfloat16 activations the rollout's log-probs (another
    program, a larger batch) differed from the update's by up to 0.2-0.5 in the toy world,
    thousands of times the paper's ratio clip; these agree with them to float32 rounding, so
    the ratio starts at 1. Costs one UNet forward per trained transition. Untrained slots keep their
    sampled values."""
    b, s = batch.log_probs.shape
    slots = _timestep_slots(key, b, s, config.train_timesteps(s))
    denoiser = _denoiser_for_training(denoiser, config)
    chunks, n = config.microbatches, slots.shape[0]

    def body(_, order):
        step = _transition(batch, *order, chunks)

        def log_prob(trainable):
            return rescore_log_prob(denoiser, merged_params(trainable, frozen), schedule,
                                    step["contexts"], guidance, step["x_t"], step["timestep"],
                                    step["x_prev"], eta=config.eta)

        # Evaluated as the update evaluates it: as the forward half of a gradient in
        # ``trainable``, so custom gradients' forward rules run, not their plain forms (the
        # attention's differ). The unused backward half is never computed.
        return None, jax.vjp(log_prob, trainable)[0]

    _, log_probs = jax.lax.scan(body, None, _scan_order(slots, chunks),
                                unroll=config.scan_unroll)  # [chunks * n, B / chunks]
    log_probs = jnp.moveaxis(log_probs.reshape(chunks, n, b // chunks), 0, 2).reshape(n, b)
    return batch.log_probs.at[jnp.arange(b)[None, :], slots].set(log_probs)


def train_step(denoiser: Any, schedule: DDIMSchedule, guidance: Guidance,
               config: T2IUpdateConfig, state: T2ITrainState, batch: T2IBatch,
               key: jax.Array) -> tuple[T2ITrainState, dict[str, jax.Array]]:
    """One optimizer update from one minibatch: scan-accumulated gradients averaged over the
    trained timesteps, clipped, AdamW. Metrics: loss, approx_kl, clipfrac (means over the
    trained timesteps), ratio (mean) / ratio_min / ratio_max, grad_norm (before clipping),
    selected_fraction, and the number of trained timesteps per sample."""
    b, s = batch.log_probs.shape
    n = config.train_timesteps(s)
    if b % config.microbatches:
        raise ValueError(f"a minibatch of {b} does not split into {config.microbatches} chunks")
    slots = _timestep_slots(key, b, s, n)
    grads, sums = accumulate_gradients(denoiser, schedule, guidance, config, state.trainable,
                                       state.frozen, batch, slots)
    steps = n * config.microbatches  # equal chunks: the mean of chunk means is the batch mean
    grads = jax.tree.map(lambda g: g / steps, grads)
    updates, opt_state = make_optimizer(config).update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {k: v / steps for k, v in sums.items() if k not in ("ratio_min", "ratio_max")}
    metrics.update(ratio_min=sums["ratio_min"], ratio_max=sums["ratio_max"],
                   grad_norm=optax.tree.norm(grads),
                   selected_fraction=jnp.mean(batch.selected.astype(jnp.float32)),
                   trained_timesteps=jnp.asarray(n, jnp.int32))
    new_state = T2ITrainState(step=state.step + 1, trainable=trainable, frozen=state.frozen,
                              opt_state=opt_state)
    return new_state, metrics


def batch_shardings(mesh: Mesh) -> T2IBatch:
    """Batch axis over ``('data', 'fsdp')``; timesteps replicated."""
    data, rep = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    return T2IBatch(latents=data, log_probs=data, timesteps=rep, contexts=data,
                    advantages=data, selected=data)


def batch_spec(minibatch: int, steps: int, latent_shape: tuple[int, int, int], contexts: Any,
               mesh: Mesh) -> T2IBatch:
    """The abstract minibatch ``minibatch`` (below) cuts from a rollout of ``steps`` DDIM steps
    with contexts like ``contexts`` (``[*, G, L, D]``): shapes, dtypes and shardings, to lower
    the update ahead of time (the planner, ``training.state.compile_ahead``)."""
    s = batch_shardings(mesh)
    spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=sharding)
    return T2IBatch(
        latents=spec((minibatch, steps + 1, *latent_shape), jnp.float32, s.latents),
        log_probs=spec((minibatch, steps), jnp.float32, s.log_probs),
        timesteps=spec((steps,), jnp.int32, s.timesteps),
        contexts=spec((minibatch, *contexts.shape[1:]), contexts.dtype, s.contexts),
        advantages=spec((minibatch,), jnp.float32, s.advantages),
        selected=spec((minibatch,), jnp.bool_, s.selected))


@functools.partial(jax.jit, static_argnames=("sharding",))
def minibatch(sharding: T2IBatch, batch: T2IBatch, rows: jax.Array) -> T2IBatch:
    """The samples ``rows`` of ``batch`` (timesteps shared), placed over the batch axes as
    ``sharding`` (``batch_shardings``) says."""
    take = lambda x, s: jax.lax.with_sharding_constraint(jnp.take(x, rows, axis=0), s)  # noqa: E731
    return T2IBatch(latents=take(batch.latents, sharding.latents),
                    log_probs=take(batch.log_probs, sharding.log_probs),
                    timesteps=batch.timesteps,
                    contexts=take(batch.contexts, sharding.contexts),
                    advantages=take(batch.advantages, sharding.advantages),
                    selected=take(batch.selected, sharding.selected))


def make_rescore(denoiser: Any, schedule: DDIMSchedule, guidance: Guidance,
                 config: T2IUpdateConfig, *, mesh: Mesh | None = None,
                 state_sharding: T2ITrainState | None = None,
                 ) -> Callable[[Any, Any, T2IBatch, jax.Array], jax.Array]:
    """``behaviour_log_probs(trainable, frozen, batch, key) -> log_probs [B, S]`` jitted as
    ``make_train_step`` jits the update (with a mesh: the state's parameter shardings and the
    batch's)."""
    fn = functools.partial(behaviour_log_probs, denoiser, schedule, guidance, config)
    if mesh is None:
        return jax.jit(fn)
    if state_sharding is None:
        raise ValueError("make_rescore with a mesh needs state_sharding")
    data = batch_shardings(mesh)
    return jax.jit(fn,
                   in_shardings=(state_sharding.trainable, state_sharding.frozen, data,
                                 parallel.replicated(mesh)),
                   out_shardings=data.log_probs)


def put_t2i_batch(batch: T2IBatch, mesh: Mesh) -> T2IBatch:
    """Host arrays of this process's samples -> a global ``T2IBatch`` on ``mesh``."""
    return parallel.put_batch(batch, mesh, batch_shardings(mesh))


def make_train_step(denoiser: Any, schedule: DDIMSchedule, guidance: Guidance,
                    config: T2IUpdateConfig, *, mesh: Mesh | None = None,
                    state_sharding: T2ITrainState | None = None,
                    ) -> Callable[[T2ITrainState, T2IBatch, jax.Array],
                                  tuple[T2ITrainState, dict[str, jax.Array]]]:
    """``train_step`` jitted with the state donated; with a mesh, in/out ``NamedSharding``s
    (state by ``state_sharding``, e.g. ``state_shardings(...)`` of the initial state; batch
    over the batch axes; key and metrics replicated)."""
    fn = functools.partial(train_step, denoiser, schedule, guidance, config)
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    if state_sharding is None:
        raise ValueError("make_train_step with a mesh needs state_sharding")
    rep = parallel.replicated(mesh)
    return jax.jit(fn, donate_argnums=0,
                   in_shardings=(state_sharding, batch_shardings(mesh), rep),
                   out_shardings=(state_sharding, rep))

"""A per-prompt reward ring buffer as a fixed-shape pytree (DDPO's per-prompt stat tracking).

DDPO normalises each sample's reward by the mean and std of the last ``buffer_size`` rewards of
its prompt once at least ``min_count`` have been seen. Here prompts are int keys (e.g. a prompt's
index in the dataset, times K plus the identifier), held in a direct-mapped table of ``capacity``
slots (slot = key mod capacity), so the state has a fixed shape, lives on device, updates inside
``jit`` and checkpoints like any pytree. A key that lands on a slot owned by another key evicts it
(its history restarts); within one batch the largest key wins a contested slot and the others are
neither recorded nor served (callers fall back to other statistics, see ``advantages.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class StatTracker:
    """keys ``[C]`` int32 (-1 = empty); values ``[C, buffer_size]``; counts and heads ``[C]``
    int32 (stored rewards, at most buffer_size; next ring position to write)."""

    keys: jax.Array
    values: jax.Array
    counts: jax.Array
    heads: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def buffer_size(self) -> int:
        return self.values.shape[1]


def init_stat_tracker(capacity: int, buffer_size: int) -> StatTracker:
    """An empty tracker with ``capacity`` slots of ``buffer_size`` rewards each."""
    if capacity <= 0 or buffer_size <= 0:
        raise ValueError(f"StatTracker needs capacity > 0 and buffer_size > 0, got {capacity} "
                         f"and {buffer_size}")
    return StatTracker(keys=jnp.full((capacity,), -1, jnp.int32),
                       values=jnp.zeros((capacity, buffer_size), jnp.float32),
                       counts=jnp.zeros((capacity,), jnp.int32),
                       heads=jnp.zeros((capacity,), jnp.int32))


def _rank_within_slot(slot: jax.Array, push: jax.Array, capacity: int) -> jax.Array:
    """int32 ``[N]``: how many earlier pushing rows share each row's slot (batch order)."""
    n = slot.shape[0]
    eff = jnp.where(push, slot, capacity)
    order = jnp.argsort(eff, stable=True)
    sorted_slot = eff[order]
    start = jnp.searchsorted(sorted_slot, sorted_slot, side="left")
    rank_sorted = jnp.arange(n, dtype=jnp.int32) - start.astype(jnp.int32)
    return jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted)


def update_and_lookup(tracker: StatTracker, keys: jax.Array, rewards: jax.Array,
                      valid: jax.Array) -> tuple[StatTracker, jax.Array, jax.Array, jax.Array]:
    """Push this batch's rewards, then read each row's prompt statistics (as DDPO: the current
    batch is included in the statistics it is normalised by).

    keys: int ``[N]`` (>= 0); rewards: ``[N]``; valid: bool ``[N]`` (invalid rows are neither
    pushed nor served). Returns ``(tracker, mean [N], std [N], count [N])``; ``count`` is the
    number of stored rewards behind the row's statistics, 0 where the row was not served.
    """
    c, b = tracker.capacity, tracker.buffer_size
    keys = jnp.asarray(keys, jnp.int32)
    slot = keys % c
    owner = jax.ops.segment_max(jnp.where(valid, keys, -1), slot, num_segments=c)
    push = valid & (keys == owner[slot])
    n_new = jax.ops.segment_sum(push.astype(jnp.int32), slot, num_segments=c)
    present = n_new > 0
    reset = present & (tracker.keys != owner)
    counts = jnp.where(reset, 0, tracker.counts)
    heads = jnp.where(reset, 0, tracker.heads)

    rank = _rank_within_slot(slot, push, c)
    keep = push & (rank >= n_new[slot] - b)  # more than buffer_size new values: the last ones
    pos = (heads[slot] + rank) % b
    values = tracker.values.at[jnp.where(keep, slot, c), pos].set(
        rewards.astype(jnp.float32), mode="drop")
    counts = jnp.minimum(counts + n_new, b)
    heads = (heads + n_new) % b
    tracker = StatTracker(keys=jnp.where(present, owner, tracker.keys), values=values,
                          counts=counts, heads=heads)

    filled = jnp.arange(b)[None, :] < counts[:, None]
    n = jnp.maximum(counts, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(filled, values, 0.0), axis=1) / n
    var = jnp.sum(jnp.where(filled, (values - mean[:, None]) ** 2, 0.0), axis=1) / n
    served = jnp.where(push, counts[slot], 0)
    return tracker, mean[slot], jnp.sqrt(var)[slot], served

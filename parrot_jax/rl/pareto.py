"""Batch-wise Pareto (non-dominated) selection over reward vectors (Parrot's NDSet, Algorithm 1).

Rewards are maximised. Row ``j`` dominates row ``i`` iff ``R[j] >= R[i]`` on every reward and
``>`` on at least one. A row with a non-finite reward (NaN or +/-inf: a broken reward model or
image, never a real score) or marked invalid is never selected and never dominates,
and identical rows do not dominate each other, so both are kept.

The masks are one vectorised pairwise comparison (``[N, N]`` booleans, built one reward at a time
so no ``[N, N, K]`` array exists), jittable and correct on a globally sharded ``[N, K]`` array:
under ``jit`` XLA gathers what each shard needs. ``block_size`` bounds the working set to
``[block_size, N]`` for very large N. ``hypervolume`` is a host-side logging metric.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def valid_rows(rewards: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """bool ``[N]``: rows of ``rewards [N, K]`` whose rewards are all finite (and with ``valid``
    set, if given). +inf is as invalid as NaN: it would dominate every row and make the
    advantages inf or NaN."""
    ok = jnp.all(jnp.isfinite(rewards), axis=-1)
    return ok if valid is None else ok & jnp.asarray(valid, bool)


def _dominated_by(candidates: jax.Array, others: jax.Array, others_ok: jax.Array,
                  same_group: jax.Array | None) -> jax.Array:
    """bool ``[M, N]``: ``others[j]`` (valid, same group) dominates ``candidates[i]``."""
    k = candidates.shape[-1]
    all_ge = jnp.ones((candidates.shape[0], others.shape[0]), bool)
    any_gt = jnp.zeros_like(all_ge)
    for m in range(k):  # K is small and static: K [M, N] passes, never an [M, N, K] array
        c, o = candidates[:, m, None], others[None, :, m]
        all_ge &= o >= c
        any_gt |= o > c
    dom = all_ge & any_gt & others_ok[None, :]
    return dom if same_group is None else dom & same_group


def _domination_counts(rewards: jax.Array, ok: jax.Array, groups: jax.Array | None,
                       block_size: int | None) -> jax.Array:
    """int32 ``[N]``: how many valid rows (of the same group) dominate each row."""
    rewards = jnp.asarray(rewards)
    n = rewards.shape[0]

    def count(cand, cand_groups):
        same = None if groups is None else cand_groups[:, None] == groups[None, :]
        return jnp.sum(_dominated_by(cand, rewards, ok, same), axis=1, dtype=jnp.int32)

    ids = jnp.zeros((n,), jnp.int32) if groups is None else groups
    if block_size is None or block_size >= n:
        return count(rewards, ids)
    pad = -n % block_size
    cand = jnp.pad(rewards, ((0, pad), (0, 0))).reshape(-1, block_size, rewards.shape[1])
    cand_ids = jnp.pad(ids, (0, pad)).reshape(-1, block_size)
    return jax.lax.map(lambda args: count(*args), (cand, cand_ids)).reshape(-1)[:n]


def non_dominated_mask(rewards: jax.Array, valid: jax.Array | None = None, *,
                       block_size: int | None = None) -> jax.Array:
    """bool ``[N]``: row i is valid and no valid row dominates it.

    rewards: float ``[N, K]``, larger is better; valid: optional bool ``[N]``. ``block_size``
    (static) processes candidate rows in blocks of that many (memory ``[block_size, N]``); on
    CPU, 256 is 4x faster than one block at N >= 4096 (``benchmarks/pareto.py``).
    """
    ok = valid_rows(rewards, valid)
    return ok & (_domination_counts(rewards, ok, None, block_size) == 0)


def grouped_non_dominated_mask(rewards: jax.Array, groups: jax.Array | None = None,
                               valid: jax.Array | None = None, *,
                               block_size: int | None = None) -> jax.Array:
    """``non_dominated_mask`` independently inside each group.

    Either ``rewards [N, K]`` with int group ids ``groups [N]`` (any values; rows compete only
    with rows of the same id) -> bool ``[N]``, or ``rewards [G, N, K]`` with ``groups=None`` ->
    bool ``[G, N]``. ``valid`` has the shape of ``rewards`` without its last axis.
    """
    rewards = jnp.asarray(rewards)
    if groups is None:
        if rewards.ndim != 3:
            raise ValueError("grouped_non_dominated_mask: without group ids, rewards must be "
                             f"[G, N, K]; got shape {rewards.shape}")
        if valid is None:
            return jax.vmap(lambda r: non_dominated_mask(r, block_size=block_size))(rewards)
        return jax.vmap(lambda r, v: non_dominated_mask(r, v, block_size=block_size))(
            rewards, valid)
    if rewards.ndim != 2 or jnp.shape(groups) != rewards.shape[:1]:
        raise ValueError("grouped_non_dominated_mask: rewards must be [N, K] with groups [N]; got "
                         f"{rewards.shape} and {jnp.shape(groups)}")
    ok = valid_rows(rewards, valid)
    groups = jnp.asarray(groups, jnp.int32)
    return ok & (_domination_counts(rewards, ok, groups, block_size) == 0)


def pareto_ranks(rewards: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """int32 ``[N]``: the non-dominated front of each row (0 = first front), -1 for invalid rows.

    Front f+1 is the non-dominated set once fronts 0..f are removed (non-dominated sorting).
    For analysis; the training signal uses only the first front. One ``[N, N]`` domination
    matrix, then a ``while_loop`` that peels one front per iteration.
    """
    ok = valid_rows(rewards, valid)
    dom = _dominated_by(rewards, rewards, ok, None)  # dom[i, j]: j dominates i

    def cond(state):
        ranks, _ = state
        return jnp.any(ok & (ranks < 0))

    def body(state):
        ranks, front = state
        remaining = ok & (ranks < 0)
        dominated = jnp.any(dom & remaining[None, :], axis=1)
        ranks = jnp.where(remaining & ~dominated, front, ranks)
        return ranks, front + 1

    ranks = jnp.full(ok.shape, -1, jnp.int32)
    ranks, _ = jax.lax.while_loop(cond, body, (ranks, jnp.int32(0)))
    return ranks


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Exact volume dominated by ``points [N, K]`` (maximised) and dominating ``reference [K]``.

    Host-side numpy, for logging a batch's front. Rows with a NaN or inf are ignored;
    coordinates below the reference contribute nothing. Exact for any K by slicing along the
    last objective (cost grows as N^(K-1): fine for batch fronts with K <= 4).
    """
    points = np.asarray(points, np.float64)
    reference = np.asarray(reference, np.float64)
    if points.ndim != 2 or reference.shape != points.shape[1:]:
        raise ValueError(f"hypervolume: points must be [N, K] and reference [K]; got "
                         f"{points.shape} and {reference.shape}")
    points = points[np.all(np.isfinite(points), axis=1)]
    points = np.maximum(points, reference) - reference  # reference at the origin
    points = points[np.all(points > 0, axis=1)]
    return float(_hv(points))


def _hv(points: np.ndarray) -> float:
    """Volume of the union of boxes ``[0, p]`` for ``points [N, K] > 0``."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(points.max())
    if points.shape[1] == 2:
        order = np.argsort(-points[:, 0], kind="stable")
        x, y = points[order, 0], points[order, 1]
        best_y = np.maximum.accumulate(y)  # staircase: highest y among points with larger x
        widths = x - np.append(x[1:], 0.0)
        return float(np.sum(widths * best_y))
    # Slice along the last objective: between consecutive distinct heights h_(i+1) < z <= h_i
    # the cross-section is the (K-1)-D union over the points with height >= h_i.
    order = np.argsort(-points[:, -1], kind="stable")
    pts = points[order]
    heights = pts[:, -1]
    total = 0.0
    for i in range(len(pts)):
        below = heights[i + 1] if i + 1 < len(pts) else 0.0
        if heights[i] > below:
            total += (heights[i] - below) * _hv(pts[: i + 1, :-1])
    return total


def front_hypervolume(rewards: np.ndarray, reference: np.ndarray | None) -> float:
    """Hypervolume of the batch's non-dominated front ``rewards [B, K]`` (rows with a NaN or
    inf ignored), measured from ``reference [K]``, or, with None, from each reward's minimum
    over the valid rows (so it compares fronts within a run; points on the minimum contribute
    nothing)."""
    rewards = np.asarray(rewards, np.float64)
    valid = rewards[np.all(np.isfinite(rewards), axis=1)]
    if len(valid) == 0:
        return 0.0
    ref = valid.min(axis=0) if reference is None else reference
    # The front, by brute force on the host (B is at most a few hundred).
    dominated = np.array([np.any(np.all(valid >= r, axis=1) & np.any(valid > r, axis=1))
                          for r in valid])
    return hypervolume(valid[~dominated], ref)

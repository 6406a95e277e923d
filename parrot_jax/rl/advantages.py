"""Advantages for the T2I update from the reward matrix: Parrot's Pareto-filtered modes and the
paper's baselines (docs/method.md).

Samples come in ``G`` contiguous groups of ``n`` (one prompt and one identifier per group, as in
Algorithm 1); ``reward_ids [N]`` names the reward ``k`` each sample's update maximises (its
group's identifier). Modes:

- ``paper``: Eq. 4 literally. ``A = r_k`` on the non-dominated set P, 0 elsewhere, scaled by
  ``n / |P|`` so that the loss's mean over the ``n`` samples of a selection set weights each
  selected sample by ``1 / |P|``, as Eq. 4's ``1 / n(P)``.
- ``normalized``: DDPO-style. ``r_k`` is z-scored (within the group, over the whole batch, or by
  the per-prompt tracker), *then* the dominated samples are zeroed. Never zero-then-normalise:
  that would give dominated samples negative advantages, which Eq. 4 does not.
- ``weighted_sum``: the scalarised baseline (DPOK-WS): ``r = R @ weights``, normalised, no Pareto.
- ``single``: one reward for every sample (e.g. "Parrot with HP only"), normalised, no Pareto.

Rows with a non-finite reward (NaN or +/-inf) are never selected, never dominate, are left out
of every statistic and get advantage 0. Everything is jittable and works on globally sharded arrays.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from parrot_jax.rl.pareto import grouped_non_dominated_mask, valid_rows
from parrot_jax.rl.stat_tracker import StatTracker, update_and_lookup

MODES = ("paper", "normalized", "weighted_sum", "single")
STATS = ("group", "batch", "tracker")
SELECTIONS = ("group", "batch")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """How rewards become advantages (hashable: pass it as a static argument)."""

    mode: str = "normalized"  # one of MODES (see the module docstring)
    pareto: bool = True  # paper / normalized: zero dominated samples (False: 'no Pareto' ablation)
    selection: str = "group"  # non-dominated set within each group, or over the whole batch
    stats: str = "group"  # normalising statistics: per group, whole batch, or per-prompt tracker
    weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # weighted_sum: one weight per reward
    reward_index: int = 0  # single: the reward (0-based column of R) every sample maximises
    adv_clip: float | None = 5.0  # clip advantages to +-adv_clip (None: no clipping)
    eps: float = 1e-6  # added to standard deviations
    min_count: int = 16  # tracker: stored rewards a prompt needs before its own stats are used

    def __post_init__(self):
        for field, value, allowed in (("mode", self.mode, MODES), ("stats", self.stats, STATS),
                                      ("selection", self.selection, SELECTIONS)):
            if value not in allowed:
                raise ValueError(f"AdvantageConfig.{field} = {value!r}; expected one of {allowed}")
        if self.adv_clip is not None and self.adv_clip <= 0:
            raise ValueError(f"AdvantageConfig.adv_clip must be positive or None, got "
                             f"{self.adv_clip}")

    @property
    def uses_pareto(self) -> bool:
        return self.pareto and self.mode in ("paper", "normalized")


class Advantages(NamedTuple):
    """advantages ``[N]`` float32; selected ``[N]`` bool (samples that drive the update: the
    non-dominated set, or every valid sample without Pareto); valid ``[N]`` bool (every reward
    finite)."""

    advantages: jax.Array
    selected: jax.Array
    valid: jax.Array


def _grouped(x: jax.Array, group_size: int) -> jax.Array:
    n = x.shape[0]
    if n % group_size:
        raise ValueError(f"{n} samples do not split into groups of {group_size}")
    return x.reshape(n // group_size, group_size, *x.shape[1:])


def _masked_mean_std(x: jax.Array, ok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and (population) std of ``x`` over ``ok`` along the last axis, keepdims."""
    n = jnp.maximum(jnp.sum(ok, axis=-1, keepdims=True), 1)
    mean = jnp.sum(jnp.where(ok, x, 0.0), axis=-1, keepdims=True) / n
    var = jnp.sum(jnp.where(ok, (x - mean) ** 2, 0.0), axis=-1, keepdims=True) / n
    return mean, jnp.sqrt(var)


def scalar_rewards(rewards: jax.Array, reward_ids: jax.Array | None,
                   config: AdvantageConfig) -> jax.Array:
    """``[N]``: the reward each sample maximises under ``config.mode``."""
    k = rewards.shape[-1]
    if config.mode == "weighted_sum":
        if len(config.weights) != k:
            raise ValueError(f"AdvantageConfig.weights has {len(config.weights)} entries for "
                             f"{k} rewards")
        return rewards @ jnp.asarray(config.weights, rewards.dtype)
    if config.mode == "single":
        if not 0 <= config.reward_index < k:
            raise ValueError(f"AdvantageConfig.reward_index {config.reward_index} is out of "
                             f"range for {k} rewards")
        return rewards[:, config.reward_index]
    if reward_ids is None:
        raise ValueError(f"advantage mode {config.mode!r} needs reward_ids (each sample's "
                         "identifier k)")
    return jnp.take_along_axis(rewards, jnp.asarray(reward_ids, jnp.int32)[:, None], 1)[:, 0]


def compute_advantages(rewards: jax.Array, reward_ids: jax.Array | None,
                       config: AdvantageConfig, *, group_size: int,
                       tracker: StatTracker | None = None,
                       prompt_ids: jax.Array | None = None,
                       ) -> tuple[Advantages, StatTracker | None]:
    """Advantages ``[N]`` from rewards ``[N, K]`` (larger is better).

    reward_ids: int ``[N]`` in ``[0, K)``, each sample's identifier (its group's reward); unused
    by ``weighted_sum`` / ``single``. group_size (static): samples per group; ``N`` must be a
    multiple. ``stats='tracker'`` needs ``tracker`` and ``prompt_ids`` (int ``[N]``, >= 0): rows
    are keyed by (prompt, identifier) so a prompt's history under ``<reward 1>`` never normalises
    its ``<reward 3>`` rewards; rows whose key has fewer than ``min_count`` stored rewards use
    their group's statistics (DDPO falls back to the whole batch; a Parrot group shares one
    prompt and one identifier, the natural baseline). Returns ``(Advantages, tracker)``.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    n, k = rewards.shape
    valid = valid_rows(rewards)
    value = jnp.where(valid, scalar_rewards(rewards, reward_ids, config), 0.0)

    if config.uses_pareto:
        size = group_size if config.selection == "group" else n
        selected = grouped_non_dominated_mask(_grouped(rewards, size)).reshape(n)
    else:
        size = group_size
        selected = valid

    if config.mode == "paper":
        share = _grouped(selected, size)
        scale = size / jnp.maximum(jnp.sum(share, axis=1, keepdims=True), 1)
        adv = jnp.where(selected, value * jnp.broadcast_to(scale, share.shape).reshape(n), 0.0)
    else:
        if config.stats == "batch":
            mean, std = _masked_mean_std(value, valid)
            mean, std = jnp.broadcast_to(mean, (n,)), jnp.broadcast_to(std, (n,))
        else:
            g_mean, g_std = _masked_mean_std(_grouped(value, group_size),
                                             _grouped(valid, group_size))
            shape = (n // group_size, group_size)
            mean = jnp.broadcast_to(g_mean, shape).reshape(n)
            std = jnp.broadcast_to(g_std, shape).reshape(n)
        if config.stats == "tracker":
            if tracker is None or prompt_ids is None:
                raise ValueError("stats='tracker' needs a tracker and prompt_ids")
            per_prompt_k = config.mode == "normalized"
            keys = jnp.asarray(prompt_ids, jnp.int32) * (k if per_prompt_k else 1)
            if per_prompt_k:
                keys = keys + jnp.asarray(reward_ids, jnp.int32)
            tracker, t_mean, t_std, count = update_and_lookup(tracker, keys, value, valid)
            use = count >= config.min_count
            mean, std = jnp.where(use, t_mean, mean), jnp.where(use, t_std, std)
        adv = jnp.where(selected, (value - mean) / (std + config.eps), 0.0)

    if config.adv_clip is not None:
        adv = jnp.clip(adv, -config.adv_clip, config.adv_clip)
    return Advantages(adv, selected, valid), tracker


PEN_MODES = ("raw", "normalized")


def group_advantages(rewards: jax.Array, reward_ids: jax.Array | None, selected: jax.Array,
                     config: AdvantageConfig, *, group_size: int,
                     mode: str = "raw") -> jax.Array:
    """The PEN's advantage per group ``[G]``: the mean, over the group's ``selected`` samples,
    of the reward each sample maximises (``scalar_rewards``); 0 for a group with none selected.

    rewards ``[N, K]`` (rows with a NaN or inf never selected), reward_ids / selected ``[N]``.
    ``mode``: ``raw`` is the paper's (Algorithm 1 weights ``∇log p_φ`` by ``r_k`` itself);
    ``normalized`` first z-scores each reward column over the batch's valid rows, so that
    groups maximising rewards on different scales (e.g. a preference logit ~15 and a sentiment
    probability ~0.3) weigh alike and a group's advantage says how far its selected images
    stand above the batch, in that reward's own units of spread.
    """
    if mode not in PEN_MODES:
        raise ValueError(f"PEN advantage mode {mode!r}; expected one of {PEN_MODES}")
    rewards = jnp.asarray(rewards, jnp.float32)
    valid = valid_rows(rewards)
    rewards = jnp.where(valid[:, None], rewards, 0.0)
    if mode == "normalized":
        mean, std = _masked_mean_std(rewards.T, valid)  # per column: [K, 1]
        rewards = (rewards - mean.T) / (std.T + config.eps)
    value = jnp.where(valid, scalar_rewards(rewards, reward_ids, config), 0.0)
    chosen = _grouped(selected & valid, group_size)
    return (jnp.sum(jnp.where(chosen, _grouped(value, group_size), 0.0), axis=1)
            / jnp.maximum(jnp.sum(chosen, axis=1), 1))

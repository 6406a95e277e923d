"""Reinforcement learning on arrays: Pareto selection, advantages and the DDPO objective.

Nothing here knows about models beyond a denoiser callable (``rescore_log_prob``).
"""

from parrot_jax.rl.advantages import (
    PEN_MODES,
    AdvantageConfig,
    Advantages,
    compute_advantages,
    group_advantages,
    scalar_rewards,
)
from parrot_jax.rl.losses import ddpo_loss, ddpo_timestep_loss, rescore_log_prob
from parrot_jax.rl.pareto import (
    grouped_non_dominated_mask,
    hypervolume,
    non_dominated_mask,
    pareto_ranks,
    valid_rows,
)
from parrot_jax.rl.stat_tracker import StatTracker, init_stat_tracker, update_and_lookup

__all__ = [
    "PEN_MODES", "AdvantageConfig", "Advantages", "StatTracker", "compute_advantages",
    "ddpo_loss", "ddpo_timestep_loss", "group_advantages", "grouped_non_dominated_mask",
    "hypervolume", "init_stat_tracker", "non_dominated_mask", "pareto_ranks",
    "rescore_log_prob", "scalar_rewards", "update_and_lookup", "valid_rows",
]

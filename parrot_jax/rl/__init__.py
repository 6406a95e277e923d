"""Reinforcement learning on arrays: the DDPO objective (and, beside it, Pareto selection)."""

from parrot_jax.rl.losses import ddpo_loss, ddpo_timestep_loss, rescore_log_prob

__all__ = ["ddpo_loss", "ddpo_timestep_loss", "rescore_log_prob"]

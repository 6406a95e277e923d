"""parrot-jax: Parrot (Pareto-optimal multi-reward RL for text-to-image diffusion) in JAX/Flax."""

__version__ = "0.1.0"

"""Training: wires models, expansion, diffusion, rewards and rl together (the only place that
does)."""

from parrot_jax.training.loop import train_and_evaluate
from parrot_jax.training.pen_sft import restore as restore_pen_sft
from parrot_jax.training.pen_sft import train_and_evaluate as train_pen_sft
from parrot_jax.training.step import (
    T2IBatch,
    T2ITrainState,
    T2IUpdateConfig,
    init_train_state,
    make_train_step,
    put_t2i_batch,
    state_shardings,
    train_step,
)

__all__ = [
    "T2IBatch", "T2ITrainState", "T2IUpdateConfig", "init_train_state", "make_train_step",
    "put_t2i_batch", "restore_pen_sft", "state_shardings", "train_and_evaluate", "train_pen_sft",
    "train_step",
]

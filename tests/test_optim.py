"""The shared optimiser: AdamW after global-norm clipping, with an optional linear warm-up."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from parrot_jax import config as schema
from parrot_jax import config_files
from parrot_jax.optim import clipped_adamw
from parrot_jax.training.settings import t2i_update
from parrot_jax.training.step import T2IUpdateConfig, make_optimizer
from parrot_jax.workdir import config_dict

ROOT = Path(__file__).resolve().parents[1]


def _steps(optimizer, grads) -> np.ndarray:
    """The parameter's change at each step for the scalar gradients ``grads``."""
    params = {"w": jnp.zeros(())}
    state = optimizer.init(params)
    moves = []
    for g in grads:
        updates, state = optimizer.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        moves.append(float(updates["w"]))
    return np.asarray(moves)


def test_linear_warmup_scales_the_first_adam_steps():
    # A constant gradient makes each bias-corrected Adam step -rate * g / |g| = -rate, so the
    # moves are the schedule itself: 0, 1/4, 1/2, 3/4, then the full rate.
    config = T2IUpdateConfig(learning_rate=1e-2, weight_decay=0.0, max_grad_norm=None, eps=0.0,
                             warmup_steps=4)
    moves = _steps(make_optimizer(config), [3.0] * 6)
    np.testing.assert_allclose(moves, -1e-2 * np.array([0, 0.25, 0.5, 0.75, 1, 1]), rtol=1e-4)
    # Without warm-up even the first step moves by the full rate, whatever the gradient's size.
    flat = T2IUpdateConfig(learning_rate=1e-2, weight_decay=0.0, max_grad_norm=None, eps=0.0)
    np.testing.assert_allclose(_steps(make_optimizer(flat), [1e-6, 1e-6]), [-1e-2, -1e-2],
                               rtol=1e-4)


def test_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        clipped_adamw(T2IUpdateConfig(), warmup_steps=-1)


def test_the_loop_reads_t2i_warmup_steps():
    config = config_files.load_module(ROOT / "configs" / "tiny.py").get_config()
    assert t2i_update(config).warmup_steps == 0  # the paper's constant rate
    config.t2i.warmup_steps = 10
    assert t2i_update(config).warmup_steps == 10
    saved = config_dict(config)
    del saved["t2i"]["warmup_steps"]  # a config written before the field existed
    assert t2i_update(schema.upgrade(saved)).warmup_steps == 0
    config.t2i.warmup_steps = -2
    with pytest.raises(ValueError, match=r"config\.t2i\.warmup_steps=-2: a non-negative"):
        schema.check(config)

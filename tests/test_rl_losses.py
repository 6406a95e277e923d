"""The DDPO clipped importance-ratio loss: hand-computed values, clipping, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_schedule import SD15

from parrot_jax.diffusion import CFG, DDIMSchedule, branch_contexts, policy_step
from parrot_jax.rl import ddpo_loss, ddpo_timestep_loss


def test_advantage_minus_one_at_ratio_one_gives_loss_one():
    log_prob = jnp.array([-1.3, 0.2, 2.0])
    loss, metrics = ddpo_loss(log_prob, log_prob, -jnp.ones(3))
    assert float(loss) == 1.0
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["clipfrac"]) == 0.0
    assert float(metrics["ratio"]) == 1.0


def test_hand_computed_values():
    d = np.array([0.5, 0.5, -0.5, 1e-5])  # log-ratio per sample
    adv = np.array([1.0, -1.0, 2.0, 3.0])
    eps = 0.2
    loss, metrics = ddpo_loss(jnp.asarray(d), jnp.zeros(4), jnp.asarray(adv), clip_range=eps)
    rho = np.exp(d)
    # A > 0, rho > 1 + eps: the clipped term -A (1 + eps) is larger.
    # A < 0, rho > 1 + eps: -A rho is larger (no clipping of a worsening ratio).
    # A > 0, rho < 1 - eps: -A rho is larger.    In range: both terms equal -A rho.
    expected = [-1.0 * (1 + eps), 1.0 * rho[1], -2.0 * rho[2], -3.0 * rho[3]]
    np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["approx_kl"]), 0.5 * np.mean(d**2), rtol=1e-6)
    assert float(metrics["clipfrac"]) == 0.75


def test_advantages_are_clipped():
    loss, _ = ddpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.array([100.0, -100.0]), adv_clip=5.0)
    assert float(loss) == 0.0  # -5 and +5 average to zero
    loss, _ = ddpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.array([-100.0]), adv_clip=5.0)
    assert float(loss) == 5.0
    loss, _ = ddpo_loss(jnp.zeros(1), jnp.zeros(1), jnp.array([-100.0]), adv_clip=None)
    assert float(loss) == 100.0


def test_gradient_is_zero_outside_the_clip_range():
    adv = jnp.array([1.0, 1.0, -1.0])
    old = jnp.zeros(3)

    def loss(log_prob):
        return ddpo_loss(log_prob, old, adv, clip_range=1e-4)[0]

    grad = jax.grad(loss)(jnp.array([0.0, 0.1, 0.1]))
    # In range: d/dlogp of -A rho / B = -A / 3. Clipped (A > 0, rho > 1 + eps): 0.
    # A < 0 with rho > 1 + eps is not clipped: -A rho / 3.
    np.testing.assert_allclose(grad, [-1 / 3, 0.0, np.exp(0.1) / 3], rtol=1e-6)


def test_old_log_prob_and_advantages_get_no_gradient():
    g_old, g_adv = jax.grad(lambda o, a: ddpo_loss(jnp.zeros(2), o, a)[0], argnums=(0, 1))(
        jnp.zeros(2), jnp.ones(2))
    assert float(jnp.abs(g_old).sum()) == 0.0 and float(jnp.abs(g_adv).sum()) == 0.0


@pytest.mark.parametrize("advantage", [1.0, -2.0])
def test_timestep_loss_gradient_at_ratio_one(advantage):
    """At rho = 1: grad loss = -mean_b(A_b grad log pi(x_{t-1}^b | x_t^b)), through the denoiser."""
    schedule = DDIMSchedule.from_config(SD15, 10)

    def toy_denoiser(w, x, t, ctx):  # eps = w * x + mean(ctx), differentiable in w
        return w * x + ctx.mean(axis=(1, 2))[:, None, None, None]

    batch = 4
    x_t = jax.random.normal(jax.random.key(0), (batch, 4, 4, 2))
    contexts = branch_contexts(jnp.zeros((3, 6)), jax.random.normal(jax.random.key(1),
                                                                    (batch, 3, 6)))
    t = jnp.array([901, 501, 101, 1])
    w = jnp.float32(0.7)
    x_prev, old = jax.jit(lambda w: policy_step(toy_denoiser, w, schedule, contexts, CFG(5.0),
                                                x_t, t, eta=1.0, key=jax.random.key(2)))(w)
    adv = jnp.full((batch,), advantage)

    def loss(w):
        return ddpo_timestep_loss(toy_denoiser, w, schedule, contexts, CFG(5.0), x_t, t, x_prev,
                                  old, adv, eta=1.0)

    (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(w)
    np.testing.assert_allclose(float(value), -advantage, rtol=1e-6)
    assert float(metrics["approx_kl"]) <= 1e-12

    def mean_log_prob(w):
        _, lp = policy_step(toy_denoiser, w, schedule, contexts, CFG(5.0), x_t, t, eta=1.0,
                            prev_sample=x_prev)
        return jnp.mean(lp)

    expected = -advantage * jax.jit(jax.grad(mean_log_prob))(w)
    assert abs(float(expected)) > 1e-3
    np.testing.assert_allclose(float(grad), float(expected), rtol=1e-5)

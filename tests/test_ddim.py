"""The stochastic DDIM step against diffusers' DDIMScheduler.step and a float64 Gaussian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import nchw, nhwc
from diffusers import DDIMScheduler
from test_schedule import SD15, SD21

from parrot_jax.diffusion import DDIMSchedule, ddim_step

STEPS = 10
SHAPE = (3, 8, 8, 4)  # [B, h, w, c]


def _arrays(seed: int, n: int = 3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(n)]


def _reference(config: dict) -> DDIMScheduler:
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(STEPS)
    return ref


def _ref_step(ref, out, t, x, noise, eta=1.0) -> np.ndarray:
    kwargs = {"variance_noise": nchw(noise)} if eta > 0 else {}
    return nhwc(ref.step(nchw(out), int(t), nchw(x), eta=eta, **kwargs).prev_sample)


def _mean_std(ref, out, t, x, eta=1.0):
    """float64 mean and std of the step from diffusers' own pieces (noise = 0, _get_variance)."""
    mean = _ref_step(ref, out, t, x, np.zeros_like(x), eta).astype(np.float64)
    prev_t = int(t) - ref.config.num_train_timesteps // STEPS
    std = eta * float(ref._get_variance(int(t), prev_t)) ** 0.5
    return mean, std


def _gaussian_log_prob(x, mean, std) -> np.ndarray:
    z = (x.astype(np.float64) - mean) / std
    return np.mean(-0.5 * z**2 - np.log(std) - 0.5 * np.log(2 * np.pi), axis=(1, 2, 3))


@pytest.mark.parametrize("config", [SD15, SD21, {**SD15, "prediction_type": "sample",
                                                 "clip_sample": True}],
                         ids=["epsilon", "v_prediction", "sample_clipped"])
def test_prev_sample_matches_diffusers(config):
    ref, ours = _reference(config), DDIMSchedule.from_config(config, STEPS)
    worst = 0.0
    for i, t in enumerate(ref.timesteps.tolist()):
        out, x, noise = _arrays(i)
        expected = _ref_step(ref, out, t, x, noise)
        prev, _ = ddim_step(ours, out, t, x, eta=1.0, noise=noise)
        worst = max(worst, float(np.abs(np.asarray(prev) - expected).max()))
    assert worst <= 1e-5, worst


def test_per_sample_timesteps_match_diffusers():
    ref, ours = _reference(SD21), DDIMSchedule.from_config(SD21, STEPS)
    out, x, noise = _arrays(7)
    t = np.array([901, 401, 1], np.int32)  # first, middle and last step
    prev, _ = ddim_step(ours, out, t, x, eta=1.0, noise=noise)
    for b in range(3):
        expected = _ref_step(ref, out[b:b + 1], t[b], x[b:b + 1], noise[b:b + 1])
        np.testing.assert_allclose(np.asarray(prev[b:b + 1]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_log_prob_is_the_gaussian_density(eta):
    ref, ours = _reference(SD15), DDIMSchedule.from_config(SD15, STEPS)
    for i, t in enumerate(ref.timesteps.tolist()[::3]):
        out, x, other = _arrays(10 + i)
        mean, std = _mean_std(ref, out, t, x, eta)
        # Sampling: x_{t-1} = mean + std * noise, scored at itself.
        prev, log_prob = ddim_step(ours, out, t, x, eta=eta, noise=other)
        np.testing.assert_allclose(log_prob, _gaussian_log_prob(np.asarray(prev), mean, std),
                                   atol=2e-5, rtol=1e-6)
        # Re-scoring any given x_{t-1}: returned unchanged, density under the same Gaussian.
        given = (mean + 2 * std * other).astype(np.float32)
        back, log_prob = ddim_step(ours, out, t, x, eta=eta, prev_sample=given)
        assert back is given
        np.testing.assert_allclose(log_prob, _gaussian_log_prob(given, mean, std),
                                   atol=2e-5, rtol=1e-6)


def test_sampling_and_rescoring_agree_exactly():
    ours = DDIMSchedule.from_config(SD15, STEPS)
    out, x, _ = _arrays(3)
    t = jnp.asarray([901, 501, 1])
    prev, log_prob = ddim_step(ours, out, t, x, eta=1.0, key=jax.random.key(0))
    again, _ = ddim_step(ours, out, t, x, eta=1.0, key=jax.random.key(0))
    np.testing.assert_array_equal(prev, again)  # deterministic given the key
    _, rescored = ddim_step(ours, out, t, x, eta=1.0, prev_sample=prev)
    assert np.abs(np.asarray(rescored - log_prob)).max() <= 1e-6
    assert log_prob.shape == (3,) and log_prob.dtype == jnp.float32


def test_gradients_flow_through_the_mean_only():
    ours = DDIMSchedule.from_config(SD15, STEPS)
    out, x, prev = _arrays(4)

    def log_prob(model_output, prev_sample):
        return ddim_step(ours, model_output, 501, x, eta=1.0, prev_sample=prev_sample)[1].sum()

    g_out, g_prev = jax.grad(log_prob, argnums=(0, 1))(jnp.asarray(out), jnp.asarray(prev))
    assert np.abs(np.asarray(g_out)).max() > 0
    assert np.abs(np.asarray(g_prev)).max() == 0  # x_{t-1} is stop-gradient


def test_eta_zero_is_deterministic_ddim_and_has_no_log_prob():
    ref, ours = _reference(SD15), DDIMSchedule.from_config(SD15, STEPS)
    out, x, _ = _arrays(5)
    prev, log_prob = ddim_step(ours, out, 501, x, eta=0.0, with_log_prob=False)
    assert log_prob is None
    np.testing.assert_allclose(prev, _ref_step(ref, out, 501, x, None, eta=0.0), atol=1e-5)
    for kwargs in ({"key": jax.random.key(0)}, {"prev_sample": prev}, {}):
        with pytest.raises(ValueError, match="undefined with eta=0"):
            ddim_step(ours, out, 501, x, eta=0.0, **kwargs)


def test_std_floor_keeps_tiny_eta_finite():
    ours = DDIMSchedule.from_config(SD15, STEPS)
    out, x, prev = _arrays(6)
    _, log_prob = ddim_step(ours, out, 501, x, eta=1e-12, prev_sample=prev)
    assert np.isfinite(np.asarray(log_prob)).all()


def test_traced_eta_under_jit():
    ours = DDIMSchedule.from_config(SD15, STEPS)
    out, x, noise = _arrays(8)
    step = jax.jit(lambda s, eta: ddim_step(s, out, 501, x, eta=eta, noise=noise))
    for eta in (1.0, 0.5):
        prev, log_prob = step(ours, eta)
        expected = ddim_step(ours, out, 501, x, eta=eta, noise=noise)
        np.testing.assert_allclose(prev, expected[0], atol=1e-6)
        np.testing.assert_allclose(log_prob, expected[1], atol=1e-5)
    assert step._cache_size() == 1


def test_argument_checks():
    ours = DDIMSchedule.from_config(SD15, STEPS)
    out, x, noise = _arrays(9)
    with pytest.raises(ValueError, match="at most one of key, noise, prev_sample"):
        ddim_step(ours, out, 501, x, eta=1.0, key=jax.random.key(0), noise=noise)
    with pytest.raises(ValueError, match="give key, noise or prev_sample"):
        ddim_step(ours, out, 501, x, eta=1.0)
    with pytest.raises(ValueError, match=r"scalar or \[B\] with B=3"):
        ddim_step(ours, out, np.array([501, 1]), x, eta=1.0, noise=noise)

"""``transfer.transfer_table`` on denoisers whose answer is known: one that keeps each
identifier's parameters apart (a step for identifier k changes nothing under identifier j, so
every off-diagonal entry is exactly 0), and one that ignores its text (every text renders the
same images, so each row is constant). Both need the step to raise its own reward.

The denoisers predict x_0 (``prediction_type='sample'``): a constant prediction ``b`` moves the
mean of every eta = 1 DDIM step by a positive multiple of ``b``, so the policy gradient of a
reward on x_0 points the same way at every step and 64 samples estimate it reliably. (An
epsilon-predicting constant moves early and late steps in opposite directions, and the noisy
score of the last, nearly deterministic step swamps the estimate.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_schedule import SD15

from parrot_jax.analysis import transfer
from parrot_jax.diffusion import CFG, DDIMSchedule, branch_contexts

K, GROUPS, N, STEPS = 3, 4, 16, 4  # identifiers (= rewards = latent channels), groups, images
LATENT = (4, 4, K)


def separated(params, x, t, context):
    """x_0 = the sum of ``w[k]`` over the identifiers the text carries (``context[:, 0, :K]``,
    one-hot), at every pixel: only those rows of ``w`` reach the prediction."""
    return jnp.zeros_like(x) + (context[:, 0, :K] @ params["w"])[:, None, None, :]


def blind(params, x, t, context):
    """x_0 = v whatever the text."""
    return jnp.zeros_like(x) + params["v"]


def _contexts() -> jax.Array:
    """``[K + 1, B, 2, 1, K]``: null + one-hot identifier texts, then all of them together."""
    texts = [jnp.eye(K)[k] for k in range(K)] + [jnp.ones(K)]
    null = jnp.zeros((1, 1, K))
    return jnp.stack([branch_contexts(null, jnp.broadcast_to(t, (GROUPS * N, 1, K)))
                      for t in texts])


def _score(x_0: jax.Array, column: int) -> np.ndarray:
    """Reward k = m + m^2 / 2 with m the mean of latent channel k (the same for every text);
    the square makes a step change each image's reward by a different amount."""
    m = np.asarray(jnp.mean(x_0, axis=(1, 2)), np.float64)
    return m + m ** 2 / 2


def _table(denoiser, trainable) -> tuple[np.ndarray, np.ndarray]:
    schedule = DDIMSchedule.from_config({**SD15, "prediction_type": "sample"}, STEPS)
    return transfer.transfer_table(
        denoiser, trainable, {}, schedule, CFG(2.0), _contexts(), _score, num_rewards=K,
        group_size=N, latent_shape=LATENT, eta=1.0, step_size=0.1,
        train_key=jax.random.key(0), eval_key=jax.random.key(1))


@pytest.fixture(scope="module")
def tables():
    return (_table(separated, {"w": jnp.zeros((K, K))}),
            _table(blind, {"v": jnp.zeros((K,))}))


def test_a_step_for_one_identifier_stays_with_it_when_parameters_are_separate(tables):
    (table, stderr), _ = tables
    assert table.shape == stderr.shape == (K, K + 1)
    assert np.all(np.diag(table) > 5 * np.diag(stderr)), (table, stderr)  # raises its reward
    off = ~np.eye(K, dtype=bool)
    # The other identifiers' images do not move at all.
    np.testing.assert_array_equal(table[:, :K][off], 0.0)
    np.testing.assert_array_equal(stderr[:, :K][off], 0.0)
    np.testing.assert_allclose(table[:, K], np.diag(table), rtol=1e-4)  # "all" carries each row


def test_a_step_moves_every_text_alike_when_the_denoiser_ignores_text(tables):
    _, (table, stderr) = tables
    assert np.all(np.diag(table) > 5 * np.diag(stderr)), (table, stderr)
    for values in (table, stderr):
        np.testing.assert_allclose(values, np.repeat(np.diag(values)[:, None], K + 1, axis=1),
                                   rtol=1e-5)


def test_the_standard_error_is_that_of_the_paired_differences():
    """Two texts, one reward: the images under the step's own text move by a known amount each
    (the blind denoiser's x_0 = v shifts every image by the step's effect), so the standard
    error must be the std of those per-image changes over sqrt(B)."""
    schedule = DDIMSchedule.from_config({**SD15, "prediction_type": "sample"}, STEPS)
    contexts = _contexts()[:1]
    key = jax.random.key(1)
    table, stderr = transfer.transfer_table(
        blind, {"v": jnp.zeros((1,))}, {}, schedule, CFG(2.0), contexts[..., :1],
        lambda x, c: _score(x[..., :1], c), num_rewards=1, group_size=N,
        latent_shape=(4, 4, 1), eta=1.0, step_size=0.1, train_key=jax.random.key(0),
        eval_key=key)
    from parrot_jax.diffusion import sample

    x_before, _ = sample(blind, {"v": jnp.zeros((1,))}, schedule, contexts[0, ..., :1],
                         CFG(2.0), key, latent_shape=(4, 4, 1), eta=1.0,
                         with_log_probs=False)
    shift = 0.1 if table[0, 0] > 0 else -0.1  # one parameter: the step is +-0.1
    x_after, _ = sample(blind, {"v": jnp.full((1,), shift)}, schedule, contexts[0, ..., :1],
                        CFG(2.0), key, latent_shape=(4, 4, 1), eta=1.0,
                        with_log_probs=False)
    diff = _score(x_after, 0)[:, 0] - _score(x_before, 0)[:, 0]
    assert table[0, 0] == pytest.approx(diff.mean(), rel=1e-5)
    assert stderr[0, 0] == pytest.approx(diff.std(ddof=1) / np.sqrt(diff.size), rel=1e-4)
    assert stderr[0, 0] > 0


def test_a_gradient_of_zero_is_refused():
    """Parameters the denoiser ignores have no policy gradient: an error, not a NaN step."""
    def ignores_params(params, x, t, context):
        return jnp.zeros_like(x) + 0.0 * params["v"]

    with pytest.raises(ValueError, match="policy gradient of reward 0 is 0.0"):
        _table(ignores_params, {"v": jnp.zeros((K,))})


def test_markdown_divides_each_row_by_its_diagonal():
    text = transfer.markdown(["a", "b"], ["<reward 1>", "<reward 2>", "all"],
                             np.array([[0.2, 0.1, -0.4], [0.0, 0.0, 1.0]]),
                             np.array([[0.01, 0.02, 0.5], [0.0, 0.0, 0.1]]))
    assert "| a | +0.2 ± 0.01 | +0.1 ± 0.02 | -0.4 ± 0.5 |" in text
    assert "| a | 1.00 | 0.50 | -2.00 |" in text
    assert "| b | n/a (no change under its own identifier)" in text


def test_group_zscore():
    z = transfer.group_zscore(np.array([1.0, 3.0, 5.0, 5.0]), 2)
    np.testing.assert_allclose(z, [-1.0, 1.0, 0.0, 0.0])  # a flat group gets no advantage
    with pytest.raises(ValueError, match="constant within every group"):
        transfer.group_zscore(np.ones(4), 2)
    with pytest.raises(ValueError, match="groups of 3"):
        transfer.group_zscore(np.ones(4), 3)


def test_bad_options_exit_with_a_message(tmp_path, capsys):
    for args, message in ((["--num_images", "1"], "--num_images 1"),
                          (["--step_size", "0"], "--step_size 0.0"),
                          ([], "config.json: missing")):
        with pytest.raises(SystemExit) as e:
            transfer.main(["--workdir", str(tmp_path), *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err

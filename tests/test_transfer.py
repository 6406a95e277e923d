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

from parrot_jax import transfer
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
    """Reward k = the mean of latent channel k (the same for every text)."""
    return np.asarray(jnp.mean(x_0, axis=(1, 2)))


def _table(denoiser, trainable) -> np.ndarray:
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
    table, _ = tables
    assert table.shape == (K, K + 1)
    assert np.all(np.diag(table) > 0), table  # each step raises its own reward
    off = table[:, :K][~np.eye(K, dtype=bool)]
    np.testing.assert_array_equal(off, 0.0)  # the other identifiers' images do not move
    np.testing.assert_allclose(table[:, K], np.diag(table), rtol=1e-4)  # "all" carries each row


def test_a_step_moves_every_text_alike_when_the_denoiser_ignores_text(tables):
    _, table = tables
    assert np.all(np.diag(table) > 0), table
    np.testing.assert_allclose(table, np.repeat(np.diag(table)[:, None], K + 1, axis=1),
                               rtol=1e-5)


def test_markdown_divides_each_row_by_its_diagonal():
    text = transfer.markdown(["a", "b"], ["<reward 1>", "<reward 2>", "all"],
                             np.array([[0.2, 0.1, -0.4], [0.0, 0.0, 1.0]]))
    assert "| a | +0.2 | +0.1 | -0.4 |" in text
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
    for args, message in ((["--images", "1"], "--images 1"), (["--step", "0"], "--step 0.0"),
                          ([], "config.json: missing")):
        with pytest.raises(SystemExit) as e:
            transfer.main([str(tmp_path), *args])
        assert e.value.code == 2
        assert message in capsys.readouterr().err

"""``conflict.reward_conflict`` against hand-computed answers: the within-group share of each
reward's variance, the within- and between-group correlations, and the non-dominated share;
bad input is refused. The CLI's end-to-end run is in test_toyworld_assets.py (it shares that
file's smoke run)."""

import json
from pathlib import Path

import numpy as np
import pytest

from parrot_jax import config_files
from parrot_jax.analysis import conflict
from parrot_jax.workdir import config_dict

ROOT = Path(__file__).resolve().parents[1]


def test_statistics_match_hand_computed_values():
    # Two groups of two images. Reward 0: group offsets 0, 2 plus +1 / -1 inside each group;
    # reward 1: offsets 0, 4 plus -1 / +1. Within groups they are opposite (corr -1), between
    # groups they rise together (corr +1); population variances: r0 within 1, between 1;
    # r1 within 1, between 4. Neither image of a group dominates the other.
    r = np.array([[[1.0, -1.0], [-1.0, 1.0]],
                  [[3.0, 3.0], [1.0, 5.0]]])
    c = conflict.reward_conflict(r)
    np.testing.assert_allclose(c.within_share, [0.5, 0.2])
    np.testing.assert_allclose(c.within_corr, [[1, -1], [-1, 1]], atol=1e-12)
    np.testing.assert_allclose(c.between_corr, [[1, 1], [1, 1]], atol=1e-12)
    assert c.non_dominated == 1.0
    # Make image 1 of group 0 dominated (it loses on both): 3 of 4 images survive.
    r[0, 1] = [-1.0, -2.0]
    assert conflict.reward_conflict(r).non_dominated == 0.75


def test_markdown_puts_within_above_and_between_below_the_diagonal():
    r = np.array([[[1.0, -1.0], [-1.0, 1.0]], [[3.0, 3.0], [1.0, 5.0]]])
    text = conflict.markdown(["a", "b"], conflict.reward_conflict(r))
    assert "| within-group share of variance | 0.50 | 0.20 |" in text
    assert "| a | 1 | -1.00 |" in text and "| b | +1.00 | 1 |" in text
    assert text.rstrip().endswith("Non-dominated share of a group: 1.00")


def test_metric_split_and_correlations():
    # The same two groups; metric m follows reward 0 inside groups (+1 / -1) around group
    # means 10 and 13: within variance 1, between 2.25 -> share 1 / 3.25; within-group
    # correlation +1 with reward 0, -1 with reward 1. A metric constant inside every group has
    # no correlation.
    r = np.array([[[1.0, -1.0], [-1.0, 1.0]], [[3.0, 3.0], [1.0, 5.0]]])
    stats = conflict.metric_conflict({"m": np.array([[11.0, 9.0], [14.0, 12.0]]),
                                      "flat": np.array([[1.0, 1.0], [2.0, 2.0]])}, r)
    share, corr = stats["m"]
    assert share == pytest.approx(1 / 3.25)
    np.testing.assert_allclose(corr, [1.0, -1.0], atol=1e-12)
    assert stats["flat"][0] == 0.0 and np.all(np.isnan(stats["flat"][1]))
    text = conflict.metric_markdown(["a", "b"], stats)
    assert "| m | 0.31 | +1.00 | -1.00 |" in text
    assert "| flat | 0.00 | n/a (constant in every group) |" in text
    with pytest.raises(ValueError, match=r"metric 'm' has shape \(3,\)"):
        conflict.metric_conflict({"m": np.zeros(3)}, r)


def test_bad_input_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"\[G, N, K\] with G, N >= 2"):
        conflict.reward_conflict(np.zeros((4, 2)))
    r = np.random.default_rng(0).normal(size=(3, 4, 2))
    r[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite rewards at \(group, image\) \[\[1, 2\]\]"):
        conflict.reward_conflict(r)
    r = np.random.default_rng(0).normal(size=(3, 4, 2))
    r[:, :, 1] = np.arange(3)[:, None]  # varies between groups only
    with pytest.raises(ValueError, match=r"reward columns \[1\] do not vary"):
        conflict.reward_conflict(r)
    config = config_files.load(ROOT / "configs" / "tiny.py:smoke")
    config.model.rewards = "parrot"
    (tmp_path / "config.json").write_text(json.dumps(config_dict(config)))
    with pytest.raises(SystemExit) as exit_info:
        conflict.main(["--workdir", str(tmp_path), "--num_images", "1"])
    assert exit_info.value.code == 2
    assert "--num_images 1: at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        conflict.main(["--workdir", str(tmp_path), "--oracle"])
    assert exit_info.value.code == 2
    assert "--oracle: " in capsys.readouterr().err

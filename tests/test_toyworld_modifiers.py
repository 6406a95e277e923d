"""The PEN landscape's arithmetic on synthetic data with analytic answers: which modifiers an
expansion adds, each modifier's effect on centred z-scored rewards, on the identifier's own
reward and on their mean, and the errors for unusable input. The end-to-end CLI run on a toy
workdir is in test_toyworld_assets.py (it shares that file's smoke run)."""

import json
from pathlib import Path

import numpy as np
import pytest

from parrot_jax import config_files
from parrot_jax.analysis import modifiers
from parrot_jax.workdir import config_dict

ROOT = Path(__file__).resolve().parents[1]


def test_added_modifiers_are_those_the_prompt_does_not_name():
    prompt = "a red ring on a black background"
    expansion = "<reward 2>, a red ring on a black background, large, vivid, soft edges, centered"
    assert modifiers.added_modifiers(prompt, expansion) == {
        "size": "large", "saturation": "vivid", "edges": "soft", "position": "centre"}
    assert modifiers.added_modifiers(prompt, prompt) == {}


def _balanced(c=0.8):
    """3 prompts x 4 images: rows 0-1 of each prompt add vivid (rows 2-3 do not), identifiers
    alternate 0, 1. Reward 0 = prompt offset + c * vivid; reward 1 = another offset + a pattern
    orthogonal to vivid within every prompt. Rows 0 and 2 of each prompt add 'large'."""
    vivid = np.tile([1.0, 1.0, 0.0, 0.0], 3)
    prompt_ids = np.repeat([10, 20, 30], 4)
    offsets = np.repeat([0.0, 5.0, -3.0], 4)
    rewards = np.stack([offsets + c * vivid, -2 * offsets + np.tile([1.0, -1.0, 1.0, -1.0], 3)],
                       axis=1)
    identifiers = np.tile([0, 1, 0, 1], 3)
    mods = [({"saturation": "vivid"} if v else {}) | ({"size": "large"} if i % 2 == 0 else {})
            for i, v in enumerate(vivid)]
    return rewards, identifiers, prompt_ids, mods


def test_effects_match_the_analytic_values():
    c = 0.8
    rewards, identifiers, prompt_ids, mods = _balanced(c)
    s0 = rewards[:, 0].std()
    effects = modifiers.modifier_effects(rewards, identifiers, prompt_ids, mods, min_count=2)
    assert [(e.attribute, e.value) for e in effects] == [("size", "large"),
                                                         ("saturation", "vivid")]
    large, vivid = effects
    assert vivid.count == 6
    # Balanced within every prompt, so the offsets cancel: reward 0 moves by c / its std,
    # reward 1 not at all; 'own' averages reward 0 (rows 0, 2) and reward 1 (rows 1, 3).
    np.testing.assert_allclose(vivid.rewards, [c / s0, 0.0], atol=1e-12)
    assert vivid.own == pytest.approx(c / s0 / 2)
    assert vivid.equal == pytest.approx(c / s0 / 2)
    # Standard errors: reward 0 is constant on each side; reward 1 is +-1 / s1, three of each
    # among six images per side (ddof 1 variance 6/5 / s1^2): sqrt(2 * (6/5) / 6) / s1.
    s1 = rewards[:, 1].std()
    np.testing.assert_allclose(vivid.rewards_se, [0.0, np.sqrt(0.4) / s1], atol=1e-12)
    # 'large' (rows 0, 2) is orthogonal to vivid; reward 1's pattern is +1 on it, -1 off it.
    np.testing.assert_allclose(large.rewards, [0.0, 2 / s1], atol=1e-12)
    # 'own' compares rows 0, 2 (identifier 0: reward 0 centred, mean 0 over vivid and not) with
    # rows 1, 3 (identifier 1: reward 1 centred is -1 / s1 there).
    assert large.own == pytest.approx(1 / s1)
    assert large.rewards_se[0] > 0  # vivid varies inside both halves


def test_rare_and_universal_values_are_not_measured():
    rewards, identifiers, prompt_ids, mods = _balanced()
    mods = [m | {"outline": "outlined"} for m in mods]  # in every image: nothing to compare
    mods[0] = mods[0] | {"background": "white"}  # in one image
    effects = modifiers.modifier_effects(rewards, identifiers, prompt_ids, mods, min_count=2)
    assert {e.attribute for e in effects} == {"size", "saturation"}
    assert modifiers.modifier_effects(rewards, identifiers, prompt_ids, mods, min_count=7) == []


def test_bad_input_is_refused():
    rewards, identifiers, prompt_ids, mods = _balanced()
    with pytest.raises(ValueError, match=r"12 reward rows but .*'modifiers': 11"):
        modifiers.modifier_effects(rewards, identifiers, prompt_ids, mods[:-1])
    nan = rewards.copy()
    nan[5, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite rewards in rows \[5\]"):
        modifiers.modifier_effects(nan, identifiers, prompt_ids, mods)
    flat = rewards.copy()
    flat[:, 1] = 2.0
    with pytest.raises(ValueError, match=r"reward columns \[1\] are constant"):
        modifiers.modifier_effects(flat, identifiers, prompt_ids, mods)
    with pytest.raises(ValueError, match=r"identifiers must lie in \[0, 2\)"):
        modifiers.modifier_effects(rewards, identifiers + 1, prompt_ids, mods)
    with pytest.raises(ValueError, match="min_count=1"):
        modifiers.modifier_effects(rewards, identifiers, prompt_ids, mods, min_count=1)


def test_markdown_rows():
    rewards, identifiers, prompt_ids, mods = _balanced()
    effects = modifiers.modifier_effects(rewards, identifiers, prompt_ids, mods, min_count=2)
    text = modifiers.markdown(["r0", "r1"], effects, len(rewards))
    lines = text.splitlines()
    assert lines[0] == "| modifier | share | r0 | r1 | own | equal |"
    assert lines[3].startswith("| saturation=vivid | 0.50 | +")
    assert len(lines) == 2 + len(effects)


def test_cli_refuses_a_run_outside_the_toy_world(tmp_path, capsys):
    config = config_files.load(ROOT / "configs" / "tiny.py:smoke")
    (tmp_path / "config.json").write_text(json.dumps(config_dict(config)))
    with pytest.raises(SystemExit) as exit_info:
        modifiers.main(["--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "model.rewards='tiny'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        modifiers.main(["--workdir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "no such directory" in capsys.readouterr().err

"""The toy world's reward labels (and their conflicts) and the pixel oracle."""

import numpy as np
import pytest

from parrot_jax.toyworld import labels, oracle, render, world
from parrot_jax.toyworld.world import ATTRIBUTES


@pytest.fixture(scope="module")
def every():
    return world.all_scenes()


def where(scenes, **values):
    keep = np.ones(world.num_scenes(scenes), bool)
    for a, v in values.items():
        keep &= scenes[a] == ATTRIBUTES[a].index(v)
    return world.select(scenes, keep)


def best(scenes, score) -> dict:
    return world.describe(scenes, int(np.argmax(score)))


def test_sentiment_classes_are_balanced(every):
    frac = np.bincount(labels.sentiment_label(every), minlength=3) / world.num_scenes(every)
    assert frac.min() > 0.3 and frac.max() < 0.37
    happy = world.describe(every, 0) | dict(colour="orange", background="cream", edges="soft")
    sad = happy | dict(colour="blue", background="black", shape="cross", edges="sharp")
    pick = {k: np.array([ATTRIBUTES[k].index(d[k]) for d in (happy, sad)]) for k in ATTRIBUTES}
    assert labels.sentiment_label(pick).tolist() == [0, 2]


def test_conflict_sentiment_vs_preference_on_a_cold_prompt(every):
    n = world.num_scenes(every)
    pref = labels.preference_label(every, ["a blue square"] * n)
    senti = labels.sentiment_score(every)
    p, s = best(every, pref), best(every, senti)
    assert (p["colour"], p["shape"]) == ("blue", "square")
    assert s["colour"] in ("red", "orange", "yellow", "pink") and s["shape"] == "circle"
    # the sentiment optimum is heavily penalised by preference and vice versa
    assert pref[np.argmax(senti)] < pref.max() - 5
    assert senti[np.argmax(pref)] < np.quantile(senti, 0.5)


def test_conflict_bright_backgrounds_vs_contrast_for_bright_shapes(every):
    yellow = where(every, colour="yellow")
    assert best(yellow, labels.aesthetic_label(yellow))["background"] in ("black", "navy")
    assert best(yellow, labels.sentiment_score(yellow))["background"] in ("cream", "white")
    bright_bg = where(yellow, background="cream")
    dark_bg = where(yellow, background="black")
    assert labels.aesthetic_label(dark_bg).mean() > labels.aesthetic_label(bright_bg).mean() + 1
    assert labels.sentiment_score(bright_bg).mean() > labels.sentiment_score(dark_bg).mean() + 1


def test_conflict_soft_vs_sharp(every):
    sharp, soft = where(every, edges="sharp"), where(every, edges="soft")  # same order otherwise
    assert (labels.aesthetic_label(sharp) > labels.aesthetic_label(soft)).all()
    assert (labels.sentiment_score(soft) > labels.sentiment_score(sharp)).all()


def test_preference_follows_the_prompt():
    s = world.sample_scenes(np.random.default_rng(0), 200, {"shape": "ring", "colour": "green"})
    right = labels.preference_label(s, ["a green ring"] * 200)
    wrong = labels.preference_label(s, ["a red ring"] * 200)
    np.testing.assert_allclose(right - wrong, 4.0, atol=1e-5)
    on_navy = labels.preference_label(s, ["a green ring on a navy background"] * 200)
    np.testing.assert_allclose(right - on_navy, np.where(s["background"] == 1, 0.0, 1.0),
                               atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        labels.preference_label(s, ["a green ring"])


def scenes_of(rows: list[dict]) -> world.Scenes:
    base = dict(shape="circle", colour="red", background="gray", size="large",
                position="centre", saturation="vivid", edges="sharp", outline="none")
    return {a: np.array([ATTRIBUTES[a].index((base | r)[a]) for r in rows]) for a in ATTRIBUTES}


@pytest.fixture(scope="module")
def pairs():
    """Pairs of scenes differing in one attribute, 6 jitter draws each, plus their images."""
    variants = [dict(saturation="vivid"), dict(saturation="pastel"), dict(edges="sharp"),
                dict(edges="soft"), dict(size="small"), dict(size="large"),
                dict(position="centre"), dict(position="left"),
                dict(colour="white", background="white"), dict(shape="square"),
                dict(shape="triangle"), dict(shape="cross"), dict(shape="ring"),
                dict(colour="yellow", background="black"), dict(colour="yellow",
                                                                 background="cream")]
    rows = [v for v in variants for _ in range(6)]
    scenes = scenes_of(rows)
    return rows, render.render(scenes, np.random.default_rng(0))


def metric(pairs, name, prompt="", **variant):
    rows, images = pairs
    idx = [i for i, r in enumerate(rows) if r == variant]
    prompts = [prompt or f"a {(r.get('colour', 'red'))} {r.get('shape', 'circle')}"
               for r in (rows[i] for i in idx)]
    return oracle.oracle_metrics(images[idx], prompts)[name]


def test_oracle_separates_known_attributes(pairs):
    assert metric(pairs, "saturation", saturation="vivid").min() > metric(
        pairs, "saturation", saturation="pastel").max()
    assert metric(pairs, "sharpness", edges="sharp").min() > metric(
        pairs, "sharpness", edges="soft").max() + 0.05
    assert metric(pairs, "area", size="large").min() > 2 * metric(pairs, "area", size="small").max()
    assert metric(pairs, "centroid_offset", position="centre").max() < 0.05
    assert metric(pairs, "centroid_offset", position="left").min() > 0.12
    assert metric(pairs, "hue_error", "a red circle", saturation="vivid").max() < 0.1
    assert metric(pairs, "hue_error", "a blue circle", saturation="vivid").min() > 0.5
    assert metric(pairs, "hue_error", "a circle", saturation="vivid").max() < 0.1  # nearest
    assert metric(pairs, "contrast", colour="yellow", background="black").min() > metric(
        pairs, "contrast", colour="yellow", background="cream").max() + 0.5
    for shape in ("circle", "square", "triangle", "cross", "ring"):
        variant = dict(saturation="vivid") if shape == "circle" else dict(shape=shape)
        right = metric(pairs, "shape_iou", f"a red {shape}", **variant)
        assert right.min() > 0.8, shape
        for other in ("circle", "square", "triangle", "cross", "ring"):
            if other != shape:
                wrong = metric(pairs, "shape_iou", f"a red {other}", **variant)
                assert right.min() > wrong.max() + 0.05, (shape, other)


def test_oracle_is_finite_on_an_invisible_shape(pairs):
    m = {k: metric(pairs, k, colour="white", background="white") for k in oracle.METRICS}
    assert all(np.isfinite(v).all() for v in m.values())
    assert (m["area"] == 0).all() and (m["shape_iou"] == 0).all() and (m["hue_error"] == 1).all()
    with pytest.raises(ValueError, match="prompts"):
        oracle.oracle_metrics(np.zeros((2, 32, 32, 3)), ["a"])
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        oracle.oracle_metrics(np.zeros((2, 32, 32)), ["a", "b"])

"""The toy world's scenes, renderer and prompt grammar."""

import numpy as np
import pytest

from parrot_jax.toyworld import captions, render, world
from parrot_jax.toyworld.world import ATTRIBUTES


def one_scene(**values: str) -> world.Scenes:
    base = dict(shape="circle", colour="red", background="black", size="large",
                position="centre", saturation="vivid", edges="sharp", outline="none")
    base.update(values)
    return {a: np.array([ATTRIBUTES[a].index(v)]) for a, v in base.items()}


def test_sample_scenes_ranges_fixed_and_errors():
    s = world.sample_scenes(np.random.default_rng(0), 500, {"colour": "blue", "edges": "soft"})
    assert world.num_scenes(s) == 500 and list(s) == list(ATTRIBUTES)
    assert (s["colour"] == 4).all() and (s["edges"] == 1).all()
    for a, values in ATTRIBUTES.items():
        if a not in ("colour", "edges"):
            assert set(s[a]) == set(range(len(values))), a  # every value drawn
    with pytest.raises(ValueError, match="colour='teal'"):
        world.sample_scenes(np.random.default_rng(0), 2, {"colour": "teal"})
    with pytest.raises(ValueError, match="unknown attribute 'hue'"):
        world.sample_scenes(np.random.default_rng(0), 2, {"hue": "red"})
    with pytest.raises(ValueError, match="shape"):
        world.num_scenes({**s, "shape": np.full(500, 9)})


def test_scenes_for_prompt_fixes_named_attributes():
    s = captions.scenes_for_prompt("<reward 2>, a green ring, soft edges, on the left",
                                   np.random.default_rng(1), 200)
    assert world.describe(s, 0)["shape"] == "ring" and (s["colour"] == 3).all()
    assert (s["edges"] == 1).all() and (s["position"] == 1).all()
    assert len(set(s["size"])) == 3  # unnamed: random


def test_all_scenes_enumerates_the_world():
    s = world.all_scenes()
    n = world.num_scenes(s)
    assert n == np.prod([len(v) for v in ATTRIBUTES.values()]) == 24000
    assert len({tuple(s[a][i] for a in ATTRIBUTES) for i in range(n)}) == n


def test_render_colours_geometry_and_determinism():
    s = world.sample_scenes(np.random.default_rng(0), 64)
    a = render.render(s, np.random.default_rng(5))
    b = render.render(s, np.random.default_rng(5))
    assert a.shape == (64, 32, 32, 3) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1 and np.array_equal(a, b)
    img = render.render(one_scene(colour="yellow", background="navy"), np.random.default_rng(0))
    np.testing.assert_allclose(img[0, 16, 16], render.VIVID_RGB[2], atol=0.08)  # fill
    np.testing.assert_allclose(img[0, 0, 0], render.BACKGROUND_RGB[1], atol=0.08)  # background
    pastel = render.render(one_scene(colour="yellow", saturation="pastel"),
                           np.random.default_rng(0))
    assert pastel[0, 16, 16, 2] > img[0, 16, 16, 2] + 0.3  # mixed toward white


def fg(img: np.ndarray) -> np.ndarray:
    return np.linalg.norm(img - img[:, :1, :1], axis=-1) > 0.3


def test_render_position_size_edges_outline():
    rng = np.random.default_rng(0)
    left = fg(render.render(one_scene(position="left", size="small"), rng))[0]
    assert left[:, :16].sum() > 5 * left[:, 16:].sum()
    top = fg(render.render(one_scene(position="top", size="small"), rng))[0]
    assert top[:16].sum() > 5 * top[16:].sum()
    areas = [fg(render.render(one_scene(size=z), rng)).sum() for z in ATTRIBUTES["size"]]
    assert areas[0] < areas[1] < areas[2]

    def partial(img):  # pixels between background and fill
        d = np.linalg.norm(img - img[:, :1, :1], axis=-1)
        return ((d > 0.1 * d.max()) & (d < 0.9 * d.max())).sum()

    assert partial(render.render(one_scene(edges="soft"), rng)) > 2 * partial(
        render.render(one_scene(edges="sharp"), rng))
    plain = render.render(one_scene(colour="yellow"), np.random.default_rng(3))
    rim = render.render(one_scene(colour="yellow", outline="outlined"), np.random.default_rng(3))
    changed = np.abs(rim - plain).max(-1)[0] > 0.3
    assert changed.sum() > 20 and not changed[16, 16]  # a rim, not the middle
    assert rim[0][changed].mean() < 0.3  # dark rim on a bright fill
    for shape in ATTRIBUTES["shape"]:  # every shape draws something of a sensible size
        area = fg(render.render(one_scene(shape=shape, size="medium"), rng)).mean()
        assert 0.05 < area < 0.35, shape
    with pytest.raises(ValueError, match="size"):
        render.render(one_scene(), rng, size=4)


@pytest.fixture(scope="module")
def scenes():
    return world.sample_scenes(np.random.default_rng(0), 300)


def test_user_prompts(scenes):
    prompts = captions.user_prompts(scenes, np.random.default_rng(0))
    assert prompts[0].startswith(("a ", "an ")) and any("background" in p for p in prompts)
    for i, p in enumerate(prompts):
        named = captions.parse(p)
        assert set(named) <= {"colour", "shape", "background"} and {"colour", "shape"} <= set(named)
        assert all(named[a] == world.describe(scenes, i)[a] for a in named)
    assert captions.user_prompts(one_scene(colour="orange"), np.random.default_rng(0),
                                 p_background=0.0) == ["an orange circle"]


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_parse_inverts_captions(scenes, p):
    texts = captions.captions(scenes, np.random.default_rng(1), p_attribute=p)
    counts = []
    for i, text in enumerate(texts):
        named = captions.parse(text)
        truth = world.describe(scenes, i)
        assert {"colour", "shape"} <= set(named), text
        assert all(named[a] == truth[a] for a in named), text
        # no phrase was missed: one comma-separated phrase per named comma-phrase attribute
        counts.append(len(named))
        assert len(text.split(",")) == 1 + len(set(named) & {"outline", "edges", "position",
                                                              "background"})
    expected = 2 + 6 * p
    assert abs(np.mean(counts) - expected) < 0.5
    if p == 1.0:
        assert texts[0].count(",") == 4 and all(c == 8 for c in counts)


def test_parse_ignores_identifiers_unknown_words_and_reads_both_whites():
    assert captions.parse("<reward 1>, <reward 4>, a White circle on a white background, "
                          "trending on artstation, soft") == {
        "colour": "white", "shape": "circle", "background": "white", "edges": "soft"}
    assert captions.parse("a red red blue square at the top") == {
        "colour": "red", "shape": "square", "position": "top"}  # first one wins
    assert captions.parse("hello, world") == {}
    with pytest.raises(TypeError, match="str"):
        captions.parse(None)


def test_engineer_adds_two_to_four_noncontradicting_biased_modifiers(scenes):
    users = captions.user_prompts(scenes, np.random.default_rng(2))
    out = captions.engineer(users, np.random.default_rng(3))
    assert out == captions.engineer(users, np.random.default_rng(3))
    added = []
    for user, text in zip(users, out):
        assert text.startswith(user + ", ")
        before, after = captions.parse(user), captions.parse(text)
        assert {a: after[a] for a in before} == before  # nothing the user said changes
        extra = set(after) - set(before)
        assert 2 <= len(extra) <= 4 and len(text.split(",")) == 1 + len(extra), text
        added += [after[a] for a in extra]
    vals = {v: added.count(v) for v in set(added)}
    assert vals["soft"] > 2 * vals["sharp"] and vals["pastel"] > 1.5 * vals["vivid"]
    full = captions.engineer(["a red circle, large, vivid, outlined, sharp edges, centered"],
                             np.random.default_rng(0))[0]
    assert full.endswith("centered, on a " + captions.parse(full)["background"] + " background")


def test_vocabulary_covers_everything(scenes):
    vocab = set(captions.vocabulary())
    rng = np.random.default_rng(4)
    texts = captions.captions(scenes, rng, 1.0) + captions.engineer(
        captions.user_prompts(scenes, rng, 0.5), rng)
    words = {w for t in texts for w in t.replace(",", " , ").split()}
    assert words <= vocab
    assert "," in vocab and "centered" in vocab and "<reward" not in " ".join(vocab)

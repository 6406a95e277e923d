"""The toy world's text-side models: tokenizers, the toy CLIP, the reward heads and the toy PEN.

Trainers run a handful of steps on tiny configs (their losses must fall on held-out data); metric
functions are checked on constructed cases with known answers; the four heads must form a
``RewardSet`` that evaluates rendered images against prompts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parrot_jax import hub
from parrot_jax.expansion.template import InstructionTemplate
from parrot_jax.toyworld import captions, clip_train, heads_train, pen_train, render, world
from parrot_jax.toyworld.tokenizers import clip_tokenizer, identifiers, pen_tokenizer

TINY_CLIP = clip_train.ClipTrainConfig(
    vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
    text_heads=2, projection_dim=16, batch_size=32, steps=12, learning_rate=3e-3,
    warmup_steps=2, eval_size=64, log_every=0)
TINY_HEADS = heads_train.HeadsTrainConfig(
    num_images=256, eval_images=128, embed_batch=128, aesthetic_hidden=(8,), probe_steps=60,
    probe_batch=64, preference_steps=4, preference_batch=8, preference_warmup=1,
    eval_pairs=32, log_every=0)
TINY_PEN = pen_train.PenTrainConfig(
    d_model=32, d_kv=8, d_ff=64, num_heads=4, num_pairs=256, heldout_pairs=32, batch_size=16,
    eval_batch_size=32, steps=30, learning_rate=5e-3, warmup_steps=3, schedule="constant",
    eval_prompts=8, log_every=0)


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest: unoptimised XLA


@pytest.fixture(scope="module")
def clip_tok():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def pen_tok():
    return pen_tokenizer(256)


@pytest.fixture(scope="module")
def trained_clip(clip_tok):
    return clip_train.train_clip(TINY_CLIP, clip_tok, seed=0)


@pytest.fixture(scope="module")
def heads(trained_clip, clip_tok):
    clip, params, _ = trained_clip
    return heads_train.train_heads(TINY_HEADS, clip, params, clip_tok, seed=0)


# --- tokenizers ------------------------------------------------------------------------------

def _texts(n=300, seed=0):
    rng = np.random.default_rng(seed)
    scenes = world.sample_scenes(rng, n)
    prompts = captions.user_prompts(scenes, rng)
    return captions.captions(scenes, rng, 1.0), prompts, captions.engineer(prompts, rng)


def test_clip_tokenizer_reads_identifiers_as_single_tokens(clip_tok):
    ids = [clip_tok(t, add_special_tokens=False)["input_ids"] for t in identifiers()]
    assert all(len(i) == 1 for i in ids)
    flat = [i[0] for i in ids]
    assert len(set(flat)) == 4 and clip_tok.unk_token_id not in flat
    row = clip_tok("<reward 2>, <reward 4>, a red circle")["input_ids"]
    assert clip_tok.convert_ids_to_tokens(row) == [
        "<|startoftext|>", "<reward 2>", ",", "<reward 4>", ",", "a", "red", "circle",
        "<|endoftext|>"]
    assert (clip_tok.bos_token_id, clip_tok.eos_token_id, clip_tok.pad_token_id) == (0, 1, 1)


def test_clip_tokenizer_covers_every_text_and_round_trips(clip_tok):
    caps, prompts, expansions = _texts()
    texts = caps + prompts + ["<reward 1>, <reward 2>, <reward 3>, <reward 4>, " + e
                              for e in expansions]
    ids = clip_tok(texts)["input_ids"]
    assert all(clip_tok.unk_token_id not in row for row in ids)
    assert max(len(row) for row in ids) <= clip_tok.model_max_length
    for text, row in zip(texts[:50], ids):
        decoded = clip_tok.decode(row, skip_special_tokens=True).replace(" ,", ",")
        assert decoded == text


def test_tokenizers_save_and_load_through_hub(tmp_path, clip_tok, pen_tok):
    template = InstructionTemplate()
    _, prompts, expansions = _texts(50)
    for name, tok, texts in (("clip", clip_tok, ["<reward 3>, " + e for e in expansions]),
                             ("pen", pen_tok, [template.format(p) for p in prompts])):
        tok.save_pretrained(tmp_path / name)
        loaded = hub.load_tokenizer(tmp_path / name)
        assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
        assert len(loaded) == len(tok)
    assert (pen_tok.pad_token_id, pen_tok.eos_token_id, pen_tok.unk_token_id) == (0, 1, 2)
    ids = pen_tok(expansions)["input_ids"]
    assert all(2 not in row and row[-1] == 1 for row in ids)
    assert pen_tok.batch_decode(ids, skip_special_tokens=True) == expansions


# --- CLIP ------------------------------------------------------------------------------------

def test_consistency_marks_captions_a_scene_satisfies():
    scenes = world.sample_scenes(np.random.default_rng(0), 2,
                                 {"shape": "circle", "colour": "red", "background": "navy"})
    scenes["size"] = np.array([0, 2])  # small, large
    texts = ["a red circle", "a small red circle", "a red circle on a navy background",
             "a blue circle", "a large red circle, on a black background"]
    expected = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(clip_train.consistency(scenes, texts), expected)


def test_multi_positive_infonce_matches_hand_computation():
    eye = jnp.eye(4, dtype=bool)
    assert float(clip_train.multi_positive_infonce(jnp.zeros((4, 4)), eye)) == pytest.approx(
        np.log(4))
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    pos = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], bool)
    ls_row = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    ls_col = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    i2t = -np.array([(ls_row[0, 0] + ls_row[0, 1]) / 2, ls_row[1, 1], ls_row[2, 2]])
    t2i = -np.array([ls_col[0, 0], (ls_col[0, 1] + ls_col[1, 1]) / 2, ls_col[2, 2]])
    got = float(clip_train.multi_positive_infonce(jnp.asarray(logits), jnp.asarray(pos)))
    assert got == pytest.approx(0.5 * (i2t.mean() + t2i.mean()), rel=1e-5)


def test_retrieval_and_zero_shot_metrics():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.3]])
    pos = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], bool)  # row 1's best (col 0) is a positive
    assert clip_train.retrieval_top1(sim, pos) == pytest.approx(2 / 3)
    assert clip_train.zero_shot_accuracy(sim, np.array([0, 1, 2])) == pytest.approx(2 / 3)
    colours, shapes = world.ATTRIBUTES["colour"], world.ATTRIBUTES["shape"]
    prompts = clip_train.class_prompts()  # colour-major, as evaluate() reshapes them
    assert [captions.parse(p) for p in prompts] == [
        {"colour": c, "shape": s} for c in colours for s in shapes]


def test_train_clip_learns_and_feeds_a_text_encoder(trained_clip, clip_tok):
    clip, params, m = trained_clip
    assert m["eval_loss"] < m["initial_eval_loss"]
    assert m["train_loss"] < m["first_loss"]
    for k in ("retrieval_top1", "zero_shot_colour", "zero_shot_shape"):
        assert 0.0 <= m[k] <= 1.0
    assert clip.config.vision.num_patches == 64
    text, text_params = clip_train.text_encoder(clip, params)
    ids, mask = clip_train.tokenize(clip_tok, ["<reward 1>, a red circle", "a blue ring"])
    out = text.apply({"params": text_params}, ids, mask)
    assert out["last_hidden_state"].shape == (2, clip_tok.model_max_length, 32)
    _, pooled = clip.apply({"params": params}, ids, mask, method=lambda m, i, a: m.text_model(
        i, a))
    np.testing.assert_allclose(out["pooler_output"], pooled, rtol=1e-5, atol=1e-5)


def test_clip_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="patch_size"):
        clip_train.ClipTrainConfig(patch_size=5)
    with pytest.raises(ValueError, match="steps"):
        clip_train.ClipTrainConfig(steps=0)


# --- reward heads ----------------------------------------------------------------------------

def test_rank_metrics_on_constructed_cases():
    np.testing.assert_allclose(heads_train.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])),
                               [2.5, 0.0, 2.5, 1.0])
    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert heads_train.spearman(x, x ** 3) == pytest.approx(1.0)
    assert heads_train.spearman(x, -x) == pytest.approx(-1.0)
    assert heads_train.r_squared(x, x) == pytest.approx(1.0)
    assert heads_train.r_squared(np.full(4, x.mean()), x) == pytest.approx(0.0)
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [2.0, 1.0]])
    labels = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # last: tie, skipped
    assert heads_train.pairwise_accuracy(scores, labels) == pytest.approx(1.5 / 3)


def test_bradley_terry_loss_values():
    scores = jnp.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    labels = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    per = [np.log(2), np.log1p(np.exp(2.0)),
           -0.5 * (np.log(1 / (1 + np.exp(2.0))) + np.log(1 / (1 + np.exp(-2.0))))]
    assert float(heads_train.bradley_terry_loss(scores, labels)) == pytest.approx(
        np.mean(per), rel=1e-5)


def test_preference_pairs_share_a_prompt_and_carry_labels(clip_tok):
    pairs = heads_train.preference_pairs(np.random.default_rng(0), 16, clip_tok, p_match=1.0)
    assert pairs["images"].shape == (16, 2, render.IMAGE_SIZE, render.IMAGE_SIZE, 3)
    assert pairs["ids"].shape == (16, clip_tok.model_max_length)
    assert pairs["labels"].shape == (16, 2)
    # p_match=1: every image has the prompted shape and colour (+1 each, never -3).
    assert np.all(pairs["labels"] > 0.0)


def test_heads_train_and_form_a_reward_set(heads, clip_tok):
    rewards, params, m = heads
    assert rewards.names == ("aesthetics", "human_preference", "alignment", "sentiment")
    assert set(rewards.backbones) == {"toy_clip", "toy_pickscore"}
    assert m["aesthetic_eval_mse"] < m["aesthetic_initial_eval_mse"]
    assert m["aesthetic_eval_r2"] > 0.0  # better than predicting the mean
    assert m["sentiment_train_loss"] < m["sentiment_first_loss"]
    for k in ("sentiment_eval_accuracy", "preference_eval_accuracy",
              "preference_initial_accuracy"):
        assert 0.0 <= m[k] <= 1.0
    assert params["sentiment"]["weight"].shape == (3, 16)
    rng = np.random.default_rng(5)
    scenes = world.sample_scenes(rng, 6)
    images = render.render(scenes, rng)
    prompts = captions.user_prompts(scenes, rng)
    conditions = ["<reward 1>, " + e for e in captions.engineer(prompts, rng)]
    values = np.asarray(rewards(rewards.inputs(images, prompts, conditions)))
    assert values.shape == (6, 4) and np.all(np.isfinite(values))
    assert np.all(np.abs(values[:, 2]) <= 1.0 + 1e-5)  # alignment is a cosine
    assert np.all((values[:, 3] >= 0) & (values[:, 3] <= 1))  # sentiment is P(positive)
    # The aesthetics column is the trained stack on the toy CLIP's embedding.
    clip_features = rewards.backbones["toy_clip"].encode_images(
        rewards.params["backbones"]["toy_clip"], jnp.asarray(images))
    from parrot_jax.rewards.aesthetic import aesthetic_mlp
    np.testing.assert_allclose(values[:, 0], aesthetic_mlp(params["aesthetic"], clip_features),
                               rtol=1e-4, atol=1e-4)


def test_build_reward_set_checks_probe_shapes(trained_clip, clip_tok, heads):
    clip, clip_params, _ = trained_clip
    _, params, _ = heads
    bad = {"weight": jnp.zeros((3, 7)), "bias": jnp.zeros((3,))}
    with pytest.raises(ValueError, match="probe shapes"):
        heads_train.build_reward_set(clip, clip_params, clip_tok, aesthetic=params["aesthetic"],
                                     sentiment=bad, pickscore_params=params["pickscore"])


# --- PEN -------------------------------------------------------------------------------------

def test_expansion_ok_on_constructed_cases():
    ok = pen_train.expansion_ok
    assert ok("a red circle", "a red circle, large, soft edges")
    assert not ok("a red circle", "a red circle, large")  # one modifier
    assert not ok("a red circle", "a blue circle, large, soft edges")  # changed the colour
    assert not ok("a red circle on a navy background",
                  "a red circle, large, soft edges, on a white background")
    assert ok("a red circle on a navy background",
              "a red circle on a navy background, pastel, centered")


def test_train_pen_learns_the_engineer(pen_tok):
    module, params, m = pen_train.train_pen(TINY_PEN, pen_tok, seed=0)
    assert m["eval_loss"] < 0.85 * m["initial_eval_loss"]
    assert m["train_loss"] < m["first_loss"]
    assert 0.0 <= m["expansion_ok"] <= 1.0
    assert module.config.d_model == 32
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_train_pen_rejects_batches_not_split_over_devices(pen_tok):
    bad = pen_train.PenTrainConfig(batch_size=12, steps=1)
    with pytest.raises(ValueError, match="batch_size=12"):
        pen_train.train_pen(bad, pen_tok, seed=0)

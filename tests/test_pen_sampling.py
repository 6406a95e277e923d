"""PEN sampling: greedy against transformers' ``generate``, recorded log-probs against
teacher-forced scoring, the top-k / top-p filters against brute force, one compilation, and the
instruction template with an offline tokenizer.

The model is a tiny random T5 written with ``save_pretrained`` and read with ``hub.load_t5``.
"""


import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_FLAN_T5, TINY_T5, tiny_t5_torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from parrot_jax import hub
from parrot_jax.expansion import (
    DEFAULT_TEMPLATE,
    InstructionTemplate,
    SamplingConfig,
    decode,
    filter_logits,
    sample,
    token_log_probs,
    tokenize,
    tokenize_prompts,
)
from parrot_jax.expansion.scoring import shift_right

N = 33  # generated positions: > relative_attention_max_distance of the tiny configs
# name -> (transformers config, ff_scale, seed); the seeds make some rows (not all) stop early.
CASES = {"t5": (TINY_T5, 4.0, 0), "flan": (TINY_FLAN_T5, 1.0, 5)}
FILTERED = SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=30, top_p=0.8)
UNFILTERED = SamplingConfig(max_new_tokens=N)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """name -> (torch model, our module, params) for both tiny layouts."""
    out = {}
    for name, (config, scale, seed) in CASES.items():
        model = tiny_t5_torch(config, seed=seed, ff_scale=scale)
        folder = tmp_path_factory.mktemp(f"pen_{name}")
        model.save_pretrained(folder)
        out[name] = (model, *hub.load_t5(folder))
    return out


def _inputs(seed: int = 1, batch: int = 3, length: int = 45):
    """Encoder ids / mask ``[batch, length]``: a full, a right-padded and a left-padded row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 100, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:2, 30:] = 0
    mask[2:3, :5] = 0
    return ids, mask


@pytest.fixture(scope="module")
def scorer():
    return jax.jit(token_log_probs, static_argnums=0)


def _check_eos_and_padding(out, eos: int, pad: int):
    """The mask is a prefix ending at EOS (or at N); after it, pad tokens with log-prob 0."""
    tokens, lp, mask = (np.asarray(a) for a in (out.tokens, out.log_probs, out.mask))
    for row, row_lp, row_mask in zip(tokens, lp, mask):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()
        assert eos not in row[:n - 1]
        assert row[n - 1] == eos or n == len(row)
        assert (row[n:] == pad).all() and (row_lp[n:] == 0).all() and (row_lp[:n] < 0).all()


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_transformers_generate(loaded, scorer, name):
    model, module, params = loaded[name]
    ids, mask = _inputs()
    out = sample(module, params, ids, mask, jax.random.key(0),
                 SamplingConfig(max_new_tokens=N, greedy=True))
    tokens = np.asarray(out.tokens)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())  # see test_t5 for why explicit
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                             attention_mask=torch.from_numpy(mask.astype(np.int64)),
                             max_new_tokens=N, do_sample=False, num_beams=1, cache=cache).numpy()
    ref = np.pad(ref[:, 1:], ((0, 0), (0, N + 1 - ref.shape[1])))  # drop start, pad finished
    np.testing.assert_array_equal(tokens, ref)
    assert len(np.unique(tokens)) > 3
    eos, pad = module.config.eos_token_id, module.config.pad_token_id
    _check_eos_and_padding(out, eos, pad)
    lengths = np.asarray(out.mask).sum(1)
    assert lengths.min() < N, "test set-up: some row should stop early"
    scores = np.asarray(scorer(module, params, ids, mask, out.tokens, out.mask))
    np.testing.assert_allclose(np.asarray(out.log_probs), scores, atol=1e-5, rtol=0)
    assert not np.asarray(out.sample_log_probs).any()


@pytest.mark.parametrize("config", [UNFILTERED, FILTERED], ids=["unfiltered", "filtered"])
def test_sampled_log_probs_equal_teacher_forced(loaded, scorer, config):
    """``log_probs`` are the model's (temperature 1, unfiltered) log-probs of the sampled tokens
    in both settings: per token within 1e-5 of ``token_log_probs`` (test_pen_reinforce checks
    the sums against ``sequence_log_prob``). ``sample_log_probs`` are the log-probs under the
    distribution sampled from: the model's when unfiltered; when filtered, a numpy temperature /
    top-k / top-p of the teacher-forced logits, and every sampled token lies in that nucleus."""
    _, module, params = loaded["t5"]
    ids, mask = _inputs(seed=2, batch=4)
    out = sample(module, params, ids, mask, jax.random.key(7), config)
    _check_eos_and_padding(out, module.config.eos_token_id, module.config.pad_token_id)
    tokens, lp, valid = (np.asarray(a) for a in (out.tokens, out.log_probs, out.mask))
    assert valid.sum(1).min() > 3
    scores = np.asarray(scorer(module, params, ids, mask, tokens, valid))
    np.testing.assert_allclose(lp, scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(lp.sum(1), scores.sum(1), rtol=1e-6, atol=1e-5)
    slp = np.asarray(out.sample_log_probs)
    if not config.filtered:
        np.testing.assert_allclose(slp, lp, atol=1e-6, rtol=0)
        return
    logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask,
                                              shift_right(tokens, module.config.start_token)))
    ref = _numpy_filtered_log_probs(logits.reshape(-1, logits.shape[-1]), config)
    ref = ref.reshape(logits.shape)
    at_token = np.take_along_axis(ref, tokens[..., None], axis=-1)[..., 0]
    assert np.isfinite(at_token[valid]).all()  # every sampled token was inside the filter
    np.testing.assert_allclose(slp[valid], at_token[valid], atol=1e-5, rtol=0)
    assert (slp[valid] > lp[valid]).mean() > 0.9  # a truncated, sharpened distribution


def test_sampling_is_keyed(loaded):
    _, module, params = loaded["t5"]
    ids, mask = _inputs(seed=2, batch=4)
    a, b, c = (sample(module, params, ids, mask, jax.random.key(k), UNFILTERED).tokens
               for k in (3, 3, 4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()


def test_top_k_one_is_greedy(loaded):
    _, module, params = loaded["flan"]
    ids, mask = _inputs()
    greedy = sample(module, params, ids, mask, jax.random.key(0),
                    SamplingConfig(max_new_tokens=N, greedy=True))
    top1 = sample(module, params, ids, mask, jax.random.key(5),
                  SamplingConfig(max_new_tokens=N, top_k=1, temperature=1.7))
    np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
    np.testing.assert_allclose(np.asarray(top1.log_probs), np.asarray(greedy.log_probs),
                               atol=1e-6)
    assert np.asarray(top1.sample_log_probs).max() == 0  # a one-token distribution


def _numpy_filtered_log_probs(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """Brute force, row by row: temperature, keep the top-k values (ties kept), then grow the
    nucleus from the most likely token until its mass reaches top_p (ties of the last kept
    probability kept), renormalise; -inf outside."""
    out = np.full(logits.shape, -np.inf)
    for r, row in enumerate(logits.astype(np.float64) / config.temperature):
        keep = np.ones(row.shape, bool)
        if config.top_k:
            keep &= row >= np.sort(row)[::-1][config.top_k - 1]
        p = np.where(keep, np.exp(row - row.max()), 0)
        p /= p.sum()
        if config.top_p < 1:
            mass, last = 0.0, None
            for i in np.argsort(-p, kind="stable"):
                if mass >= config.top_p:
                    break
                mass, last = mass + p[i], p[i]
            keep &= p >= last
        z = np.log(np.exp(row[keep] - row[keep].max()).sum()) + row[keep].max()
        out[r, keep] = row[keep] - z
    return out


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 0.5, 1.0), (0, 0.9, 0.6), (5, 1.0, 1.0),
                                                     (7, 0.7, 1.3), (0, 1e-4, 1.0)])
def test_filters_against_brute_force(top_k, top_p, temperature):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32) * 2
    logits[1] = logits[1] * 0.25 - 2
    logits[1, :10] = 3.0  # ten tied top tokens, ~99% of the mass: whatever is cut, all stay
    logits[2] = 0.0  # uniform: every token ties with the most likely one, so all stay
    logits[3, 7] = 30.0  # one dominant token
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = np.asarray(jax.jit(filter_logits, static_argnums=1)(logits, config))
    ours = np.asarray(jax.nn.log_softmax(ours, axis=-1))
    ref = _numpy_filtered_log_probs(logits, config)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)], atol=1e-5)
    kept = np.isfinite(ref).sum(1)
    assert kept[1] == 10 and kept[2] == 50
    assert kept[[0, 4, 5]].max() < 50  # the settings do filter the untied rows
    if top_p < 1:
        assert kept[3] == 1
    if top_k:
        assert (kept[[0, 4, 5]] <= top_k).all()
    if top_p == 1e-4:
        assert (kept[[0, 3, 4, 5]] == 1).all()
    # transformers' warpers, in generate's order, agree on the rows without ties (its top-p cuts
    # a tie by sort position, ours keeps the whole tie).
    from transformers.generation import logits_process as lp

    scores = torch.from_numpy(logits[[0, 3, 4, 5]])
    for warper in [lp.TemperatureLogitsWarper(temperature),
                   lp.TopKLogitsWarper(top_k) if top_k else None,
                   lp.TopPLogitsWarper(top_p) if top_p < 1 else None]:
        scores = scores if warper is None else warper(None, scores)
    np.testing.assert_array_equal(np.isfinite(scores.numpy()), np.isfinite(ours[[0, 3, 4, 5]]))


def test_filters_on_a_t5_sized_vocabulary():
    """32128 logits with -inf entries (banned tokens) and large magnitudes: the bisected
    thresholds keep exactly the brute-force sets (no ties here: all values distinct)."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 32128)).astype(np.float32) * 3
    logits[0, :100] = -np.inf
    logits[1] *= 1000.0  # a few tokens hold all the mass
    logits[2] -= 5e3  # far from zero: thresholds must not lose precision
    for config in [SamplingConfig(top_k=50), SamplingConfig(top_p=0.9, temperature=1.5),
                   SamplingConfig(top_k=500, top_p=0.5)]:
        ours = np.asarray(jax.jit(filter_logits, static_argnums=1)(logits, config))
        ref = _numpy_filtered_log_probs(logits, config)
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
        assert 1 <= np.isfinite(ref).sum(1).min() and np.isfinite(ref).sum(1).max() < 32028


def test_sampled_frequencies_follow_filtered_distribution(loaded):
    """4000 first tokens of one prompt: their histogram matches the filtered distribution of the
    first step: total variation < 0.05, about 3x what 4000 draws from the right distribution
    give (the nucleus has ~10 tokens), while the raw model's distribution is far off."""
    _, module, params = loaded["t5"]
    ids, mask = _inputs(seed=3, batch=1, length=8)
    config = SamplingConfig(max_new_tokens=1, temperature=0.1, top_p=0.9)
    many = 4000
    out = sample(module, params, np.repeat(ids, many, 0), np.repeat(mask, many, 0),
                 jax.random.key(11), config)
    start = np.full((1, 1), module.config.start_token, np.int32)
    logits = np.asarray(module.apply({"params": params}, ids, mask, start))[0]
    probs = np.exp(_numpy_filtered_log_probs(logits, config))[0]
    freq = np.bincount(np.asarray(out.tokens)[:, 0], minlength=probs.size) / many
    assert (probs > 0).sum() > 3  # several tokens in the nucleus
    assert 0.5 * np.abs(freq - probs).sum() < 0.05
    assert freq[probs == 0].sum() == 0
    raw = np.exp(logits[0] - logits[0].max())
    assert 0.5 * np.abs(freq - raw / raw.sum()).sum() > 0.2  # the raw model is not what we saw


def test_compiles_once(loaded):
    """New inputs, keys and parameter values of the same shapes reuse one compilation."""
    _, module, params = loaded["t5"]
    before = sample._cache_size()
    ids, mask = _inputs(seed=0, batch=4)
    jax.block_until_ready(sample(module, params, ids, mask, jax.random.key(0), FILTERED))
    compiled = sample._cache_size()
    assert compiled <= before + 1  # an earlier test may have compiled this config and shape
    shifted = jax.tree_util.tree_map(lambda x: x + 0.01, params)
    for seed, p in [(1, params), (2, params), (3, shifted)]:
        ids, mask = _inputs(seed=seed, batch=4)
        jax.block_until_ready(sample(module, p, ids, mask, jax.random.key(seed), FILTERED))
    assert sample._cache_size() == compiled >= 1


def test_sampling_config_errors():
    with pytest.raises(ValueError, match="temperature=0"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match=r"top_p=1.5.*top_k=-1|top_k=-1.*top_p=1.5"):
        SamplingConfig(top_p=1.5, top_k=-1)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        SamplingConfig(max_new_tokens=0)
    assert SamplingConfig().max_new_tokens == 77 and not SamplingConfig().filtered


# --- the instruction template and host tokenisation ------------------------------------------

PROMPTS = ["a red circle", "a small green triangle, soft focus", "vivid pastel shapes", "a cat"]
CORPUS = [DEFAULT_TEMPLATE.replace("{prompt}", p) for p in PROMPTS] + ["bright outlined star"]


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    """A word-level tokenizer in T5's conventions (``<pad>`` 0, ``</s>`` 1 appended, ``<unk>``),
    written offline as a ``PreTrainedTokenizerFast`` and loaded back with ``hub.load_tokenizer``.
    Words split on whitespace only, so decoding (tokens joined by spaces) returns the text
    exactly; the ids fit the tiny models' vocabulary of 100."""
    words = sorted({w for text in CORPUS for w in text.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                       special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("pen_tokenizer")
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    tokenizer = hub.load_tokenizer(folder)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert len(tokenizer) <= 100
    return tokenizer


def test_template():
    assert DEFAULT_TEMPLATE == ("Input: {prompt}. This is a text input for image generation. "
                                "Expand prompt for improving image quality. Output:")
    assert InstructionTemplate().format("  a red {circle} ") == DEFAULT_TEMPLATE.replace(
        "{prompt}", "a red {circle}")
    assert InstructionTemplate("Rephrase: {prompt}").format("a cat") == "Rephrase: a cat"
    for bad in ["no placeholder", "{prompt} and {prompt}"]:
        with pytest.raises(ValueError, match="exactly once"):
            InstructionTemplate(bad)
    with pytest.raises(ValueError, match="empty prompt"):
        InstructionTemplate().format("   ")


def test_tokenize_prompts(t5_tokenizer):
    prompts = ["a red circle", "a small green triangle, soft focus"]
    ids, mask = tokenize_prompts(t5_tokenizer, prompts, 48)
    assert ids.shape == mask.shape == (2, 48) and ids.dtype == mask.dtype == np.int32
    for row, row_mask, prompt in zip(ids, mask, prompts):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any() and (row[n:] == 0).all()
        assert row[n - 1] == 1  # </s>
        text = t5_tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
        assert text == InstructionTemplate().format(prompt)
    assert decode(t5_tokenizer, ids, mask) == decode(t5_tokenizer, ids)
    longest = int(mask.sum(1).max())
    with pytest.raises(ValueError, match=r"prompt 1 has \d+.*soft focus"):
        tokenize_prompts(t5_tokenizer, prompts, longest - 1)
    with pytest.raises(ValueError, match="prompt 1: empty prompt"):
        tokenize_prompts(t5_tokenizer, ["a cat", " "], 48)
    with pytest.raises(ValueError, match="expansion 0 is empty"):
        tokenize(t5_tokenizer, [""], 8, what="expansion")


def test_expansion_round_trip(loaded, scorer, t5_tokenizer):
    """Prompts -> template -> ids -> greedy expansion -> text; a tokenized target's scores are
    0 on padding whatever ids it holds there (here -100) and negative elsewhere, EOS included."""
    _, module, params = loaded["t5"]
    ids, mask = tokenize_prompts(t5_tokenizer, PROMPTS[:3], 45)  # the shapes of _inputs()
    out = sample(module, params, ids, mask, jax.random.key(0),
                 SamplingConfig(max_new_tokens=N, greedy=True))
    texts = decode(t5_tokenizer, out.tokens, out.mask)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    for text, row, row_mask in zip(texts, np.asarray(out.tokens), np.asarray(out.mask)):
        assert text == t5_tokenizer.decode(row[row_mask].tolist(), skip_special_tokens=True)
    targets, target_mask = tokenize(t5_tokenizer, ["bright outlined star", "a cat", "a"], N)
    per_token = np.asarray(scorer(module, params, ids, mask, targets, target_mask))
    assert (per_token[target_mask == 0] == 0).all() and (per_token[target_mask == 1] < 0).all()
    labels = np.where(target_mask == 1, targets, -100)
    np.testing.assert_array_equal(
        np.asarray(scorer(module, params, ids, mask, labels, target_mask)), per_token)

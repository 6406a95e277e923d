"""Reward identifiers: text formats, group assignment, and fitting to the text encoder's context
without cutting the identifiers (a CLIP-style BPE tokenizer built offline)."""

import jax
import numpy as np
import pytest
from test_tokenizer import CORPUS

from parrot_jax.data.tokenizer import train_clip_tokenizer
from parrot_jax.expansion.identifiers import (
    assign_identifiers,
    fit_to_context,
    inference_text,
    parse_identifiers,
    reward_identifier,
    tokenize_conditioning,
    training_text,
)

CONTEXT = 16


@pytest.fixture(scope="module")
def tokenizer():
    """CLIP-like: lower-cased BPE words with '</w>', bos / eos, padded with eos, 16 tokens."""
    corpus = CORPUS + [f"<reward {k}>, " for k in range(1, 5)] * 10
    return train_clip_tokenizer(corpus, 150, model_max_length=CONTEXT)


def test_text_formats():
    assert reward_identifier(0) == "<reward 1>"
    assert training_text(2, "a red circle, vivid") == "<reward 3>, a red circle, vivid"
    assert inference_text([0, 2], "a cat") == "<reward 1>, <reward 3>, a cat"
    assert inference_text([], "a cat") == "a cat"
    assert parse_identifiers("1, 3", 4) == [0, 2]
    assert parse_identifiers("all", 4) == [0, 1, 2, 3]
    for bad in ("0", "5", "1,x", "2,2"):
        with pytest.raises(ValueError, match="identifier"):
            parse_identifiers(bad, 4)
    with pytest.raises(ValueError, match="repeated"):
        inference_text([1, 1], "a cat")


def test_assignment():
    np.testing.assert_array_equal(assign_identifiers(6, 4), [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(assign_identifiers(6, 4, start=6), [2, 3, 0, 1, 2, 3])
    drawn = assign_identifiers(400, 4, "random", key=jax.random.key(0))
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(drawn, assign_identifiers(400, 4, "random",
                                                            key=jax.random.key(0)))
    with pytest.raises(ValueError, match="key"):
        assign_identifiers(4, 4, "random")
    with pytest.raises(ValueError, match="cycle"):
        assign_identifiers(4, 4, "round_robin")


def test_fit_keeps_identifiers_and_cuts_expansion_words(tokenizer):
    long = "a small green triangle on a dark background, soft focus, vivid pastel shapes"
    short = "a red circle"
    prefixes = ["<reward 1>, <reward 3>, ", "<reward 2>, "]
    texts = fit_to_context(tokenizer, prefixes, [long, short], CONTEXT)
    assert texts[1] == "<reward 2>, a red circle"  # fits: unchanged
    assert texts[0].startswith("<reward 1>, <reward 3>, ")
    kept = texts[0][len(prefixes[0]):]
    assert long.startswith(kept) and len(kept) < len(long)
    n_words = len(kept.split())
    # the longest word prefix that fits: one more word would not
    lengths = [len(tokenizer(prefixes[0] + " ".join(long.split()[:n])).input_ids)
               for n in (n_words, n_words + 1)]
    assert lengths[0] <= CONTEXT < lengths[1]

    enc = tokenize_conditioning(tokenizer, prefixes, [long, short], CONTEXT)
    assert enc["input_ids"].shape == (2, CONTEXT) and enc["input_ids"].dtype == np.int32
    reference = tokenizer(enc["texts"], padding="max_length", max_length=CONTEXT)
    np.testing.assert_array_equal(enc["input_ids"], reference["input_ids"])
    decoded = tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True)
    assert decoded.replace(" ", "").startswith("<reward1>,<reward3>,")


def test_prefix_that_cannot_fit_is_an_error(tokenizer):
    prefix = "".join(f"<reward {k}>, " for k in range(1, 5))
    with pytest.raises(ValueError, match="row 0: the identifiers"):
        fit_to_context(tokenizer, [prefix], ["a cat"], 8)

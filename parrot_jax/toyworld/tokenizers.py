"""The toy world's two tokenizers, built offline from its own vocabulary (nothing downloaded).

- ``clip_tokenizer``: CLIP's conventions on a word-level vocabulary (every word any toy prompt,
  caption or expansion can contain), plus the reward identifiers ``<reward 1>`` ...
  ``<reward K>`` as single tokens: the identifiers are plain text for the text tower, but one
  token each keeps them from eating the 16-token context and gives each its own embedding.
- ``pen_tokenizer``: a T5-style BPE tokenizer trained on what the PEN reads and writes (the
  instruction-templated user prompts and the prompt engineer's expansions).

Both are ``transformers.PreTrainedTokenizerFast``: ``save_pretrained`` writes a folder that
``parrot_jax.hub.load_tokenizer`` reads back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from parrot_jax.data.tokenizer import train_t5_tokenizer
from parrot_jax.expansion.identifiers import reward_identifier
from parrot_jax.expansion.template import InstructionTemplate
from parrot_jax.toyworld import captions, world

NUM_REWARDS = 4  # identifiers <reward 1> .. <reward 4>, one per reward column
CLIP_CONTEXT = 32  # tokens the toy text tower reads: the longest text (4 identifiers + an
#   engineered prompt) is 29 with start and end; 16 would cut most full captions


def identifiers(num_rewards: int = NUM_REWARDS) -> list[str]:
    """``["<reward 1>", ..., "<reward K>"]``."""
    return [reward_identifier(k) for k in range(num_rewards)]


def clip_tokenizer(context_length: int = CLIP_CONTEXT, num_rewards: int = NUM_REWARDS) -> Any:
    """Word-level CLIP-style tokenizer over ``captions.vocabulary()`` (``<|startoftext|>`` = 0,
    ``<|endoftext|>`` = 1 also pads, ``<|unk|>`` = 2, words sorted, so the ids never depend on
    sampling), with each reward identifier appended as one (non-special) token."""
    from tokenizers import AddedToken

    from parrot_jax.data.tokenizer import build_clip_tokenizer

    if context_length < 3:
        raise ValueError(f"context_length={context_length}: needs room for start, a word, end")
    tokenizer = build_clip_tokenizer(list(captions.vocabulary()), context_length)
    added = tokenizer.add_tokens([AddedToken(t, single_word=False, normalized=False)
                                  for t in identifiers(num_rewards)])
    if added != num_rewards:
        raise RuntimeError(f"added {added} of {num_rewards} reward identifiers to the vocabulary")
    return tokenizer


def pen_corpus(rng: np.random.Generator, n: int = 4000,
               template: InstructionTemplate | None = None) -> list[str]:
    """Texts the PEN tokenizer is trained on: ``n`` templated user prompts, their engineered
    expansions, and the whole vocabulary once (so every word's characters are covered)."""
    template = template or InstructionTemplate()
    scenes = world.sample_scenes(rng, n)
    prompts = captions.user_prompts(scenes, rng)
    expansions = captions.engineer(prompts, rng)
    return ([template.format(p) for p in prompts] + list(expansions)
            + [" ".join(captions.vocabulary())])


def pen_tokenizer(vocab_size: int = 512, seed: int = 0,
                  template: InstructionTemplate | None = None) -> Any:
    """T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; BPE pieces, at most
    ``vocab_size``) trained on ``pen_corpus`` drawn from ``seed``."""
    return train_t5_tokenizer(pen_corpus(np.random.default_rng(seed), template=template),
                              vocab_size)

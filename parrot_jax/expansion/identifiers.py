"""Reward-specific identifiers (docs/method.md): ``"<reward k>, "`` before the expanded prompt.

They are plain text through the frozen text encoder; only the UNet learns to respond to them. In
training each group gets one identifier (the reward its update maximises); at inference a chosen
subset is joined (``"<reward 1>, <reward 3>, " + expansion``) to steer the trade-off. The PEN never
sees them: they are added after expansion. Rewards are indexed from 0 in code (the reward matrix
column); the text is 1-based as in the paper (column 0, aesthetics, is ``<reward 1>``).

When identifiers plus expansion exceed the text encoder's context (77 tokens for CLIP), whole
words are cut from the end of the expansion; the identifiers are never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

ASSIGNMENTS = ("cycle", "random")


def reward_identifier(index: int) -> str:
    """``"<reward k>"`` for reward column ``index`` (0-based; the text is 1-based)."""
    if index < 0:
        raise ValueError(f"reward index must be >= 0, got {index}")
    return f"<reward {index + 1}>"


def identifier_prefix(indices: Sequence[int]) -> str:
    """``"<reward i>, <reward j>, "`` for the given 0-based columns ('' for none)."""
    return "".join(reward_identifier(int(i)) + ", " for i in indices)


def training_text(index: int, expanded: str) -> str:
    """The training conditioning text ``"<reward k>, " + expanded``."""
    return identifier_prefix([index]) + expanded


def inference_text(indices: Sequence[int], expanded: str) -> str:
    """The inference conditioning text: the chosen identifiers, comma-joined, then ``expanded``."""
    if len(set(indices)) != len(indices):
        raise ValueError(f"repeated reward identifiers: {list(indices)}")
    return identifier_prefix(indices) + expanded


def parse_identifiers(spec: str, num_rewards: int) -> list[int]:
    """``"1,3"`` (1-based, as on the command line) -> ``[0, 2]``; ``"all"`` -> every reward."""
    if spec.strip().lower() == "all":
        return list(range(num_rewards))
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit() or not 1 <= int(part) <= num_rewards:
            raise ValueError(f"identifier {part!r} in {spec!r}: expected integers 1..{num_rewards}"
                             " separated by commas, or 'all'")
        out.append(int(part) - 1)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated reward identifiers in {spec!r}")
    return out


def assign_identifiers(num_groups: int, num_rewards: int, mode: str = "cycle", *,
                       start: int = 0, key: jax.Array | None = None) -> np.ndarray:
    """int ``[G]``: each group's reward column.

    ``cycle``: ``(start + g) mod K``; pass ``start = iteration * G`` to keep cycling across
    iterations. ``random``: uniform, from ``key``.
    """
    if num_rewards <= 0 or num_groups <= 0:
        raise ValueError(f"need num_groups > 0 and num_rewards > 0, got {num_groups}, "
                         f"{num_rewards}")
    if mode == "cycle":
        return (start + np.arange(num_groups)) % num_rewards
    if mode == "random":
        if key is None:
            raise ValueError("assign_identifiers(mode='random') needs a PRNG key")
        return np.asarray(jax.random.randint(key, (num_groups,), 0, num_rewards))
    raise ValueError(f"identifier assignment {mode!r}; expected one of {ASSIGNMENTS}")


def _lengths(tokenizer: Any, texts: list[str]) -> np.ndarray:
    # verbose=False: over-long texts are the point here, not a mistake to warn about
    return np.array([len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]])


def fit_to_context(tokenizer: Any, prefixes: Sequence[str], expansions: Sequence[str],
                   max_length: int | None = None) -> list[str]:
    """``prefix + expansion`` for each row, cutting whole words from the end of the expansion
    until the tokenised text (special tokens included) fits ``max_length`` (default: the
    tokenizer's ``model_max_length``). The prefix (the identifiers) is never cut: a prefix that
    does not fit on its own is an error. Batched: about log2(words) tokenizer calls in all.
    """
    if len(prefixes) != len(expansions):
        raise ValueError(f"{len(prefixes)} prefixes for {len(expansions)} expansions")
    max_length = max_length or tokenizer.model_max_length
    bare = _lengths(tokenizer, list(prefixes))
    for i in np.flatnonzero(bare > max_length):
        raise ValueError(f"row {i}: the identifiers {prefixes[i]!r} alone take {bare[i]} tokens; "
                         f"the text encoder's context is {max_length}")
    words = [e.split() for e in expansions]
    lo = np.zeros(len(words), int)  # longest known fit (0 words always fits)
    hi = np.array([len(w) for w in words])  # upper bound on the fitting word count

    def text(i: int, n: int) -> str:
        return prefixes[i] + " ".join(words[i][:n]) if n < len(words[i]) else (
            prefixes[i] + expansions[i])

    while np.any(lo < hi):
        rows = np.flatnonzero(lo < hi)
        mid = (lo[rows] + hi[rows] + 1) // 2
        fits = _lengths(tokenizer, [text(i, n) for i, n in zip(rows, mid)]) <= max_length
        lo[rows] = np.where(fits, mid, lo[rows])
        hi[rows] = np.where(fits, hi[rows], mid - 1)
    return [text(i, int(n)) for i, n in enumerate(lo)]


def tokenize_conditioning(tokenizer: Any, prefixes: Sequence[str], expansions: Sequence[str],
                          max_length: int | None = None) -> dict[str, np.ndarray]:
    """``fit_to_context`` then the tokenizer, padded to the context: ``{'input_ids',
    'attention_mask'}`` int32 ``[B, L]``, plus the fitted ``texts`` (for logging)."""
    max_length = max_length or tokenizer.model_max_length
    texts = fit_to_context(tokenizer, prefixes, expansions, max_length)
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=False)
    return {"input_ids": np.asarray(enc["input_ids"], np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], np.int32), "texts": texts}

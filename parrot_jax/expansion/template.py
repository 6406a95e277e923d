"""The PEN's instruction template and batched host-side tokenisation to fixed shapes.

Parrot (§4.1, following Promptist's data) feeds the PEN ``Input: <prompt>. This is a text input
for image generation. Expand prompt for improving image quality. Output:``. Tokenisation pads
every batch to one fixed length so the jitted sampler and scorer compile once; a text that does
not fit is an error (truncating a prompt would silently change what the PEN is asked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

PLACEHOLDER = "{prompt}"
DEFAULT_TEMPLATE = ("Input: {prompt}. This is a text input for image generation. "
                    "Expand prompt for improving image quality. Output:")


@dataclasses.dataclass(frozen=True)
class InstructionTemplate:
    """A template with exactly one ``{prompt}`` placeholder (other braces are literal text)."""

    text: str = DEFAULT_TEMPLATE  # the instruction; '{prompt}' is replaced by the user prompt

    def __post_init__(self):
        count = self.text.count(PLACEHOLDER)
        if count != 1:
            raise ValueError(f"instruction template must contain {PLACEHOLDER!r} exactly once, "
                             f"found {count} in {self.text!r}")

    def format(self, prompt: str) -> str:
        """The PEN input for one user prompt (surrounding whitespace stripped; empty is an
        error)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        prompt = prompt.strip()
        if not prompt:
            raise ValueError("empty prompt")
        return self.text.replace(PLACEHOLDER, prompt)


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int, *,
             what: str = "text") -> tuple[np.ndarray, np.ndarray]:
    """Texts -> ``(ids int32 [B, max_length], mask int32 [B, max_length])``, right-padded.

    The tokenizer's own special tokens are added (T5: the trailing ``</s>``). Raises ValueError
    naming the row (and ``what``, e.g. 'prompt') when a text is empty or its token count exceeds
    ``max_length``; nothing is truncated.
    """
    texts = list(texts)
    if not texts:
        raise ValueError(f"no {what}s to tokenize")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} {i} is empty: {text!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token")
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    too_long = [(i, len(row)) for i, row in enumerate(ids) if len(row) > max_length]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"{len(too_long)} {what}(s) do not fit in {max_length} tokens; "
                         f"{what} {i} has {n}: {texts[i]!r}")
    out = np.full((len(ids), max_length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(ids), max_length), np.int32)
    for i, row in enumerate(ids):
        out[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return out, mask


def tokenize_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int,
                     template: InstructionTemplate = InstructionTemplate()
                     ) -> tuple[np.ndarray, np.ndarray]:
    """User prompts -> templated PEN inputs ``(ids [B, S], mask [B, S])``, ``S = max_length``."""
    formatted = []
    for i, prompt in enumerate(prompts):
        try:
            formatted.append(template.format(prompt))
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from e
    return tokenize(tokenizer, formatted, max_length, what="prompt")


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Each text's token count with the tokenizer's special tokens, as ``tokenize`` (and a
    ``padding='max_length'`` call without truncation) counts it: up-front checks of whole prompt
    files compare exactly what tokenisation would refuse later."""
    # verbose=False: over-long texts are what is being measured, not a mistake to warn about
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    return [len(row) for row in ids]


def prompt_token_counts(tokenizer: Any, prompts: Sequence[str],
                        template: InstructionTemplate = InstructionTemplate()) -> list[int]:
    """PEN tokens of each templated user prompt: what ``tokenize_prompts`` compares with its
    ``max_length`` (``config.data.max_prompt_length``)."""
    return token_counts(tokenizer, [template.format(p) for p in prompts])


def decode(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
    """Generated ids ``[B, N]`` (and their mask) -> texts, special tokens skipped."""
    tokens = np.asarray(tokens)
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        return [tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
                for row, m in zip(tokens, mask)]
    return tokenizer.batch_decode(tokens.tolist(), skip_special_tokens=True)

"""The RL prompts of a run (``config.data.prompts``) and the draw of each iteration's prompts,
and the up-front length check of every prompt list a run or a tool reads.

Every host reads the whole list; the draw of an iteration's prompts is a pure function of
(seed, position), so all hosts agree on the global batch without communicating, and a resumed
run repeats nothing and skips nothing.

Because the draw is a pure function of (seed, position), a prompt too long for the PEN would
stop the run at the same draw on every resume. So each prompt list is checked whole when it is
loaded (``check_prompt_lengths``), against the limits of where it is used: a ``PromptList``
remembers where each prompt comes from (``path:line``, a TFDS record, ``config.eval_prompts[i]``)
and the one ``DatasetError`` names the first prompt that does not fit and how many do not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from parrot_jax.data.promptist import DatasetError, read_prompt_lines
from parrot_jax.expansion.template import InstructionTemplate, prompt_token_counts, token_counts

# The built-in RL prompts (data.prompts = 'builtin'): short user prompts of the kind the PEN
# expands, varied enough that groups differ.
BUILTIN_PROMPTS = (
    "a red circle on a white background", "a blue square at night", "a small green triangle",
    "a yellow star in the sky", "an orange cat sitting on a sofa", "a dog running on the beach",
    "a castle on a hill", "a bowl of fruit on a table", "a portrait of an old man",
    "a city street in the rain", "a forest in autumn", "a lighthouse by the sea",
    "a cup of coffee", "a mountain lake at sunrise", "a red car on a bridge",
    "a bird on a branch", "a vase of flowers", "a snowy village", "a robot reading a book",
    "a sailing boat at sunset", "a field of sunflowers", "a teddy bear on a bed",
    "a house with a garden", "a horse in a meadow", "a bicycle against a wall",
    "an astronaut riding a horse", "a desert with cactus", "a waterfall in the jungle",
    "a plate of pasta", "a train in the mountains", "a penguin on the ice", "a purple balloon",
)
TFDS_PREFIX = "tfds:"


class PromptList(list):
    """A list of prompts that also holds where each one comes from (``origins[i]``:
    ``path:line``, a TFDS record, ``config.eval_prompts[i]``), so that a check of the whole list
    names the prompt to fix. A plain ``list[str]`` everywhere else (read it, do not grow it)."""

    def __init__(self, texts: Iterable[str], origins: Iterable[str]):
        super().__init__(texts)
        self.origins = tuple(origins)
        if len(self.origins) != len(self):
            raise ValueError(f"{len(self)} prompts with {len(self.origins)} origins")


def read_prompt_list(path: str | os.PathLike) -> PromptList:
    """A prompt file (``read_prompts``' layout) with ``path:line`` origins, the file's real line
    numbers."""
    lines = read_prompt_lines(path)
    return PromptList((p for _, p in lines), (f"{path}:{n}" for n, _ in lines))


def config_prompt_list(values: Sequence[str], field: str) -> PromptList:
    """Prompts given in the config itself (e.g. ``eval_prompts``): origins ``config.<field>[i]``."""
    return PromptList(values, (f"config.{field}[{i}]" for i in range(len(values))))


def tfds_prompts(spec: str) -> PromptList:
    """``'tfds:<data_dir>[:<split>]'`` (split ``train`` by default): the distinct user prompts
    of a prepared ``promptist_pairs`` TFDS dataset (the PEN SFT data), in record order; each
    one's origin names its first record (and the source line it was built from)."""
    from parrot_jax.data.pipeline import as_pair
    from parrot_jax.data.tfds_promptist import data_source

    data_dir, _, split = spec[len(TFDS_PREFIX):].rpartition(":")
    if not data_dir:  # no split given
        data_dir, split = spec[len(TFDS_PREFIX):], "train"
    source = data_source(data_dir, split)
    first: dict[str, str] = {}  # prompt -> origin of its first record, in record order
    for i in range(len(source)):
        pair = as_pair(source[i])
        if pair.prompt not in first:
            origin = f"{spec} record {i}"
            first[pair.prompt] = origin if pair.source in ("", "?") else (
                f"{origin} (from {pair.source})")
    if not first:
        raise DatasetError(f"config.data.prompts={spec!r}: the split holds no prompts")
    return PromptList(first, first.values())


def load_prompts(source: str) -> PromptList:
    """``config.data.prompts``: 'builtin', a text file with one prompt per line, or a prepared
    TFDS dataset ``'tfds:<data_dir>[:<split>]'`` (``tfds_prompts``). Each prompt's origin:
    ``path:line`` for a file, ``<spec> record <i>`` for a TFDS split, ``BUILTIN_PROMPTS[i]``."""
    if source == "builtin":
        return PromptList(BUILTIN_PROMPTS, (f"BUILTIN_PROMPTS[{i}]"
                                            for i in range(len(BUILTIN_PROMPTS))))
    if source.startswith(TFDS_PREFIX):
        return tfds_prompts(source)
    if not Path(source).is_file():
        raise FileNotFoundError(f"config.data.prompts={source!r}: no such file (or 'builtin')")
    return read_prompt_list(source)


# --- token limits ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenLimit:
    """One token budget every prompt of a list must fit: how a prompt's tokens are counted
    (``count``: texts -> counts), what they are and the limit, by the name to change."""

    what: str  # e.g. 'PEN tokens (templated)'
    limit: int
    name: str  # e.g. 'config.data.max_prompt_length=128'
    count: Callable[[Sequence[str]], Sequence[int]]


def pen_limit(tokenizer: Any, max_prompt_length: int,
              template: InstructionTemplate | None = None) -> TokenLimit:
    """The PEN's input: the instruction-templated prompt (``template``, default the run's
    ``InstructionTemplate()``) in ``max_prompt_length`` tokens (``tokenize_prompts`` refuses
    longer ones; nothing is truncated)."""
    template = template if template is not None else InstructionTemplate()
    return TokenLimit("PEN tokens (templated)", max_prompt_length,
                      f"config.data.max_prompt_length={max_prompt_length}",
                      lambda texts: prompt_token_counts(tokenizer, texts, template))


def clip_limit(tokenizer: Any, context_length: int) -> TokenLimit:
    """The prompt itself through the T2I text encoder (inference's original-prompt branch,
    ``Policy.clip_ids``): its context, which refuses longer texts rather than cut them. (The
    identified expansion is fitted to the context by design, so it sets no limit here.)"""
    return TokenLimit("CLIP tokens", context_length,
                      f"the text encoder's context length {context_length}",
                      lambda texts: token_counts(tokenizer, texts))


def inference_limits(models: Any, max_prompt_length: int, *,
                     expand: bool = True) -> list[TokenLimit]:
    """The limits a prompt sampled as the paper infers must fit (``Policy.condition``): the
    text encoder's context for the prompt itself (always tokenised, even with ``w1 = 0``) and,
    when the PEN expands it, ``max_prompt_length``. ``models``: a ``ParrotModels`` (its
    tokenizers and context length)."""
    limits = [pen_limit(models.pen_tokenizer, max_prompt_length)] if expand else []
    return limits + [clip_limit(models.clip_tokenizer, models.context_length)]


def check_prompt_lengths(prompts: PromptList, limits: Sequence[TokenLimit], *,
                         chunk: int = 1024) -> None:
    """Count every prompt's tokens under each limit, all at once, and raise one one-line
    ``DatasetError`` naming the first prompt over a limit (its origin, its count and the limit)
    and how many prompts are over one, instead of failing at the draw or evaluation that first
    meets it. Nothing is truncated or dropped."""
    over: dict[int, list[str]] = {}
    for limit in limits:
        for start in range(0, len(prompts), chunk):
            counts = limit.count(prompts[start:start + chunk])
            for offset, n in enumerate(counts):
                if n > limit.limit:
                    over.setdefault(start + offset, []).append(
                        f"{n} {limit.what}, more than {limit.name}")
    if over:
        first, total = min(over), len(prompts)
        share = f"{len(over)} of {total} prompts too long; " if total > 1 else ""
        raise DatasetError(f"{prompts.origins[first]}: {'; '.join(over[first])} ({share}"
                           "nothing is truncated)")


def draw_prompts(prompts: Sequence[str], seed: int, position: int,
                 count: int) -> np.ndarray:
    """int ``[count]``: the prompt indices of draw number ``position`` (a pure function of the
    seed and the position, so resuming at a position repeats nothing and skips nothing)."""
    rng = np.random.default_rng([seed, position])
    return rng.choice(len(prompts), count, replace=len(prompts) < count)

"""grain pipelines that turn (prompt, expansion) records into fixed-shape SFT batches.

A source is anything with ``len`` and integer indexing whose items are ``PromptPair``s or dicts
with ``prompt`` / ``expansion`` / ``source`` (str or bytes: what ``tfds.data_source`` returns).
The training dataset is a ``grain.MapDataset``: ``dataset[step]`` is the batch of that step (the
shuffle is reseeded each epoch), so resuming at a step needs no iterator state.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from parrot_jax.data.promptist import DatasetError, PromptPair
from parrot_jax.expansion.template import InstructionTemplate, tokenize, tokenize_prompts

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "target_mask")


def _str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_pair(record: Any) -> PromptPair:
    """A source item (``PromptPair`` or a dict of str / bytes) -> ``PromptPair``."""
    if isinstance(record, PromptPair):
        return record
    return PromptPair(_str(record["prompt"]), _str(record["expansion"]),
                      _str(record.get("source", "?")))


class PairEncoder:
    """Tokenises one record to ``input_ids / attention_mask [S]``, ``targets / target_mask [T]``
    (int32, right-padded; the targets end in the tokenizer's EOS). Errors name the record's
    source."""

    def __init__(self, tokenizer: Any, max_input_length: int, max_target_length: int,
                 template: InstructionTemplate | None = None):
        self.tokenizer = tokenizer
        self.max_input_length = max_input_length
        self.max_target_length = max_target_length
        self.template = template if template is not None else InstructionTemplate()

    def __call__(self, record: Any) -> dict[str, np.ndarray]:
        pair = as_pair(record)
        try:
            ids, mask = tokenize_prompts(self.tokenizer, [pair.prompt], self.max_input_length,
                                         self.template)
            targets, target_mask = tokenize(self.tokenizer, [pair.expansion],
                                            self.max_target_length, what="expansion")
        except ValueError as e:
            raise DatasetError(f"{pair.source}: {e}") from e
        return {"input_ids": ids[0], "attention_mask": mask[0], "targets": targets[0],
                "target_mask": target_mask[0]}

    def check_lengths(self, source: Sequence[Any], chunk: int = 1024) -> None:
        """Tokenise every record once, up front, and raise one ``DatasetError`` listing how many
        prompts / expansions do not fit (and the first few sources), instead of failing at a
        later step. Nothing is truncated or dropped."""
        bad: list[str] = []
        count = 0
        for start in range(0, len(source), chunk):
            pairs = [as_pair(source[i]) for i in range(start, min(start + chunk, len(source)))]
            inputs = self.tokenizer([self.template.format(p.prompt) for p in pairs])["input_ids"]
            targets = self.tokenizer([p.expansion for p in pairs])["input_ids"]
            for pair, x, y in zip(pairs, inputs, targets):
                if len(x) > self.max_input_length or len(y) > self.max_target_length:
                    count += 1
                    if len(bad) < 3:
                        bad.append(f"{pair.source} (prompt {len(x)}, expansion {len(y)} tokens)")
        if count:
            raise DatasetError(
                f"{count} of {len(source)} records do not fit max_input_length="
                f"{self.max_input_length} / max_target_length={self.max_target_length} tokens "
                f"(nothing is truncated); first: {'; '.join(bad)}")


def _local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} must be a positive multiple of the "
                         f"{process_count} processes")
    return batch_size // process_count


def train_dataset(source: Sequence[Any], encoder: PairEncoder, batch_size: int, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Endless shuffled batches of this process's rows: ``ds[step]`` -> dict of int32
    ``[batch_size // process_count, ...]`` arrays.

    ``batch_size`` is global. Every process shuffles the same way (``seed``) and takes every
    ``process_count``-th record of the shuffled stream, so at each step the processes together
    hold exactly the records one process would hold alone, and each tokenises only its own.
    """
    if len(source) == 0:
        raise DatasetError("the training set is empty")
    local = _local_batch_size(batch_size, process_count)
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    return stream[process_index::process_count].map(encoder).batch(local, drop_remainder=True)


def eval_batches(source: Sequence[Any], encoder: PairEncoder, batch_size: int, *,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every record once, in order, in global batches of ``batch_size``: this process's rows
    (``[batch_size // process_count, ...]``). Rows past the end have all-zero masks, so summed
    losses and token counts are exact, and every process yields the same number of batches."""
    if len(source) == 0:
        raise DatasetError("the held-out set is empty")
    local = _local_batch_size(batch_size, process_count)
    mine = grain.MapDataset.source(source)[process_index::process_count].map(encoder)
    lengths = {"input_ids": encoder.max_input_length, "attention_mask": encoder.max_input_length,
               "targets": encoder.max_target_length, "target_mask": encoder.max_target_length}
    for b in range(-(-len(source) // batch_size)):
        batch = {k: np.zeros((local, n), np.int32) for k, n in lengths.items()}
        for row, i in enumerate(range(b * local, min((b + 1) * local, len(mine)))):
            for k, v in mine[i].items():
                batch[k][row] = v
        yield batch

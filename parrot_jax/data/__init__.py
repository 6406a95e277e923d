"""Prompt sources: Promptist-format pair files, RL prompt lists, a TFDS builder (ArrayRecord)
and grain pipelines to fixed-shape SFT batches.

``tfds_promptist`` needs the ``data`` extra (tensorflow-datasets, array-record) and is imported
on its own: ``from parrot_jax.data import tfds_promptist``.
"""

from parrot_jax.data.promptist import (
    DatasetError,
    PromptPair,
    read_jsonl,
    read_pairs,
    read_prompts,
    read_rephrase,
    read_tsv,
)
from parrot_jax.data.synthetic import synthetic_pairs

__all__ = [
    "DatasetError", "PromptPair", "read_jsonl", "read_pairs", "read_prompts", "read_rephrase",
    "read_tsv", "synthetic_pairs",
]

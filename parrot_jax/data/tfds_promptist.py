"""A TFDS builder for Promptist-format pairs placed by hand, written as ArrayRecord (no TensorFlow).

The user puts the pair files in a manual directory, one file per split::

    <manual_dir>/train.jsonl        (or train.tsv / train.rephrase.txt)   required
    <manual_dir>/validation.jsonl   (or .tsv / .rephrase.txt)             optional
    <manual_dir>/test.jsonl         (or .tsv / .rephrase.txt)             optional

Layouts as in ``parrot_jax.data.promptist`` (JSON Lines with ``prompt`` / ``expansion`` fields,
``prompt<TAB>expansion``, or Promptist's ``<prompt> Rephrase: <expansion>`` lines). Records keep
their file order (``DatasetInfo.disable_shuffling``) and carry ``source`` = ``file:line``. Read
back with ``data_source`` (``tfds.data_source``: random access, what grain wants).
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from parrot_jax.data.promptist import DatasetError, read_pairs

NAME = "promptist_pairs"
SPLITS = ("train", "validation", "test")
_SUFFIXES = {".jsonl": "jsonl", ".tsv": "tsv", ".rephrase.txt": "rephrase"}
INSTRUCTIONS = (
    "Place Promptist-format (prompt -> expansion) pair files in the manual directory, one per "
    "split: train.jsonl, train.tsv or train.rephrase.txt (required), and optionally "
    "validation.* and test.* in the same layouts. JSONL: one object per line with 'prompt' and "
    "'expansion' strings; TSV: 'prompt<TAB>expansion' per line; rephrase: "
    "'<prompt> Rephrase: <expansion>' per line (Promptist's SFT text layout)."
)


def split_files(manual_dir: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """``{split: (file, format)}`` found in ``manual_dir``; raises naming what is missing."""
    manual_dir = Path(manual_dir)
    if not manual_dir.is_dir():
        raise DatasetError(f"manual directory {manual_dir} does not exist. {INSTRUCTIONS}")
    found = {}
    for split in SPLITS:
        files = [(manual_dir / f"{split}{suffix}", kind) for suffix, kind in _SUFFIXES.items()
                 if (manual_dir / f"{split}{suffix}").is_file()]
        if len(files) > 1:
            raise DatasetError(f"{manual_dir}: several files for split {split!r}: "
                               + ", ".join(p.name for p, _ in files) + " (keep one)")
        if files:
            found[split] = files[0]
    if "train" not in found:
        raise DatasetError(f"{manual_dir}: no train file (train.jsonl, train.tsv or "
                           f"train.rephrase.txt). {INSTRUCTIONS}")
    return found


class PromptistPairs(tfds.core.GeneratorBasedBuilder):
    """(prompt, expansion, source) text triples from the files in the manual directory."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Prompt / expansion / source text features."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: dataset_info_from_configs wants metadata files beside the class.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Promptist-format prompt expansion pairs supplied by the user.",
            features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(),
                "expansion": tfds.features.Text(),
                "source": tfds.features.Text(),
            }),
            supervised_keys=("prompt", "expansion"),
            disable_shuffling=True,  # keep file order: records line up with their source lines
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {split: self._generate_examples(path, kind)
                for split, (path, kind) in split_files(dl_manager.manual_dir).items()}

    def _generate_examples(self, path: Path, kind: str):
        for i, pair in enumerate(read_pairs(path, format=kind)):
            yield i, pair._asdict()


def build(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> PromptistPairs:
    """Prepare ``promptist_pairs`` from ``manual_dir`` into ``data_dir`` as ArrayRecord files.

    Checks the manual directory first (a clear error saying which files to put where), then runs
    ``download_and_prepare``; an already prepared version is reused.
    """
    split_files(manual_dir)
    builder = PromptistPairs(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder


def data_source(data_dir: str | os.PathLike, split: str):
    """Random-access source of a prepared split: ``len(src)``, ``src[i]`` -> dict of bytes."""
    builder = PromptistPairs(data_dir=os.fspath(data_dir), file_format="array_record")
    if not builder.is_prepared():
        raise DatasetError(f"{data_dir}: {NAME} is not prepared there; build it from the manual "
                           "directory first (parrot_jax.data.tfds_promptist.build)")
    if split not in builder.info.splits:
        raise DatasetError(f"{data_dir}: {NAME} has no split {split!r} (has "
                           f"{', '.join(sorted(builder.info.splits))})")
    return tfds.data_source(NAME, data_dir=os.fspath(data_dir), split=split, download=False,
                            builder_kwargs={"file_format": "array_record"}, try_gcs=False)

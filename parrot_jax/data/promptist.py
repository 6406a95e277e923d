"""Readers for Promptist-format (prompt -> expansion) pairs and for RL prompt lists.

What we verified of Promptist's public release (``microsoft/LMOps``, folder ``promptist/``):

* The RL prompts are plain UTF-8 text, one prompt per line, each line stripped of surrounding
  whitespace: ``diff_prompter/ppo_prompter.py`` reads ``<data>/filtered_mix_train.txt`` (train)
  and ``<data>/<eval_data_name>.txt`` (default ``sentence_mix_valid.txt``) this way.
  ``read_prompts`` reads that layout.
* The SFT model is a causal LM that reads ``<plain prompt> Rephrase:`` and continues with the
  engineered prompt (the README's inference code appends ``" Rephrase:"`` to the stripped input
  and removes it from the output). ``read_rephrase`` reads training lines in that layout,
  ``<plain prompt> Rephrase: <engineered prompt>``, one pair per line.
* The SFT / RL data themselves are released as one archive on Google Drive; the file names and
  columns inside it are not published in the repository, so for pairs we also read the two plain
  layouts users convert to: JSON Lines (one object per line with a prompt and an expansion field,
  names configurable) and TSV (``prompt<TAB>expansion``; an optional first line
  ``prompt<TAB>expansion`` is a header).

Strictness: every line must parse; a malformed line raises ``DatasetError`` naming the file and
the 1-based line number and nothing is dropped. Blank lines are malformed (a final newline is
not a line). An empty file is an error. Each pair remembers where it came from (``path:line``) so
later errors (e.g. an expansion too long for the PEN) can name it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

PAIR_FORMATS = ("jsonl", "tsv", "rephrase")
REPHRASE_MARKER = " Rephrase:"
_EXTENSIONS = {".jsonl": "jsonl", ".tsv": "tsv"}


class DatasetError(ValueError):
    """A dataset file is missing, empty or malformed; the message names the file (and line)."""


class PromptPair(NamedTuple):
    """One SFT example: the user prompt, its engineered expansion, and ``path:line``."""

    prompt: str
    expansion: str
    source: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the line break) for every line of a UTF-8 file."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{number}: not UTF-8 ({e.reason})") from e
            yield number, text.rstrip("\r\n")


def _text(value: object, path: Path, number: int, what: str) -> str:
    """A non-empty stripped string, or a DatasetError naming the line and the field."""
    if not isinstance(value, str):
        raise DatasetError(f"{path}:{number}: {what} must be a string, got "
                           f"{type(value).__name__}")
    value = value.strip()
    if not value:
        raise DatasetError(f"{path}:{number}: empty {what}")
    return value


def _non_empty(items: list, path: Path, what: str) -> list:
    if not items:
        raise DatasetError(f"{path}: no {what} (the file is empty)")
    return items


def read_jsonl(path: str | os.PathLike, *, prompt_key: str = "prompt",
               expansion_key: str = "expansion") -> list[PromptPair]:
    """JSON Lines: one object per line holding ``prompt_key`` and ``expansion_key`` strings.

    Other keys (scores, ids) are allowed and not read.
    """
    path = Path(path)
    pairs = []
    for number, line in _lines(path):
        if not line.strip():
            raise DatasetError(f"{path}:{number}: blank line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") \
                from e
        if not isinstance(record, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got "
                               f"{type(record).__name__}")
        missing = [k for k in (prompt_key, expansion_key) if k not in record]
        if missing:
            raise DatasetError(f"{path}:{number}: missing key(s) {', '.join(map(repr, missing))} "
                               f"(has {', '.join(map(repr, sorted(record)))})")
        pairs.append(PromptPair(_text(record[prompt_key], path, number, repr(prompt_key)),
                                _text(record[expansion_key], path, number, repr(expansion_key)),
                                f"{path}:{number}"))
    return _non_empty(pairs, path, "pairs")


def read_tsv(path: str | os.PathLike) -> list[PromptPair]:
    """TSV: ``prompt<TAB>expansion`` per line (exactly one tab); a first line that reads
    ``prompt<TAB>expansion`` is a header and skipped."""
    path = Path(path)
    pairs = []
    for number, line in _lines(path):
        if number == 1 and line.strip().lower() == "prompt\texpansion":
            continue
        if not line.strip():
            raise DatasetError(f"{path}:{number}: blank line")
        fields = line.split("\t")
        if len(fields) != 2:
            raise DatasetError(f"{path}:{number}: expected 2 tab-separated columns "
                               f"(prompt, expansion), found {len(fields)}")
        pairs.append(PromptPair(_text(fields[0], path, number, "prompt"),
                                _text(fields[1], path, number, "expansion"),
                                f"{path}:{number}"))
    return _non_empty(pairs, path, "pairs")


def read_rephrase(path: str | os.PathLike) -> list[PromptPair]:
    """Promptist's SFT text layout: ``<prompt> Rephrase: <expansion>`` per line (the marker
    exactly once)."""
    path = Path(path)
    pairs = []
    for number, line in _lines(path):
        if not line.strip():
            raise DatasetError(f"{path}:{number}: blank line")
        parts = line.split(REPHRASE_MARKER)
        if len(parts) != 2:
            raise DatasetError(f"{path}:{number}: expected {REPHRASE_MARKER.strip()!r} once "
                               f"between prompt and expansion, found {len(parts) - 1}")
        pairs.append(PromptPair(_text(parts[0], path, number, "prompt"),
                                _text(parts[1], path, number, "expansion"),
                                f"{path}:{number}"))
    return _non_empty(pairs, path, "pairs")


def pair_format(path: str | os.PathLike, format: str | None = None) -> str:
    """The pair layout of ``path``: ``format`` if given, else from the extension (.jsonl, .tsv)."""
    if format is not None:
        if format not in PAIR_FORMATS:
            raise DatasetError(f"{path}: unknown pair format {format!r} (one of "
                               f"{', '.join(PAIR_FORMATS)})")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise DatasetError(f"{path}: cannot tell the pair format from the extension {suffix!r}; "
                           f"use .jsonl / .tsv or name the format ({', '.join(PAIR_FORMATS)})")
    return _EXTENSIONS[suffix]


def read_pairs(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               format: str | None = None, prompt_key: str = "prompt",
               expansion_key: str = "expansion") -> list[PromptPair]:
    """All pairs of one file or several (in the order given), each read by its layout."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DatasetError("no pair files given")
    pairs: list[PromptPair] = []
    for path in paths:
        kind = pair_format(path, format)
        if kind == "jsonl":
            pairs += read_jsonl(path, prompt_key=prompt_key, expansion_key=expansion_key)
        elif kind == "tsv":
            pairs += read_tsv(path)
        else:
            pairs += read_rephrase(path)
    return pairs


def read_prompt_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``read_prompts`` with each prompt's 1-based line number: later checks of the whole file
    (e.g. a prompt too long for the PEN) name ``path:line`` from the reader itself."""
    path = Path(path)
    prompts = []
    for number, line in _lines(path):
        if not line.strip():
            raise DatasetError(f"{path}:{number}: blank line (one prompt per line)")
        prompts.append((number, line.strip()))
    return _non_empty(prompts, path, "prompts")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """RL prompts, Promptist's layout: one prompt per line, stripped. Blank lines are errors."""
    return [prompt for _, prompt in read_prompt_lines(path)]

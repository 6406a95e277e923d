"""Run metrics: ``metrics.jsonl`` from process 0, the per-iteration guard, and the batch
front's hypervolume.

Per-iteration metrics stay on device as scalars. ``check_iteration`` fetches the few that guard
the run every iteration: a non-finite loss or gradient norm stops it (naming the iteration and
the metric) before anything of that iteration is written, and non-finite rewards are named in a
warning. ``MetricsWriter.flush`` fetches the buffered iterations and writes one JSON object per
logged step: the mean of each metric over the iterations since the last record, plus host-side
values (hypervolume, timings). ``truncate_metrics`` cuts the file back to a resumed checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from parrot_jax import storage

METRICS_FILE = "metrics.jsonl"
# Metrics whose non-finite value stops the run (a diverged update).
GUARDED = ("t2i/loss", "t2i/grad_norm", "t2i/approx_kl", "pen/loss", "pen/grad_norm")
# Samples with a non-finite reward (NaN or +/-inf), left out of selection and updates; each
# reward's own count is ``reward/<name>/invalid_count``.
INVALID = "reward/invalid_count"


def check_iteration(step: int, metrics: dict[str, jax.Array],
                    reward_names: Sequence[str]) -> None:
    """Fetch iteration ``step``'s guarded scalars: raise ``FloatingPointError`` naming the
    iteration and the first non-finite one of ``GUARDED``; warn, naming each reward, when
    samples had a non-finite reward."""
    from absl import logging

    wanted = [k for k in GUARDED if k in metrics]
    counts = [f"reward/{name}/invalid_count" for name in reward_names]
    wanted += [k for k in (INVALID, *counts) if k in metrics]
    values = {k: float(v) for k, v in jax.device_get({k: metrics[k] for k in wanted}).items()}
    for key in GUARDED:
        if key in values and not math.isfinite(values[key]):
            raise FloatingPointError(f"iteration {step}: {key} is {values[key]}")
    if values.get(INVALID, 0.0) > 0:
        named = ", ".join(f"{name} ({values[k]:.0f})" for name, k in zip(reward_names, counts)
                          if values.get(k, 0.0) > 0)
        logging.warning("iteration %d: %.0f samples have a non-finite reward (NaN or inf: %s); "
                        "they are left out of the selection and the updates", step,
                        values[INVALID], named)


def parse_reference(spec: str, num_rewards: int) -> np.ndarray | None:
    """``config.hypervolume_reference``: 'batch_min' -> None, else K comma-separated floats."""
    if spec == "batch_min":
        return None
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        values = []
    if len(values) != num_rewards:
        raise ValueError(f"config.hypervolume_reference={spec!r}: 'batch_min' or {num_rewards} "
                         "comma-separated numbers (one per reward)")
    return np.asarray(values, np.float64)


def host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host) array on every host."""
    return np.asarray(x if x.is_fully_addressable
                      else multihost_utils.process_allgather(x, tiled=True))


class MetricsWriter:
    """Buffers per-iteration device metrics; ``flush`` writes the log step's record (and, given
    a ``tensorboard`` writer, the same numbers as TensorBoard scalars)."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: Any = None):
        self.path = storage.path(workdir) / METRICS_FILE
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.tensorboard = tensorboard  # a training.tensorboard.TensorBoardWriter or None

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Keep iteration ``step``'s metrics (device scalars; nothing is fetched)."""
        self.pending.append((step, metrics))

    def flush(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Fetch the buffered iterations, write and return the record."""
        if not self.pending:
            return {}
        fetched: Sequence[tuple[int, dict[str, Any]]] = jax.device_get(self.pending)
        self.pending = []
        keys = fetched[-1][1].keys()
        record: dict[str, float] = {"step": fetched[-1][0]}
        for key in keys:
            record[key] = float(np.mean([float(m[key]) for _, m in fetched]))
        record.update(extra or {})
        if jax.process_index() == 0:
            storage.append(self.path, json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.scalars(record["step"],
                                         {k: v for k, v in record.items() if k != "step"})
                self.tensorboard.flush()
        return record


def truncate_metrics(workdir: str | os.PathLike, step: int) -> int:
    """Keep the records of ``workdir/metrics.jsonl`` up to ``step`` (the checkpoint a run
    resumes from) and drop the rest, with any last line cut short by a kill; the file is
    replaced atomically. Returns how many lines were dropped."""
    path = storage.path(workdir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short mid-write
        if line.endswith("\n") and record.get("step", math.inf) <= step:
            kept.append(line)
    if len(kept) < len(lines):
        storage.replace(path, "".join(kept).encode())
    return len(lines) - len(kept)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    path = storage.path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

"""Run metrics: ``metrics.jsonl`` from process 0, the NaN guard, and the batch front's
hypervolume.

Per-iteration metrics stay on device as scalars; ``MetricsWriter.flush`` fetches the buffered
iterations once per log step, stops the run on a non-finite loss (naming the iteration and the
metric), and writes one JSON object per logged step: the mean of each metric over the
iterations since the last log step, plus host-side values (hypervolume, timings).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

METRICS_FILE = "metrics.jsonl"
# Metrics whose non-finite value stops the run (a diverged update).
GUARDED = ("t2i/loss", "t2i/grad_norm", "t2i/approx_kl", "pen/loss", "pen/grad_norm")


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
        self.path = Path(workdir) / METRICS_FILE
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.tensorboard = tensorboard  # a training.tensorboard.TensorBoardWriter or None

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Keep iteration ``step``'s metrics (device scalars; nothing is fetched)."""
        self.pending.append((step, metrics))

    def flush(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Fetch the buffered iterations, check them, write and return the record."""
        if not self.pending:
            return {}
        fetched: Sequence[tuple[int, dict[str, Any]]] = jax.device_get(self.pending)
        self.pending = []
        for step, metrics in fetched:
            for key in GUARDED:
                if key in metrics and not math.isfinite(float(metrics[key])):
                    raise FloatingPointError(f"iteration {step}: {key} is {float(metrics[key])}; "
                                             "stopping (the last checkpoint is intact)")
        keys = fetched[-1][1].keys()
        record: dict[str, float] = {"step": fetched[-1][0]}
        for key in keys:
            record[key] = float(np.mean([float(m[key]) for _, m in fetched]))
        record.update(extra or {})
        if jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.scalars(record["step"],
                                         {k: v for k, v in record.items() if k != "step"})
                self.tensorboard.flush()
        return record


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``workdir/metrics.jsonl``, in order."""
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

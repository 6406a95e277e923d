"""TensorBoard event files without TensorFlow: scalars and PNG images, written with the
``tensorboard`` package's own event writer and protos (the run's ``workdir/tensorboard``), and
cut back to a resumed checkpoint's step (``truncate_events``)."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Mapping

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from parrot_jax.training.visualize import png_bytes

TENSORBOARD_DIR = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."


def _records(data: bytes) -> list[bytes]:
    """The whole records of a TFRecord file (length u64, its CRC u32, payload, its CRC u32),
    each with its framing; a last record cut short by a kill is left out."""
    out, at = [], 0
    while at + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        end = at + 12 + length + 4
        if end > len(data):
            break
        out.append(data[at:end])
        at = end
    return out


def truncate_events(logdir: str | os.PathLike, step: int) -> int:
    """Drop the events after ``step`` from every events file in ``logdir`` (a resumed run
    logs those iterations again; TensorBoard would show both), and any last record cut short
    by a kill; files are replaced atomically. Returns how many events were dropped."""
    dropped = 0
    if not os.path.isdir(logdir):
        return 0
    for name in sorted(os.listdir(logdir)):
        if not name.startswith(EVENTS_PREFIX) or name.endswith(".tmp"):
            continue
        path = os.path.join(logdir, name)
        with open(path, "rb") as f:
            data = f.read()
        records = _records(data)
        kept = [r for r in records if Event.FromString(r[12:-4]).step <= step]
        if len(kept) < len(records) or sum(map(len, records)) < len(data):
            dropped += len(records) - len(kept)
            with open(path + ".tmp", "wb") as f:
                f.write(b"".join(kept))
            os.replace(path + ".tmp", path)
    return dropped


class TensorBoardWriter:
    """Appends events to a new ``events.out.tfevents.*`` file in ``logdir`` (created if
    missing); a resumed run adds a file beside the earlier ones, which TensorBoard merges."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        self._writer = EventFileWriter(self.logdir)

    def _add(self, step: int, values: list[Summary.Value]) -> None:
        self._writer.add_event(Event(wall_time=time.time(), step=int(step),
                                     summary=Summary(value=values)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per tag at ``step``; a value that is not a number is an error naming
        its tag."""
        out = []
        for tag, value in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"TensorBoard scalar {tag!r}: {value!r} is not a number") from e
            out.append(Summary.Value(tag=tag, simple_value=number))
        self._add(step, out)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """A ``uint8 [H, W, 3]`` picture at ``step``, PNG-encoded."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"TensorBoard image {tag!r}: need uint8 [H, W, 3], got "
                             f"{image.dtype} {image.shape}")
        encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=3,
                                encoded_image_string=png_bytes(image))
        self._add(step, [Summary.Value(tag=tag, image=encoded)])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

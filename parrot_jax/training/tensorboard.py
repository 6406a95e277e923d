"""TensorBoard event files without TensorFlow: scalars and PNG images, written with the
``tensorboard`` package's own event writer and protos (the run's ``workdir/tensorboard``), and
cut back to a resumed checkpoint's step (``truncate_events``). In a bucket, where objects cannot
be appended to, events are written to a local file that is uploaded whole at each flush; a new
file is started past ``ROLL_BYTES`` so that no upload grows without bound."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from parrot_jax import storage
from parrot_jax.training.visualize import png_bytes

TENSORBOARD_DIR = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."
ROLL_BYTES = 32 << 20  # a bucket's events file is closed and a new one started past this size


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
    folder = storage.path(logdir)
    if not folder.is_dir():
        return 0
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(EVENTS_PREFIX) or path.name.endswith(".tmp"):
            continue
        data = path.read_bytes()
        records = _records(data)
        kept = [r for r in records if Event.FromString(r[12:-4]).step <= step]
        if len(kept) < len(records) or sum(map(len, records)) < len(data):
            dropped += len(records) - len(kept)
            storage.replace(path, b"".join(kept))
    return dropped


class TensorBoardWriter:
    """Appends events to a new ``events.out.tfevents.*`` file in ``logdir`` (created if
    missing); a resumed run adds a file beside the earlier ones, which TensorBoard merges.
    A bucket ``logdir`` gets the local file's whole content at each ``flush``."""

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = storage.path(logdir)
        self._remote = storage.is_remote(self.logdir)
        self._local = (tempfile.mkdtemp(prefix="parrot_jax_tensorboard_") if self._remote
                       else os.fspath(self.logdir))
        self._writer = EventFileWriter(self._local)

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
        if not self._remote:
            return
        for name, data in self._upload():  # one file: a rolled one was uploaded and removed
            if len(data) > ROLL_BYTES:
                self._writer.close()
                os.remove(os.path.join(self._local, name))
                self._writer = EventFileWriter(self._local)

    def _upload(self) -> list[tuple[str, bytes]]:
        """Copy each local events file whole to the bucket logdir; returns them."""
        out = []
        for name in os.listdir(self._local):
            with open(os.path.join(self._local, name), "rb") as f:
                data = f.read()
            (self.logdir / name).write_bytes(data)
            out.append((name, data))
        return out

    def close(self) -> None:
        self._writer.close()
        if self._remote:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)

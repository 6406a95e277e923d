"""SIGTERM (a Cloud TPU preemption notice) while training: the loop saves and returns."""

from __future__ import annotations

import signal
import threading

from absl import logging


class Preemption:
    """Records SIGTERM while installed (``with Preemption() as p: ... p.requested``)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM: saving a checkpoint after this iteration, then stopping")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

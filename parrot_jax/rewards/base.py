"""The reward interface: what a head reads, and the arrays it receives.

A reward maps a batch of images (and texts) to one raw value per image, ``[B]`` float32, larger
is better; normalisation belongs to ``rl/advantages.py``. Two kinds:

- ``Reward`` (device): a pure function ``apply(params, features) -> [B]`` of its own parameters
  and the embeddings of the CLIP backbone it declares. ``RewardSet`` runs each distinct backbone
  once per batch and hands the same ``Features`` to every head that reads it.
- ``HostReward``: non-JAX code (PIL, an HTTP scorer ...) on a thread pool; ``submit(images)``
  returns at once with a ``Future`` of ``[B]``, so the training loop can start the next rollout.

Texts enter jit as token ids: each backbone tokenises with its own tokenizer on the host
(``RewardSet.inputs``). Two texts exist per image: the **original prompt** the user wrote
(``prompt``) and the **conditioning text** the T2I model saw (``condition``: the reward
identifiers + the PEN's expansion). Each head says which it reads.
"""

from __future__ import annotations

import abc
import concurrent.futures
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from parrot_jax.rewards.backbone import ClipBackbone, Tokens

TEXTS = ("prompt", "condition")  # the texts a head may read besides the image


@struct.dataclass
class RewardInputs:
    """Everything a ``RewardSet`` reads for one batch; every leaf has the batch dim first."""

    images: jax.Array  # [B, H, W, 3] in [0, 1], NHWC (decoded VAE output mapped from [-1, 1])
    prompt: dict[str, Tokens]  # backbone name -> the ORIGINAL prompt's tokens
    condition: dict[str, Tokens]  # backbone name -> the conditioning text's tokens


@struct.dataclass
class Features:
    """What one backbone computed for a batch, shared by all heads that read it."""

    image: jax.Array  # [B, P] projected image embeddings, not normalised
    prompt: jax.Array | None  # [B, P] projected text embeddings of the original prompt
    condition: jax.Array | None  # [B, P] projected text embeddings of the conditioning text
    logit_scale: jax.Array  # [] the backbone's log logit scale (CLIP multiplies by its exp)


def l2_normalise(x: jax.Array) -> jax.Array:
    """``x / ||x||`` over the last axis (float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class Reward(abc.ABC):
    """A device reward head on a CLIP backbone.

    Subclasses set ``name`` (the column name in ``RewardSet.names``), ``backbone`` (the
    ``ClipBackbone`` whose embeddings it reads), ``reads`` (``"image"`` plus any of ``TEXTS``)
    and ``params`` (the head's own arrays, a pytree; ``{}`` when it has none).
    """

    name: str
    backbone: ClipBackbone
    reads: tuple[str, ...]
    params: Any

    @abc.abstractmethod
    def apply(self, params: Any, features: Features) -> jax.Array:
        """-> ``[B]`` float32 raw reward, a pure function of ``params`` and ``features``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backbone={self.backbone.name!r})"


class HostReward(abc.ABC):
    """A reward computed on the host by non-JAX code, asynchronously on a thread pool.

    Subclasses set ``name`` and implement ``compute``; ``submit`` hands the images to a pool of
    ``workers`` threads (the device-to-host copy happens there too, so ``submit`` never waits
    for the device) and returns a ``concurrent.futures.Future`` whose ``result()`` is ``[B]``
    float32. Call ``close()`` (or use the reward as a context manager) to stop the threads.
    """

    name: str

    def __init__(self, workers: int = 2):
        if workers < 1:
            raise ValueError(f"{type(self).__name__}: workers must be >= 1, got {workers}")
        self.workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @abc.abstractmethod
    def compute(self, images: np.ndarray) -> np.ndarray:
        """images ``[B, H, W, 3]`` float in [0, 1] (host) -> ``[B]`` raw reward."""

    def submit(self, images: Any) -> concurrent.futures.Future:
        """Start ``compute`` on the pool; returns immediately. ``images``: any array type."""
        if isinstance(images, jax.Array):
            # jaxlib (0.10) builds a sharded array's per-device shard list lazily on first
            # use, running Python per shard, so a thread that reads it mid-build sees only some
            # shards (``device_get`` then fails with IndexError). Build it here, on the calling
            # thread, before any worker can read it; this does not wait for the device.
            images.addressable_shards  # noqa: B018
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix=f"reward-{self.name}")
            return self._pool.submit(self._run, images)

    def _run(self, images: Any) -> np.ndarray:
        host = np.asarray(jax.device_get(images), np.float32)
        if host.ndim != 4 or host.shape[-1] != 3:
            raise ValueError(f"{self.name}: images must be [B, H, W, 3]; got {host.shape}")
        values = np.asarray(self.compute(host), np.float32)
        if values.shape != host.shape[:1]:
            raise ValueError(f"{self.name}: compute returned shape {values.shape}, expected "
                             f"{host.shape[:1]}")
        return values

    def close(self) -> None:
        """Wait for submitted work and stop the threads (a later ``submit`` starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> HostReward:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

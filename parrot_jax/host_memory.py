"""Keep freed host memory in the process: what makes XLA:CPU's per-call temporaries cheap.

XLA:CPU allocates each executable's temporaries (hundreds of MB for a UNet training step) with
``malloc`` on every call and frees them at its end. glibc serves blocks that large with fresh
``mmap`` pages, so every call first-touches them again: about 0.2 M page faults and 10-15% of
the wall time of a medium UNet fwd+bwd here (``benchmarks/unet.py``). Telling glibc to use one
arena, never to ``mmap`` and never to trim its heap keeps the pages mapped from one call to the
next: the ``GLIBC_TUNABLES`` settings ``glibc.malloc.arena_max=1``, ``mmap_max=0`` and a large
``trim_threshold``, applied from inside the process. Call it before XLA starts its threads
(threads that already own an arena keep it). The price: the process's resident memory stays at
its high-water mark, as with any caching allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def retain_freed_memory() -> str | None:
    """Make glibc's ``malloc`` keep freed memory for reuse (no ``mmap``, no heap trimming).

    Returns ``None`` when applied, otherwise why not (e.g. the C library is not glibc, as on
    macOS): the setting is a speed-up only, and callers log the reason.
    """
    libc = _libc()
    if libc is None:
        return "the C library is not glibc (no mallopt)"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not libc.mallopt(_M_ARENA_MAX, 1):
        return "glibc refused mallopt(M_ARENA_MAX, 1)"
    if not libc.mallopt(_M_MMAP_MAX, 0):
        return "glibc refused mallopt(M_MMAP_MAX, 0)"
    # mallopt takes an int; the largest positive int keeps the heap untrimmed (2 GiB of slack).
    if not libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
        return "glibc refused mallopt(M_TRIM_THRESHOLD)"
    return None

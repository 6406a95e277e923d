"""Timing helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def median_ms(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds; ``fn`` must return once its work is done."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def paired_median_ms(fns: Sequence[Callable[[], Any]], iters: int, warmup: int
                     ) -> list[float]:
    """Median wall time (ms) of each of ``fns``, called in turn within every iteration.

    Alternating the calls lets every function see the same machine: on a shared or virtual
    machine the speed drifts by 10-20% over seconds, which timing one function's calls and
    then the other's would read as a difference between them.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, log in zip(fns, times):
            start = time.perf_counter()
            fn()
            log.append(time.perf_counter() - start)
    return [1e3 * statistics.median(log) for log in times]


def compile_timed(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
    """``jax.jit(fn)`` compiled for ``args`` and the seconds tracing + lowering + compiling took."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def pin_threads(threads: int | None) -> None:
    """Limit XLA (via CPU affinity, before its backend starts) and torch to ``threads`` cores."""
    import torch

    if threads is None:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(cpus):
        raise SystemExit(f"--threads must be between 1 and {len(cpus)}")
    os.sched_setaffinity(0, set(cpus[:threads]))
    torch.set_num_threads(threads)


def environment_lines(threads: int | None, extra: str = "") -> list[str]:
    """Versions, cores and thread settings, for a benchmark's header."""
    import flax
    import torch

    return [
        f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"torch {torch.__version__}{extra}",
        f"cpu: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
        f"usable cores (affinity)={len(os.sched_getaffinity(0))}, jax devices: {jax.devices()}",
        f"threads: torch intra-op={torch.get_num_threads()}; XLA CPU pool sized to the usable "
        f"cores ({'pinned by --threads' if threads else 'all of them'})",
    ]


def add_common_args(parser: argparse.ArgumentParser, configs: Sequence[str], *, batch: int,
                    iters: int, warmup: int) -> None:
    """The flags every benchmark takes: --configs, --batch, --iters, --warmup, --threads."""
    parser.add_argument("--configs", default=",".join(configs),
                        help=f"comma-separated subset of {','.join(configs)}")
    parser.add_argument("--batch", type=int, default=batch, help="batch size")
    parser.add_argument("--iters", type=int, default=iters, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="pin XLA and torch to this many cores (default: all)")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      configs: Sequence[str]) -> None:
    """Validate the common flags; sets ``args.config_names``."""
    args.config_names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(args.config_names) - set(configs))
    if unknown or not args.config_names:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(configs)}")
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        parser.error("--batch and --iters must be >= 1, --warmup >= 0")

"""Benchmark the jitted non-dominated mask against moocore's C implementation.

For N = 256 ... 8192 rows of K = 4 rewards (uniform random, so ~hundreds are non-dominated at
large N; ``--ties`` draws from 8 levels instead), times:

* ``ours``: ``jax.jit(non_dominated_mask)`` on the CPU (``--block`` rows at a time for N above
  it), masks checked equal to the reference;
* ``moocore``: ``moocore.is_nondominated(R, maximise=True, keep_weakly=True)``, the reference;
* ``ratio = moocore / ours`` (above 1: ours faster);
* ``grouped``: ours within groups of ``--group`` rows (``[G, n, K]``, Parrot's per-prompt
  selection), for scale: O(G n^2) instead of O(N^2).

Medians over ``--iters`` calls after ``--warmup``. Nothing here runs in the tests.

Run (from the repository root)::

    python benchmarks/pareto.py [--sizes 256,1024,4096,8192] [--k 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Sequence

import jax
import moocore
import numpy as np
from common import median_ms

from parrot_jax.rl.pareto import grouped_non_dominated_mask, non_dominated_mask


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512,1024,2048,4096,8192", help="row counts N")
    parser.add_argument("--k", type=int, default=4, help="rewards per row")
    parser.add_argument("--block", type=int, default=256, help="block_size for N above it")
    parser.add_argument("--group", type=int, default=64, help="rows per group (grouped)")
    parser.add_argument("--ties", action="store_true", help="8 reward levels (many ties)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="pin to this many cores")
    args = parser.parse_args(argv)
    args.size_list = [int(s) for s in args.sizes.split(",")]
    if min(args.size_list) < 1 or args.k < 1 or args.iters < 1:
        parser.error("--sizes, --k and --iters must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:  # before XLA's backend starts
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.threads]))
    print(f"python {platform.python_version()}, jax {jax.__version__}, moocore "
          f"{moocore.__version__}; usable cores {len(os.sched_getaffinity(0))}; K = {args.k}; "
          f"{'8-level ties' if args.ties else 'uniform'} rewards; median of {args.iters}")
    mask = jax.jit(non_dominated_mask, static_argnames="block_size")
    grouped = jax.jit(lambda x: grouped_non_dominated_mask(x.reshape(-1, args.group, args.k)))
    head = (f"{'N':>6} {'front':>6} {'ours ms':>9} {'moocore ms':>11} {'ratio':>7} "
            f"{'grouped ms':>11}")
    print(head + "\n" + "-" * len(head))
    rng = np.random.default_rng(0)
    for n in args.size_list:
        r = (rng.integers(0, 8, (n, args.k)) if args.ties else rng.random((n, args.k)))
        r = r.astype(np.float32)
        block = args.block if n > args.block else None
        x = jax.device_put(r)
        ours = np.asarray(mask(x, block_size=block))
        ref = moocore.is_nondominated(r, maximise=True, keep_weakly=True)
        if not np.array_equal(ours, ref):
            raise SystemExit(f"N={n}: masks differ from moocore")
        t_ours = median_ms(lambda: mask(x, block_size=block).block_until_ready(),  # noqa: B023
                           args.iters, args.warmup)
        t_ref = median_ms(lambda: moocore.is_nondominated(r, maximise=True,  # noqa: B023
                                                          keep_weakly=True),
                          args.iters, args.warmup)
        t_group = (median_ms(lambda: grouped(x).block_until_ready(),  # noqa: B023
                             args.iters, args.warmup) if n % args.group == 0 else float("nan"))
        print(f"{n:>6} {int(ours.sum()):>6} {t_ours:>9.3f} {t_ref:>11.3f} "
              f"{t_ref / t_ours:>7.2f} {t_group:>11.3f}", flush=True)


if __name__ == "__main__":
    main()

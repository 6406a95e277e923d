"""Convolution gradients inside a loop body: ``models.conv.same_conv``'s against XLA's own.

The T2I update accumulates gradients over timesteps in a ``lax.scan``, so every convolution
gradient of the UNet runs inside a loop body. For each shape, ``--steps`` gradients of a 3x3
'same' convolution (input and kernel, of ``sum(conv(x, k) ** 2)``) are taken over a stack of
inputs, in a ``lax.scan`` (``loop``) and with the scan fully unrolled (``unrolled``), by

* ``xla``: ``jax.grad`` of ``lax.conv_general_dilated`` (XLA's gradient convolutions, the
  reference);
* ``ours``: ``jax.grad`` of ``same_conv`` (on a CPU: forward convolutions, or matmuls where
  the map is small next to the channels).

Printed: ms per step for each, and ``xla / ours`` (above 1: ours is faster).

    python benchmarks/conv_grad.py [--threads 1] [--steps 10]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from common import environment_lines, paired_median_ms, pin_threads
from jax import lax

from parrot_jax.models import conv

# name -> (N, H, W, I, O): the toy UNet's first level at the training minibatch with CFG, a
# mid-sized level, and SD 1.5's lowest level at batch 2.
SHAPES = {
    "toy_8x8x32": (64, 8, 8, 32, 32),
    "mid_32x32x64": (4, 32, 32, 64, 64),
    "sd_8x8x1280": (2, 8, 8, 1280, 1280),
}


def _loss(fn):
    return lambda x, k: jnp.sum(fn(x, k) ** 2)


def _xla_conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC)


def scanned(fn, unroll: int):
    """The summed gradients of ``fn`` over a stack of inputs ``xs [S, N, H, W, I]``."""
    grad = jax.grad(_loss(fn), argnums=(0, 1))

    def run(xs, k):
        def body(total, x):
            dx, dk = grad(x, k)
            return total + jnp.sum(dx) + jnp.sum(dk), None
        return jax.lax.scan(body, jnp.zeros(()), xs, unroll=unroll)[0]

    return jax.jit(run)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated subset of {','.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=10, help="gradients per scan")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores to use")
    args = parser.parse_args(argv)
    names = [n for n in args.shapes.split(",") if n]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown or args.steps < 1 or args.iters < 1:
        parser.error(f"--shapes: unknown {unknown}; --steps and --iters must be >= 1")
    pin_threads(args.threads)
    for line in environment_lines(args.threads):
        print(line)
    print(f"\n{'shape':<14}{'mode':<10}{'xla ms/step':>12}{'ours ms/step':>13}{'xla/ours':>10}")
    for name in names:
        n, h, w, i, o = SHAPES[name]
        keys = jax.random.split(jax.random.key(0))
        xs = jax.random.normal(keys[0], (args.steps, n, h, w, i))
        k = 0.1 * jax.random.normal(keys[1], (3, 3, i, o))
        for mode, unroll in (("loop", 1), ("unrolled", args.steps)):
            fns = [scanned(f, unroll) for f in (_xla_conv, conv.same_conv)]
            calls = [lambda f=f, xs=xs, k=k: jax.block_until_ready(f(xs, k)) for f in fns]
            xla, ours = paired_median_ms(calls, args.iters, 1)
            print(f"{name:<14}{mode:<10}{xla / args.steps:>12.2f}{ours / args.steps:>13.2f}"
                  f"{xla / ours:>10.2f}", flush=True)


if __name__ == "__main__":
    main()

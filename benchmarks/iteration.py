"""Where a Parrot iteration's time goes: PEN expansion, rollout, VAE decode, rewards, advantages,
T2I update and PEN update, for a training config at several batch sizes.

Each size builds the run exactly as ``train.py`` does (``loop.setup`` in a scratch workdir),
runs one iteration to compile, then times ``--iters`` plain iterations (the reference: host and
device work overlap as in training) and ``--iters`` iterations with a ``PhaseTimer`` as the
iteration's ``mark`` hook, which blocks at the end of every phase. The VAE decoder is also
timed alone on the iteration's latents, to split the jitted rollout-and-decode. Printed:
milliseconds per phase, its share, and the phases' sum over the plain iteration (the cost of
blocking between phases).

    python benchmarks/iteration.py --threads 1 --sizes 2x8,4x8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from common import environment_lines, pin_threads

from parrot_jax import config_files

ROOT = Path(__file__).resolve().parents[1]


class PhaseTimer:
    """Wall seconds per phase of ``parrot_iteration`` (its ``mark`` hook): each phase ends by
    blocking on its outputs, which removes the overlap of host and device work."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def __call__(self, name: str, *outputs: Any) -> None:
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._start
        self._start = now
PHASES = ("pen_expand", "rollout", "vae_decode", "rewards", "advantages", "t2i_update",
          "pen_update")


def run_size(spec: str, groups: int, per_group: int, iters: int) -> dict[str, float]:
    from parrot_jax.training import loop

    config = config_files.load(ROOT / spec)
    config.num_groups, config.images_per_group = groups, per_group
    config.eval_prompts = tuple(config.eval_prompts[:groups])
    config.num_iterations = config.eval_every = config.checkpoint_every = 10 ** 6
    with tempfile.TemporaryDirectory() as workdir:
        run, state = loop.setup(config, workdir)
        start = time.perf_counter()
        state, *_ = loop.parrot_iteration(run, state)
        jax.block_until_ready(state)
        compile_s = time.perf_counter() - start
        plain = []
        for _ in range(iters):
            start = time.perf_counter()
            state, *_ = loop.parrot_iteration(run, state)
            jax.block_until_ready(state)
            plain.append(time.perf_counter() - start)
        phases: dict[str, list[float]] = {}
        for _ in range(iters):
            timer = PhaseTimer()
            state, *_ = loop.parrot_iteration(run, state, timer)
            for k, v in timer.seconds.items():
                phases.setdefault(k, []).append(v)
        m = run.models
        decode = jax.jit(lambda p, z: m.vae.apply({"params": p}, z / m.scaling_factor,
                                                  method=m.vae.decode))
        z = jnp.zeros((run.settings.sizes.batch, *m.latent_shape), jnp.float32)
        jax.block_until_ready(decode(m.vae_params, z))
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            jax.block_until_ready(decode(m.vae_params, z))
            times.append(time.perf_counter() - start)
        run.models.rewards.close()
    ms = {k: 1e3 * statistics.median(v) for k, v in phases.items()}
    ms["vae_decode"] = 1e3 * statistics.median(times)
    ms["rollout"] = ms.pop("rollout_and_decode") - ms["vae_decode"]
    ms["plain"] = 1e3 * statistics.median(plain)
    ms["compile_s"] = compile_s
    return ms


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.py", help="config file[:arg]")
    parser.add_argument("--sizes", default="2x8,4x8",
                        help="comma-separated GROUPSxIMAGES batch layouts")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per mode")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores to use")
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    sizes = []
    for item in args.sizes.split(","):
        g, _, n = item.partition("x")
        if not (g.isdigit() and n.isdigit()):
            raise SystemExit(f"--sizes: {item!r} is not GROUPSxIMAGES (e.g. 4x8)")
        sizes.append((int(g), int(n)))
    for line in environment_lines(args.threads, f"; config {args.config}"):
        print(line)
    for g, n in sizes:
        r = run_size(args.config, g, n, args.iters)
        total = sum(r[p] for p in PHASES if p in r)
        print(f"\n{g} groups x {n} images = {g * n} per iteration; first iteration (compiling) "
              f"{r['compile_s']:.1f} s")
        print(f"{'phase':<14}{'ms':>10}{'share':>8}{'ms/image':>10}")
        for p in PHASES:
            if p in r:
                print(f"{p:<14}{r[p]:>10.1f}{100 * r[p] / total:>7.1f}%{r[p] / (g * n):>10.2f}")
        print(f"{'sum of phases':<14}{total:>10.1f}")
        print(f"{'plain iter':<14}{r['plain']:>10.1f}   phases/plain = {total / r['plain']:.2f}"
              f"; {1e3 * g * n / r['plain']:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()

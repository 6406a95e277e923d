"""Benchmark the jitted scan sampler against the guided UNet calls it is made of.

For each UNet config ("tiny", "medium": the configs of ``benchmarks/unet.py``), with random
weights and a batch of ``--batch`` images:

* ``call``: one jitted guided model call, ``guided_model_output``: the UNet on the batch of
  ``G * B`` (``G`` = 2 for CFG, 3 for prompt-centred guidance) and the guidance combination.
* ``rollout``: the jitted ``parrot_jax.diffusion.sample`` with ``--steps`` S DDIM steps (eta 1,
  log-probs and the latents chain kept): one ``lax.scan`` of S guided calls plus DDIM steps.
* ``overhead = rollout / (S * call) - 1``: what the scan, the DDIM step, the noise and the
  trajectory bookkeeping add on top of the UNet work (target: <= 5%).
* ``images/s = B / rollout``.

Timings are medians over ``--iters`` rounds after ``--warmup`` untimed ones; each round times one
rollout and then S back-to-back calls, so slow drifts of a shared machine hit both alike.
Compilation (trace + lower + XLA compile) is reported separately. ``--threads N`` pins the
process to N cores before XLA starts. Nothing here runs in the tests.

Run (from the repository root)::

    python benchmarks/sampler.py --configs tiny,medium [--batch 2] [--steps 10] [--guidance cfg]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
from unet import CONFIG_NAMES, make_case  # benchmarks/unet.py: the shared UNet configs

from parrot_jax.diffusion import (
    CFG,
    DDIMSchedule,
    PromptCentredGuidance,
    branch_contexts,
    guided_model_output,
    sample,
)
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig

SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the result table."""

    config: str
    call_ms: float
    rollout_ms: float
    steps: int
    batch: int
    compile_call_s: float
    compile_rollout_s: float

    @property
    def overhead(self) -> float:
        return self.rollout_ms / (self.steps * self.call_ms) - 1.0

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.rollout_ms / 1e3)


def build(name: str, batch: int, guidance: str, seed: int = 0) -> dict[str, Any]:
    """Module, random params, schedule-free inputs and the guidance rule of a named config."""
    case = make_case(name)
    module = UNet2DConditionModel(UNetConfig.from_diffusers(case.unet_kwargs))
    params = module.init_params(jax.random.key(seed), size=case.size)
    rule = CFG(5.0) if guidance == "cfg" else PromptCentredGuidance(5.0, 5.0)
    dim = case.unet_kwargs["cross_attention_dim"]
    keys = jax.random.split(jax.random.key(seed + 1), rule.num_branches + 1)
    texts = [jax.random.normal(k, (batch, case.text_len, dim)) for k in keys[1:]]
    latent_shape = (case.size, case.size, case.unet_kwargs["in_channels"])
    x = jax.random.normal(keys[0], (batch, *latent_shape))
    return dict(module=module, params=params, contexts=branch_contexts(*texts), guidance=rule,
                latent_shape=latent_shape, x=x)


def timed_compile(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def run_case(name: str, batch: int, steps: int, iters: int, warmup: int, guidance: str) -> Row:
    b = build(name, batch, guidance)
    module, params, contexts, rule = b["module"], b["params"], b["contexts"], b["guidance"]
    schedule = DDIMSchedule.from_config(SD15_SCHEDULER, steps)
    t = schedule.timesteps[0]

    call = jax.jit(guided_model_output, static_argnums=0)
    apply = lambda p, x, tt, c: module.apply({"params": p}, x, tt, c)  # noqa: E731
    call_c, call_compile = timed_compile(call, apply, params, b["x"], t, contexts, rule)
    call_args = (params, b["x"], t, contexts, rule)
    rollout_c, rollout_compile = timed_compile(sample, module, params, schedule, contexts, rule,
                                               jax.random.key(0),
                                               latent_shape=b["latent_shape"])
    rollout_args = (params, schedule, contexts, rule, jax.random.key(0))

    rollout_times, call_times = [], []
    for i in range(warmup + iters):
        start = time.perf_counter()
        jax.block_until_ready(rollout_c(*rollout_args))
        mid = time.perf_counter()
        for _ in range(steps):  # as the scan runs them: one after the other
            out = call_c(*call_args)
        jax.block_until_ready(out)
        end = time.perf_counter()
        if i >= warmup:
            rollout_times.append(mid - start)
            call_times.append((end - mid) / steps)
    return Row(name, 1e3 * statistics.median(call_times), 1e3 * statistics.median(rollout_times),
               steps, batch, call_compile, rollout_compile)


def format_table(rows: Sequence[Row], guidance: str) -> str:
    head = (f"{'config':<8} {'B':>3} {'S':>4} {'call ms':>9} {'S*call ms':>10} "
            f"{'rollout ms':>11} {'overhead':>9} {'images/s':>9} {'compile s (call/rollout)':>25}")
    lines = [f"guidance: {guidance}", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.config:<8} {r.batch:>3} {r.steps:>4} {r.call_ms:>9.2f} "
                     f"{r.steps * r.call_ms:>10.1f} {r.rollout_ms:>11.1f} "
                     f"{100 * r.overhead:>8.1f}% {r.images_per_s:>9.2f} "
                     f"{r.compile_call_s:>12.1f} / {r.compile_rollout_s:<10.1f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,medium",
                        help=f"comma-separated subset of {','.join(CONFIG_NAMES)}")
    parser.add_argument("--batch", type=int, default=2, help="images per rollout")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps S")
    parser.add_argument("--guidance", choices=("cfg", "pcg"), default="cfg",
                        help="cfg: 2-way CFG; pcg: 3-way prompt-centred guidance")
    parser.add_argument("--iters", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=None,
                        help="pin the process to this many cores (default: all)")
    args = parser.parse_args(argv)
    args.config_names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(args.config_names) - set(CONFIG_NAMES))
    if unknown or not args.config_names:
        parser.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIG_NAMES)}")
    if min(args.batch, args.steps, args.iters) < 1 or args.warmup < 0:
        parser.error("--batch, --steps and --iters must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:  # before the first jax computation starts XLA's backend
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(cpus[:args.threads]))
    print(f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}; "
          f"devices {jax.devices()}; usable cores {len(os.sched_getaffinity(0))}; float32; "
          f"median of {args.iters} rounds after {args.warmup} warm-up", flush=True)
    rows = []
    for name in args.config_names:
        rows.append(run_case(name, args.batch, args.steps, args.iters, args.warmup,
                             args.guidance))
        print(f"{name}: done", flush=True)
    print()
    print(format_table(rows, args.guidance))


if __name__ == "__main__":
    main()

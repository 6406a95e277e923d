"""Benchmark our jitted Flax UNet against diffusers' PyTorch ``UNet2DConditionModel`` on the CPU.

For each config ("tiny", "medium") both models are built from the same diffusers config with the
same weights (the torch model is written with ``save_pretrained`` and read back with
``parrot_jax.hub.load_unet``) and fed the same float32 batch (NHWC for ours, NCHW for torch):

* ``fwd``: one forward pass. Ours: ``jax.jit``; torch: under ``torch.no_grad()``.
* ``fwd+bwd``: forward, ``loss = mean(output ** 2)``, gradients w.r.t. every parameter.
  Ours: ``jax.jit(jax.value_and_grad(loss))``; torch: ``loss.backward()``.

Times are medians over ``--iters`` calls after ``--warmup`` untimed calls, ours and torch's
called in turn (``common.paired_median_ms``) so both see the same machine; ours are
synchronised with ``block_until_ready`` and exclude compilation, which is reported on its own
(trace + lower + XLA compile). ``torch/ours`` above 1 means ours is faster. The maximum
absolute difference of the two forward outputs is printed as a check that both sides compute
the same function.

Threads: by default XLA's CPU runtime and torch both use every core the process may run on.
``--threads N`` pins the process to N cores (``os.sched_setaffinity``, before XLA starts, which
sizes XLA's thread pool to N) and calls ``torch.set_num_threads(N)``. The header prints what was
used. Timings on a shared machine are indicative only; nothing here runs in the tests.

Two things that move the numbers a lot on small shared machines:

* torch's OpenMP workers busy-wait, so when another process holds a core, ``--threads`` equal to
  the core count can slow torch down by 10-100x; use ``--threads 1`` on a busy 2-core machine.
* XLA:CPU takes each call's large temporaries from glibc ``malloc``, which serves them with fresh
  ``mmap`` pages, so every call pays page faults (about 0.2 M per medium fwd+bwd). By default
  the benchmark first calls ``parrot_jax.host_memory.retain_freed_memory()`` (what ``train.py``
  does on CPUs), which keeps freed memory in the heap for both libraries; ``--default-malloc``
  leaves glibc's defaults, to see that cost.

Run (from the repository root, with the package installed or on PYTHONPATH)::

    python benchmarks/unet.py --configs tiny,medium [--batch 2] [--iters 10] [--threads N] \\
        [--default-malloc]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Sequence
from typing import Any

import common
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import compile_timed, paired_median_ms, pin_threads

from parrot_jax import host_memory, hub

CONFIG_NAMES = ("tiny", "medium")
MODES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Case:
    """A named benchmark configuration: diffusers UNet kwargs plus input sizes."""

    name: str
    unet_kwargs: dict[str, Any]
    size: int  # latent height and width
    text_len: int  # context tokens


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the result table."""

    config: str
    mode: str
    ours_ms: float
    torch_ms: float
    compile_s: float


def make_case(name: str) -> Case:
    """The diffusers ``UNet2DConditionModel`` kwargs and input sizes of a named config."""
    common: dict[str, Any] = dict(in_channels=4, out_channels=4, layers_per_block=2)
    if name == "tiny":
        kwargs = dict(common, sample_size=16, block_out_channels=(32, 64),
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
        return Case(name, kwargs, size=16, text_len=77)
    if name == "medium":  # SD 1.x layout, narrower and one level shallower
        kwargs = dict(common, sample_size=32, block_out_channels=(128, 256, 512),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                        "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                      cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        return Case(name, kwargs, size=32, text_len=77)
    raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIG_NAMES)}")


def make_inputs(case: Case, batch: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(sample NCHW, timesteps [B] int64, context [B, L, D])`` as float32 / int numpy arrays."""
    rng = np.random.default_rng(seed)
    cfg = case.unet_kwargs
    sample = rng.standard_normal((batch, cfg["in_channels"], case.size, case.size), np.float32)
    timesteps = rng.integers(0, 1000, size=(batch,), dtype=np.int64)
    context = rng.standard_normal((batch, case.text_len, cfg["cross_attention_dim"]), np.float32)
    return sample, timesteps, context


def build_models(case: Case) -> tuple[torch.nn.Module, Any, Any]:
    """Diffusers' torch UNet with random weights, and ours loaded from the same weights."""
    torch.manual_seed(0)
    torch_model = diffusers.UNet2DConditionModel(**case.unet_kwargs).eval()
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        module, params = hub.load_unet(tmp, dtype=jnp.float32)
    return torch_model, module, params


def ours_fns(module: Any, params: Any, inputs: Sequence[np.ndarray]
             ) -> tuple[dict[str, tuple[Any, float]], np.ndarray]:
    """``{mode: (call, compile s)}`` for our UNet, and its forward output (NCHW)."""
    sample, timesteps, context = inputs
    args = (params, jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(timesteps, jnp.int32),
            jnp.asarray(context))

    def forward(p: Any, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        return module.apply({"params": p}, x, t, c)

    def loss(p: Any, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        return jnp.mean(forward(p, x, t, c) ** 2)

    calls = {}
    for mode, fn in {"fwd": forward, "fwd+bwd": jax.value_and_grad(loss)}.items():
        compiled, compile_s = compile_timed(fn, *args)
        calls[mode] = (lambda c=compiled: jax.block_until_ready(c(*args)), compile_s)
    out = np.asarray(jax.jit(forward)(*args)).transpose(0, 3, 1, 2)
    return calls, out


def torch_fns(model: torch.nn.Module, inputs: Sequence[np.ndarray]
              ) -> tuple[dict[str, Any], np.ndarray]:
    """``{mode: call}`` for diffusers' UNet, and its forward output (NCHW)."""
    sample, timesteps, context = (torch.from_numpy(a) for a in inputs)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(sample, timesteps, context, return_dict=False)[0]

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(sample, timesteps, context, return_dict=False)[0].pow(2).mean()
        loss.backward()

    return {"fwd": forward, "fwd+bwd": forward_backward}, forward().numpy()


def run_case(case: Case, batch: int, iters: int, warmup: int) -> tuple[list[Row], float]:
    """Table rows for one config and the max |ours - torch| of the forward outputs."""
    torch_model, module, params = build_models(case)
    inputs = make_inputs(case, batch)
    ours, ours_out = ours_fns(module, params, inputs)
    theirs, torch_out = torch_fns(torch_model, inputs)
    rows = []
    for mode in MODES:
        ours_ms, torch_ms = paired_median_ms([ours[mode][0], theirs[mode]], iters, warmup)
        rows.append(Row(case.name, mode, ours_ms, torch_ms, ours[mode][1]))
    return rows, float(np.max(np.abs(ours_out - torch_out)))


def environment_lines(args: argparse.Namespace) -> list[str]:
    """Versions, devices, thread settings and sizes, for the header."""
    return common.environment_lines(args.threads, f", diffusers {diffusers.__version__}") + [
        f"float32, batch {args.batch}, {args.iters} timed iters after {args.warmup} warm-up, "
        "median",
    ]



def format_table(rows: Sequence[Row]) -> str:
    """The result table as aligned text."""
    head = (f"{'config':<8} {'mode':<8} {'ours ms':>10} {'torch ms':>10} {'torch/ours':>11} "
            f"{'ours compile s':>15}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.config:<8} {r.mode:<8} {r.ours_ms:>10.2f} {r.torch_ms:>10.2f} "
                     f"{r.torch_ms / r.ours_ms:>11.2f} {r.compile_s:>15.2f}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, CONFIG_NAMES, batch=2, iters=10, warmup=2)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's malloc defaults (fresh mmap pages for every call's "
                             "temporaries) instead of host_memory.retain_freed_memory()")
    args = parser.parse_args(argv)
    common.check_common_args(parser, args, CONFIG_NAMES)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Before XLA's threads start: arenas made earlier would keep their own settings.
    why_not = None if args.default_malloc else host_memory.retain_freed_memory()
    pin_threads(args.threads)  # before the first jax computation starts XLA's CPU backend
    jax.config.update("jax_platforms", "cpu")
    print("\n".join(environment_lines(args)), flush=True)
    print("malloc: " + ("glibc defaults" if args.default_malloc else
                        f"not changed ({why_not})" if why_not else
                        "freed memory retained (host_memory.retain_freed_memory)"), flush=True)
    rows = []
    for name in args.config_names:
        case_rows, max_diff = run_case(make_case(name), args.batch, args.iters, args.warmup)
        print(f"{name}: forward max |ours - torch| = {max_diff:.2e}", flush=True)
        rows.extend(case_rows)
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()

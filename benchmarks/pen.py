"""Benchmark the PEN sampler (``parrot_jax.expansion.sample``) against full-recompute decoding.

For each T5 config of ``benchmarks/t5.py`` ("tiny", "medium": FLAN-T5's layout, the medium one
t5-small's shape with the real 32128-token vocabulary), a batch of ``--batch`` prompts of
``--src-len`` tokens, ``--new-tokens`` sampled tokens (EOS disabled, so every call samples
exactly ``batch * new_tokens`` tokens), top-p ``--top-p``:

* ``cached``: ours, one jitted call: encoder once, cross-attention keys / values once, a
  ``while_loop`` of ``decode_step`` over a fixed-size KV cache, per-token log-probs recorded;
* ``uncached``: the reference, in the same run: a jitted ``lax.scan`` that re-runs the whole
  encoder-decoder on the growing sequence for every new token (what decoding costs without a
  cache), with the same filtering and the same random draws, so both must produce the same
  tokens (checked);
* ``speed-up = uncached / cached``.

Tokens/s are over whole calls, medians over ``--iters`` after ``--warmup``; compile time is
reported on its own. ``--threads 1`` on a busy 2-core machine. Nothing here runs in the tests.

Run (from the repository root)::

    python benchmarks/pen.py --configs tiny,medium [--batch 4] [--new-tokens 77] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import add_common_args, check_common_args, environment_lines, median_ms, pin_threads
from jax import lax
from t5 import CONFIG_NAMES, t5_kwargs

from parrot_jax.expansion import SamplingConfig, filter_logits, sample
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration


def uncached(module: T5ForConditionalGeneration, params: Any, ids: jax.Array, mask: jax.Array,
             key: jax.Array, config: SamplingConfig) -> jax.Array:
    """``[B, N]`` tokens, re-running the full model on the whole prefix for every token."""
    n = config.max_new_tokens

    def step(buf, pos):
        logits = module.apply({"params": params}, ids, mask, buf)  # [B, N, V], causal
        last = lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False)
        token = jax.random.categorical(jax.random.fold_in(key, pos),
                                       filter_logits(last, config)).astype(jnp.int32)
        buf = lax.dynamic_update_index_in_dim(buf, token[:, None], jnp.minimum(pos + 1, n - 1),
                                              axis=1)
        return buf, token

    buf = jnp.full((ids.shape[0], n), module.config.start_token, jnp.int32)
    _, tokens = lax.scan(step, buf, jnp.arange(n))
    return tokens.T


def run_case(name: str, args: argparse.Namespace) -> dict[str, float]:
    config = T5Config.from_transformers(t5_kwargs(name), f"benchmarks/t5.py {name}")
    module = T5ForConditionalGeneration(dataclasses.replace(config, eos_token_id=None))
    params = module.init_params(jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, module.config.vocab_size, (args.batch, args.src_len)).astype(np.int32)
    mask = np.ones_like(ids)
    key = jax.random.key(1)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, top_p=args.top_p)
    ref = jax.jit(uncached, static_argnums=(0, 5))

    start = time.perf_counter()
    got = jax.block_until_ready(sample(module, params, ids, mask, key, cfg)).tokens
    compile_cached = time.perf_counter() - start
    start = time.perf_counter()
    want = jax.block_until_ready(ref(module, params, ids, mask, key, cfg))
    compile_uncached = time.perf_counter() - start
    cached_ms = median_ms(lambda: jax.block_until_ready(sample(module, params, ids, mask, key,
                                                                cfg)), args.iters, args.warmup)
    uncached_ms = median_ms(lambda: jax.block_until_ready(ref(module, params, ids, mask, key,
                                                               cfg)), args.iters, args.warmup)
    tokens = args.batch * args.new_tokens
    return dict(cached=tokens / cached_ms * 1e3, uncached=tokens / uncached_ms * 1e3,
                speedup=uncached_ms / cached_ms, same=float(np.mean(np.asarray(got) ==
                                                                    np.asarray(want))),
                compile_cached=compile_cached, compile_uncached=compile_uncached)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, CONFIG_NAMES, batch=4, iters=5, warmup=1)
    parser.add_argument("--src-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=77, help="sampled tokens per prompt")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass")
    args = parser.parse_args(argv)
    check_common_args(parser, args, CONFIG_NAMES)
    pin_threads(args.threads)
    for line in environment_lines(args.threads, f"; top_p {args.top_p}; float32"):
        print(line)
    head = (f"{'config':<8} {'B':>3} {'N':>4} {'cached tok/s':>13} {'uncached tok/s':>15} "
            f"{'speed-up':>9} {'same tokens':>12} {'compile s (cached/uncached)':>28}")
    print(head + "\n" + "-" * len(head), flush=True)
    for name in args.config_names:
        r = run_case(name, args)
        print(f"{name:<8} {args.batch:>3} {args.new_tokens:>4} {r['cached']:>13.0f} "
              f"{r['uncached']:>15.0f} {r['speedup']:>9.1f} {r['same']:>12.3f} "
              f"{r['compile_cached']:>13.1f} / {r['compile_uncached']:<10.1f}", flush=True)


if __name__ == "__main__":
    main()

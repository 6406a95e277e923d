"""Benchmark our T5 against transformers' PyTorch ``T5ForConditionalGeneration`` on the CPU.

For each config ("tiny", "medium") both models hold the same weights (the torch model is written
with ``save_pretrained`` and read back with ``parrot_jax.hub.load_t5``) and get the same float32
batch of ``--batch`` source sequences of ``--src-len`` tokens:

* ``decode``: greedy generation of ``--new-tokens`` tokens per sequence with a KV cache. Ours:
  ``jax.jit(greedy_decode)`` (encode once, cross-attention keys / values once, then a
  ``lax.scan`` of ``decode_step`` over a fixed-size cache). Theirs: ``model.generate(do_sample=
  False)`` with its default dynamic cache. EOS is disabled on both sides so every call generates
  exactly ``batch * new_tokens`` tokens; the figure is tokens/s over the whole call (encoder
  included).
* ``forward``: one teacher-forced forward pass (source ``[B, src_len]``, decoder
  ``[B, new_tokens]``) to logits. Ours: ``jax.jit(module.apply)``; theirs under ``no_grad``.

Times are medians over ``--iters`` calls after ``--warmup`` untimed calls; ours are synchronised
with ``block_until_ready`` and exclude compilation, reported on its own. ``ours/torch`` for
tokens/s and ``torch/ours`` for times: above 1 means ours is faster. The generated tokens and the
forward logits of the two sides are compared as a check that both compute the same function.

``--threads N`` pins the process to N cores (before XLA starts) and sets torch's thread count.
On a machine whose cores are busy with other work, use ``--threads 1``: torch's multi-threaded
kernels then stall on their barriers (a tiny forward measured 680 ms with 2 threads, 3.6 ms with
one, on a loaded 2-core VM). Timings on a shared machine are indicative only; nothing here runs in
the tests.

Run (from the repository root, with the package installed)::

    python benchmarks/t5.py --configs tiny,medium [--batch 4] [--new-tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import common
import jax
import numpy as np
import torch
import transformers
from common import compile_timed, pin_threads

from parrot_jax import hub
from parrot_jax.models.t5 import greedy_decode

CONFIG_NAMES = ("tiny", "medium")


def t5_kwargs(name: str) -> dict[str, Any]:
    """transformers ``T5Config`` kwargs of a named config (FLAN-T5's layout: gated, untied)."""
    common: dict[str, Any] = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                  decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    if name == "tiny":  # the test suite's size
        return dict(common, vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=20)
    if name == "medium":  # t5-small's shape with v1.1's feed-forward and the real vocabulary
        return dict(common, vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=6,
                    num_heads=8)
    raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIG_NAMES)}")


@dataclasses.dataclass(frozen=True)
class Result:
    """One config's measurements."""

    config: str
    ours_tok_s: float
    torch_tok_s: float
    ours_fwd_ms: float
    torch_fwd_ms: float
    compile_decode_s: float
    compile_fwd_s: float
    same_tokens: float  # fraction of generated tokens that agree
    fwd_max_diff: float


def build_models(name: str) -> tuple[torch.nn.Module, Any, Any]:
    """transformers' model with random weights (and its own head), and ours loaded from it."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**t5_kwargs(name)))
    model.lm_head.weight = torch.nn.Parameter(model.config.d_model ** -0.5
                                              * torch.randn(model.lm_head.weight.shape))
    model.eval()
    model.generation_config.eos_token_id = None  # generate exactly new_tokens tokens
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        module, params = hub.load_t5(tmp)
    module = module.clone(config=dataclasses.replace(module.config, eos_token_id=None))
    return model, module, params


def seconds(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in seconds."""
    return common.median_ms(fn, iters, warmup) / 1e3


def run_case(name: str, args: argparse.Namespace) -> Result:
    """Decode and forward timings of both implementations for one config."""
    model, module, params = build_models(name)
    rng = np.random.default_rng(0)
    vocab = module.config.vocab_size
    ids = rng.integers(2, vocab, (args.batch, args.src_len))
    mask = np.ones_like(ids)
    mask[0, args.src_len // 2:] = 0  # one padded row
    dec = rng.integers(2, vocab, (args.batch, args.new_tokens))
    dec[:, 0] = 0
    n_tokens = args.batch * args.new_tokens

    decode, compile_decode = compile_timed(
        partial(greedy_decode, module, max_new_tokens=args.new_tokens), params, ids, mask)
    ours_s = seconds(lambda: jax.block_until_ready(decode(params, ids, mask)), args.iters,
                      args.warmup)
    ours_tokens = np.asarray(decode(params, ids, mask))

    t_ids, t_mask, t_dec = (torch.from_numpy(a) for a in (ids, mask, dec))

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=False,
                                  num_beams=1, max_new_tokens=args.new_tokens)

    torch_s = seconds(generate, args.iters, args.warmup)
    torch_tokens = generate().numpy()[:, 1:]

    def ours_forward(p: Any, i: Any, m: Any, d: Any) -> jax.Array:
        return module.apply({"params": p}, i, m, d)

    forward, compile_fwd = compile_timed(ours_forward, params, ids, mask, dec)
    ours_fwd = seconds(lambda: jax.block_until_ready(forward(params, ids, mask, dec)),
                        args.iters, args.warmup)

    def torch_forward() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=t_ids, attention_mask=t_mask, decoder_input_ids=t_dec).logits

    torch_fwd = seconds(torch_forward, args.iters, args.warmup)
    diff = np.abs(np.asarray(forward(params, ids, mask, dec)) - torch_forward().numpy()).max()
    same = float(np.mean(ours_tokens == torch_tokens)) if ours_tokens.shape == \
        torch_tokens.shape else 0.0
    return Result(name, n_tokens / ours_s, n_tokens / torch_s, 1e3 * ours_fwd, 1e3 * torch_fwd,
                  compile_decode, compile_fwd, same, float(diff))


def environment_lines(args: argparse.Namespace) -> list[str]:
    """Versions, devices, threads and sizes, for the header."""
    return common.environment_lines(args.threads, f", transformers {transformers.__version__}") + [
        f"float32, batch {args.batch}, source {args.src_len} tokens, {args.new_tokens} new "
        f"tokens, {args.iters} timed iters after {args.warmup} warm-up, median",
    ]



def format_table(results: Sequence[Result]) -> str:
    """The result table as aligned text."""
    head = (f"{'config':<7} {'ours tok/s':>11} {'torch tok/s':>12} {'ours/torch':>11} "
            f"{'ours fwd ms':>12} {'torch fwd ms':>13} {'torch/ours':>11} "
            f"{'compile s (dec, fwd)':>21} {'same tokens':>12} {'fwd max diff':>13}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.config:<7} {r.ours_tok_s:>11.0f} {r.torch_tok_s:>12.0f} "
            f"{r.ours_tok_s / r.torch_tok_s:>11.2f} {r.ours_fwd_ms:>12.2f} "
            f"{r.torch_fwd_ms:>13.2f} {r.torch_fwd_ms / r.ours_fwd_ms:>11.2f} "
            f"{r.compile_decode_s:>10.2f}, {r.compile_fwd_s:>8.2f} {r.same_tokens:>12.0%} "
            f"{r.fwd_max_diff:>13.1e}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, CONFIG_NAMES, batch=4, iters=5, warmup=1)
    parser.add_argument("--src-len", type=int, default=32, help="source tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence")
    args = parser.parse_args(argv)
    common.check_common_args(parser, args, CONFIG_NAMES)
    if min(args.src_len, args.new_tokens) < 1:
        parser.error("--src-len and --new-tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)  # before the first jax computation starts XLA's CPU backend
    jax.config.update("jax_platforms", "cpu")
    print("\n".join(environment_lines(args)), flush=True)
    results = []
    for name in args.config_names:
        results.append(run_case(name, args))
        print(f"{name}: done", flush=True)
    print()
    print(format_table(results))


if __name__ == "__main__":
    main()

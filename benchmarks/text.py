"""Text-model benchmarks on the CPU: CLIP text encoding against transformers' PyTorch CLIP.

Both sides run the same weights (the torch model is written with ``save_pretrained`` and read back
with ``parrot_jax.hub.load_clip_text``) on the same float32 token batch. Ours is ``jax.jit``
compiled (compile time reported on its own, excluded from the timings), torch runs under
``torch.no_grad()``. Medians over ``--iters`` calls; ``torch/ours`` above 1 means ours is faster.
T5 cached decoding is benchmarked by ``benchmarks/t5.py``.

Run: ``python benchmarks/text.py [--batch 8] [--iters 20] [--threads N]``
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence

import jax
import numpy as np
import torch
import transformers
from common import compile_timed, environment_lines, median_ms, pin_threads

from parrot_jax import hub

# name -> CLIPTextConfig kwargs. "base" is the ViT-B/32 text tower, "large" SD 1.5's encoder.
CLIP_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4),
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=8),
    "large": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12),
}


def bench_clip_text(name: str, batch: int, iters: int, warmup: int) -> dict[str, float]:
    """ms per batch for ours and torch, our compile seconds, and the max output difference."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                         **CLIP_CONFIGS[name])
    model = transformers.CLIPTextModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        module, params = hub.load_clip_text(tmp)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49406, (batch, 77)).astype(np.int32)
    ids[:, -1] = 49407  # end-of-text, where pooling reads

    def ours(p, x):
        return module.apply({"params": p}, x)["last_hidden_state"]

    compiled, compile_s = compile_timed(ours, params, ids)
    ours_ms = median_ms(lambda: jax.block_until_ready(compiled(params, ids)), iters, warmup)
    ids_t = torch.from_numpy(ids.astype(np.int64))

    def theirs():
        with torch.no_grad():
            return model(input_ids=ids_t).last_hidden_state

    torch_ms = median_ms(theirs, iters, warmup)
    diff = float(np.abs(np.asarray(compiled(params, ids)) - theirs().numpy()).max())
    return {"ours_ms": ours_ms, "torch_ms": torch_ms, "compile_s": compile_s, "diff": diff}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,base,large")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if not names or set(names) - set(CLIP_CONFIGS):
        parser.error(f"--configs: choose from {', '.join(CLIP_CONFIGS)}")
    pin_threads(args.threads)
    print("\n".join(environment_lines(args.threads, f", transformers {transformers.__version__}")))
    print(f"CLIP text encoder, float32, batch {args.batch} x 77 tokens, median of {args.iters}")
    head = (f"{'config':<8} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>11} "
            f"{'ours tok/s':>11} {'compile s':>10} {'max diff':>9}")
    print(head + "\n" + "-" * len(head))
    for name in names:
        r = bench_clip_text(name, args.batch, args.iters, args.warmup)
        tokens = args.batch * 77 / (r["ours_ms"] / 1e3)
        print(f"{name:<8} {r['ours_ms']:>9.2f} {r['torch_ms']:>9.2f} "
              f"{r['torch_ms'] / r['ours_ms']:>11.2f} {tokens:>11.0f} {r['compile_s']:>10.2f} "
              f"{r['diff']:>9.1e}", flush=True)


if __name__ == "__main__":
    main()

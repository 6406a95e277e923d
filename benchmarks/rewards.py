"""Reward-set benchmark: one jitted RewardSet against evaluating each reward separately.

Parrot's four device rewards on two random CLIP backbones: aesthetics, PickScore and sentiment on
backbone A, the CLIP score on backbone B. The RewardSet runs A once for its three heads; the
reference, measured in the same run, evaluates each reward on its own (a one-head RewardSet per
reward, so A's image tower runs three times, as separate PyTorch scorers would). Both are
``jax.jit`` compiled (compile time excluded), timed as medians over ``--iters`` calls on a batch
of ``--image``-pixel images (resized to the backbone's resolution inside the call) with
77-token prompts. ``separate/set`` above 1 is the saving from sharing backbones.

Run: ``python benchmarks/rewards.py [--configs tiny,medium] [--batch 8] [--threads N]``
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from common import add_common_args, check_common_args, environment_lines, median_ms, pin_threads

from parrot_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from parrot_jax.rewards import (
    LAION_AESTHETIC_DIMS,
    Aesthetic,
    ClipBackbone,
    ClipScore,
    ImageProcessorConfig,
    PickScore,
    RewardInputs,
    RewardSet,
    Sentiment,
    Tokens,
)


def _clip(width: int, layers: int, heads: int, text_width: int, text_layers: int,
          image_size: int, patch: int, projection: int) -> CLIPConfig:
    text = CLIPTextConfig(hidden_size=text_width, intermediate_size=4 * text_width,
                          num_hidden_layers=text_layers, num_attention_heads=text_width // 64,
                          projection_dim=projection)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=heads,
                              image_size=image_size, patch_size=patch, projection_dim=projection)
    return CLIPConfig(text=text, vision=vision, projection_dim=projection)


# name -> (backbone A, backbone B, input image side). "medium": A is ViT-B/32-sized,
# B a 6-layer ViT-S/32; "tiny": small towers on 64-pixel inputs.
CONFIGS = {
    "tiny": (_clip(128, 2, 2, 128, 2, 64, 8, 128), _clip(64, 2, 1, 64, 1, 64, 16, 64), 96),
    "medium": (_clip(768, 12, 12, 512, 12, 224, 32, 512),
               _clip(384, 6, 6, 384, 6, 224, 32, 384), 256),
}


def _backbone(name: str, config: CLIPConfig, seed: int) -> ClipBackbone:
    module = CLIPModel(config)
    params = module.init_params(jax.random.key(seed))
    processor = ImageProcessorConfig.square(config.vision.image_size)
    return ClipBackbone(name, module, params, processor)


def _heads(a: ClipBackbone, b: ClipBackbone) -> list:
    key = jax.random.key(7)
    dims = (a.projection_dim, *LAION_AESTHETIC_DIMS[1:])
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        k = jax.random.fold_in(key, i)
        layers.append({"kernel": jax.random.normal(k, (d_in, d_out)) / np.sqrt(d_in),
                       "bias": jnp.zeros((d_out,))})
    probe = {"weight": jax.random.normal(jax.random.fold_in(key, 99), (3, a.projection_dim)),
             "bias": jnp.zeros((3,))}
    return [Aesthetic(a, layers), PickScore(a), ClipScore(b), Sentiment(a, probe)]


def bench(name: str, batch: int, iters: int, warmup: int) -> dict[str, float]:
    config_a, config_b, side = CONFIGS[name]
    a, b = _backbone("A", config_a, 0), _backbone("B", config_b, 1)
    heads = _heads(a, b)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((batch, side, side, 3), np.float32))
    tokens = {}
    for bb in (a, b):
        ids = rng.integers(1, 49406, (batch, bb.context_length)).astype(np.int32)
        ids[:, 20] = bb.module.config.text.eos_token_id
        tokens[bb.name] = Tokens(jnp.asarray(ids), jnp.ones_like(ids))
    inputs = RewardInputs(images, tokens, {})

    def timed(rs: RewardSet) -> float:
        rs(inputs).block_until_ready()  # compile
        return median_ms(lambda: rs(inputs).block_until_ready(), iters, warmup)

    together = RewardSet(heads)
    set_ms = timed(together)
    separate = [RewardSet([h]) for h in heads]
    sep_ms = [timed(rs) for rs in separate]
    joint = np.asarray(together(inputs))
    alone = np.concatenate([np.asarray(rs(inputs)) for rs in separate], axis=1)
    return {"set_ms": set_ms, "sep_ms": sum(sep_ms), "per_head": sep_ms,
            "diff": float(np.abs(joint - alone).max())}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, list(CONFIGS), batch=8, iters=5, warmup=1)
    args = parser.parse_args(argv)
    check_common_args(parser, args, list(CONFIGS))
    pin_threads(args.threads)
    print("\n".join(environment_lines(args.threads)))
    print(f"4 rewards (aesthetics, PickScore, sentiment on backbone A; CLIP score on B), "
          f"float32, batch {args.batch}, median of {args.iters}")
    head = (f"{'config':<8} {'set ms':>9} {'separate ms':>12} {'separate/set':>13} "
            f"{'set ms/img':>11} {'per-head ms (aes, pick, clip, sent)':>38} {'max diff':>9}")
    print(head + "\n" + "-" * len(head))
    for name in args.config_names:
        r = bench(name, args.batch, args.iters, args.warmup)
        per_head = ", ".join(f"{t:.1f}" for t in r["per_head"])
        print(f"{name:<8} {r['set_ms']:>9.1f} {r['sep_ms']:>12.1f} "
              f"{r['sep_ms'] / r['set_ms']:>13.2f} {r['set_ms'] / args.batch:>11.2f} "
              f"{per_head:>38} {r['diff']:>9.1e}", flush=True)


if __name__ == "__main__":
    main()

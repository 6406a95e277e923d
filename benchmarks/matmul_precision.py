"""How far reduced-precision matmuls push the PPO ratio from 1 before any update, on a CPU.

Accelerators run JAX's default float32 matmuls with fewer mantissa bits: TF32 (10) on recent
GPUs, one bfloat16 pass (7) on TPUs. This emulates that here: every float32 operand of
``lax.dot_general`` and ``lax.conv_general_dilated`` is rounded to nearest-even with that many
bits (straight-through, so gradients flow), products accumulate in float32. For each setting a
fresh process builds the toy run as ``train.py`` does and runs ``--iterations`` Parrot
iterations; printed per setting: the mean ``t2i/clipfrac_first`` and ``t2i/approx_kl_first``
(the first minibatch, scored by the policy that sampled it: numerics only) and approx_kl_first
over the float32 reference's. An emulation, not a GPU or TPU: rounding happens where XLA's
programs put their matmuls, not inside the hardware's accumulators.

    python benchmarks/matmul_precision.py --iterations 3 --bits 23,10,7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = {23: "float32", 10: "TF32", 7: "bfloat16"}


def emulate(bits: int) -> None:
    """Patch jax so float32 matmul / convolution operands keep ``bits`` mantissa bits."""
    import jax
    import jax._src.lax.convolution as convolution
    import jax._src.lax.lax as lax_impl
    import jax.numpy as jnp

    drop = 23 - bits
    keep_mask = jnp.uint32((0xFFFFFFFF >> drop) << drop)

    def rounded(x):
        b = jax.lax.bitcast_convert_type(x, jnp.uint32)
        b = b + jnp.uint32((1 << (drop - 1)) - 1) + ((b >> drop) & jnp.uint32(1))
        return jax.lax.bitcast_convert_type(b & keep_mask, jnp.float32)

    def operand(x):
        if getattr(x, "dtype", None) != jnp.float32:
            return x
        return x + jax.lax.stop_gradient(rounded(x) - x)  # a bitcast has no gradient

    dot, conv = jax.lax.dot_general, jax.lax.conv_general_dilated

    def dot_general(lhs, rhs, *args, **kwargs):
        return dot(operand(lhs), operand(rhs), *args, **kwargs)

    def conv_general_dilated(lhs, rhs, *args, **kwargs):
        return conv(operand(lhs), operand(rhs), *args, **kwargs)

    jax.lax.dot_general = lax_impl.dot_general = dot_general
    jax.lax.conv_general_dilated = convolution.conv_general_dilated = conv_general_dilated
    original_einsum = jnp.einsum
    jnp.einsum = lambda *a, **k: original_einsum(*a, _dot_general=dot_general, **k)


def child(bits: int, iterations: int, config_spec: str) -> dict[str, list[float]]:
    """Run ``iterations`` toy iterations with ``bits``-bit matmul operands (23: unpatched)."""
    if bits < 23:
        emulate(bits)
    import jax

    from parrot_jax import config_files
    from parrot_jax.training import loop

    config = config_files.load(ROOT / config_spec)
    out: dict[str, list[float]] = {"clipfrac_first": [], "approx_kl_first": []}
    with tempfile.TemporaryDirectory() as workdir:
        run, state = loop.setup(config, workdir)
        try:
            for _ in range(iterations):
                state, metrics, _, _ = loop.parrot_iteration(run, state)
                metrics = jax.device_get(metrics)
                for name in out:
                    out[name].append(float(metrics[f"t2i/{name}"]))
        finally:
            run.models.rewards.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--bits", default="23,10,7", help="mantissa bits per setting; 23 first")
    parser.add_argument("--config", default="configs/toy.py")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.iterations, args.config)))
        return
    bits = [int(b) for b in args.bits.split(",")]
    if bits[0] != 23:
        parser.error("--bits must start with 23 (the float32 reference)")
    results = {}
    for b in bits:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(b), "--iterations", str(args.iterations),
             "--config", args.config], capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{NAMES.get(b, b)} run failed:\n{done.stderr[-3000:]}")
        results[b] = json.loads(done.stdout.strip().splitlines()[-1])
    reference = max(sum(results[23]["approx_kl_first"]) / args.iterations, 1e-30)
    print(f"{args.config}, {args.iterations} iterations each")
    print(f"{'operands':<16} {'bits':>4} {'clipfrac_first':>15} {'approx_kl_first':>16} "
          f"{'kl / float32':>13}")
    for b in bits:
        clip = sum(results[b]["clipfrac_first"]) / args.iterations
        kl = sum(results[b]["approx_kl_first"]) / args.iterations
        print(f"{NAMES.get(b, '?'):<16} {b:>4} {clip:>15.3f} {kl:>16.3g} {kl / reference:>13.3g}")


if __name__ == "__main__":
    main()

"""models.conv / models.norm (hand-written backward passes) and host_memory."""

import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import nchw, nhwc
from flax import linen as nn
from jax import lax

from parrot_jax.models import conv
from parrot_jax.models.norm import GroupNorm, group_norm


def _random(*shape, seed=0, loc=0.0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(loc, scale, shape), jnp.float32)


@pytest.mark.parametrize("shape, kernel, dot_routes", [
    ((2, 4, 4, 8, 64), 3, (True, True)),  # 32 pixels, 64 outputs: both gradients as matmuls
    ((1, 5, 7, 6, 80), 3, (True, True)),  # non-square map
    ((1, 6, 6, 4, 80), 5, (True, True)),  # 5x5 kernel
    ((2, 4, 4, 8, 64), 1, (True, True)),  # 1x1 kernel
    ((2, 4, 4, 8, 40), 3, (True, False)),  # col2im input gradient, correlation kernel gradient
    ((2, 8, 8, 16, 4), 3, (False, False)),  # 128 pixels, 4 outputs: both as forward convolutions
    ((1, 6, 5, 3, 4), 5, (False, False)),  # 5x5 kernel, non-square map, forward convolutions
])
def test_same_conv_matches_lax(shape, kernel, dot_routes):
    n, h, w, i, o = shape
    assert (conv.dot_input_grad(n * h * w, o), conv.dot_kernel_grad(n * h * w, o)) == dot_routes
    x, k, dy = _random(n, h, w, i), _random(kernel, kernel, i, o, seed=1), _random(n, h, w, o,
                                                                                  seed=2)
    pad = ((kernel // 2,) * 2,) * 2
    ref_out, ref_vjp = jax.vjp(
        lambda a, b: lax.conv_general_dilated(a, b, (1, 1), pad, dimension_numbers=conv.NHWC),
        x, k)
    out, vjp = jax.vjp(conv.same_conv, x, k)
    np.testing.assert_array_equal(out, ref_out)
    for ours, ref in zip(vjp(dy), ref_vjp(dy)):
        np.testing.assert_allclose(ours, ref, atol=2e-5 * float(jnp.abs(ref).max()))


def _lowered_grads(x, k, platform: str) -> str:
    """StableHLO of both gradients of ``sum(same_conv(x, k) ** 2)`` lowered for ``platform``."""
    grads = jax.grad(lambda a, b: jnp.sum(conv.same_conv(a, b) ** 2), argnums=(0, 1))
    return jax.jit(grads).trace(x, k).lower(lowering_platforms=(platform,)).as_text()


def test_matmul_gradients_on_cpus_only():
    """The matmul gradients (col2im input, im2col kernel) were measured on CPUs: a program
    lowered for a TPU (the planner's AOT compile from this CPU host) keeps XLA's convolutions."""
    x, k = _random(1, 4, 4, 8), _random(3, 3, 8, 64, seed=1)
    assert conv.dot_input_grad(16, 64) and conv.dot_kernel_grad(16, 64)
    cpu, tpu = _lowered_grads(x, k, "cpu"), _lowered_grads(x, k, "tpu")
    assert cpu.count("stablehlo.dot_general") == 2 and cpu.count("stablehlo.convolution") == 1
    assert "stablehlo.dot_general" not in tpu and tpu.count("stablehlo.convolution") == 3


def _conv_specs(hlo: str) -> list[str]:
    """Each convolution's dimension numbers (``[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]``: NHWC,
    HWIO, a forward convolution)."""
    return re.findall(r"dim_numbers = (.+?), window", hlo)


def test_gradients_are_forward_convolutions_on_cpus():
    """Where the matmul forms do not apply, both gradients are forward convolutions (standard
    NHWC / HWIO dimension numbers): XLA:CPU runs its own gradient convolutions 30-50x slower
    inside a loop body. A TPU program keeps XLA's."""
    x, k = _random(2, 8, 8, 16), _random(3, 3, 16, 4, seed=1)
    assert not conv.dot_input_grad(128, 4) and not conv.dot_kernel_grad(128, 4)
    forward = "[b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
    assert _conv_specs(_lowered_grads(x, k, "cpu")) == [forward] * 3  # forward + 2 gradients
    tpu = _conv_specs(_lowered_grads(x, k, "tpu"))
    assert tpu[0] == forward and tpu[1:] != [forward] * 2


def test_same_conv_gradients_in_bfloat16():
    """bfloat16 operands: the forward-convolution gradients agree with XLA's to bfloat16
    rounding, and come back in bfloat16."""
    x, k, dy = (_random(*s, seed=i).astype(jnp.bfloat16)
                for i, s in enumerate(((2, 8, 8, 16), (3, 3, 16, 4), (2, 8, 8, 4))))
    pad = ((1, 1), (1, 1))
    _, ref_vjp = jax.vjp(
        lambda a, b: lax.conv_general_dilated(a, b, (1, 1), pad, dimension_numbers=conv.NHWC),
        x, k)
    _, vjp = jax.vjp(conv.same_conv, x, k)
    for ours, ref in zip(vjp(dy), ref_vjp(dy)):
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                                   atol=2e-2 * float(jnp.abs(ref.astype(jnp.float32)).max()))


def test_conv_general_dilated_routes_only_plain_convolutions():
    x, k = _random(1, 8, 8, 3), _random(3, 3, 3, 5, seed=1)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, conv.NHWC)
    plain = jax.make_jaxpr(lambda a, b: conv.conv_general_dilated(
        a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))(x, k)
    assert "custom_vjp_call" in str(plain)
    for strides, padding in [((2, 2), ((1, 1), (1, 1))), ((1, 1), ((0, 1), (0, 1))),
                             ((1, 1), "SAME")]:
        args = (x, k, strides, padding)
        got = conv.conv_general_dilated(*args, dimension_numbers=dn)
        assert "custom_vjp_call" not in str(
            jax.make_jaxpr(lambda a, b, s=strides, p=padding: conv.conv_general_dilated(
                a, b, s, p, dimension_numbers=dn))(x, k))
        np.testing.assert_array_equal(got, lax.conv_general_dilated(*args,
                                                                    dimension_numbers=dn))


# At 300 +- 0.5 float32 inputs alone cost ~1e-4; E[x^2] - E[x]^2 would be off by percents.
@pytest.mark.parametrize("loc, atol", [(0.0, 2e-5), (300.0, 5e-4)])
def test_group_norm_matches_torch(loc, atol):
    x = _random(2, 6, 5, 16, loc=loc, scale=0.5)
    scale, bias, dy = _random(16, seed=1) + 1, _random(16, seed=2), _random(2, 6, 5, 16, seed=3)
    out, vjp = jax.vjp(lambda a, s, b: group_norm(a, s, b, 4, 1e-5), x, scale, bias)
    tx = nchw(np.array(x)).double().requires_grad_(True)
    ts, tb = (torch.from_numpy(np.array(t)).double().requires_grad_(True) for t in (scale, bias))
    ref = torch.nn.functional.group_norm(tx, 4, ts, tb, 1e-5)
    ref.backward(nchw(np.asarray(dy)).double())
    np.testing.assert_allclose(out, nhwc(ref), atol=atol)
    dx, d_scale, d_bias = vjp(dy)
    np.testing.assert_allclose(dx, nhwc(tx.grad), atol=10 * atol)
    np.testing.assert_allclose(d_scale, ts.grad.numpy(), atol=10 * atol)
    np.testing.assert_allclose(d_bias, tb.grad.numpy(), atol=2e-4)


def test_group_norm_module_like_flax():
    x = _random(2, 4, 4, 8, loc=1.0)
    ours = GroupNorm(4, epsilon=1e-6)
    params = ours.init(jax.random.key(0), x)
    flax_params = nn.GroupNorm(4, epsilon=1e-6).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
    params = jax.tree.map(lambda p: p + _random(*p.shape, seed=4), params)
    np.testing.assert_allclose(ours.apply(params, x), nn.GroupNorm(4, epsilon=1e-6).apply(
        params, x), atol=1e-5)
    half = GroupNorm(4, dtype=jnp.bfloat16).apply(params, x)
    assert half.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3).init(jax.random.key(0), x)


_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    from parrot_jax import host_memory
    if sys.argv[1] == "retain":
        assert host_memory.retain_freed_memory() is None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    for step in range(3):  # what XLA:CPU does each call: malloc, touch, free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(faults)
""")


def test_retain_freed_memory_stops_page_faults_on_reuse():
    """The last of three 64 MiB malloc/touch/free rounds: fresh pages by default (one fault per
    4 KiB page, about 16 k), the same pages again once freed memory is retained."""
    def faults(mode):
        run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                             text=True, check=True)
        return int(run.stdout.split()[-1])

    assert faults("default") > 4000
    assert faults("retain") < 400

"""softmax_attention (custom gradient) against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parrot_jax.models.attention_ops import softmax_attention


@pytest.mark.parametrize("t,s", [(33, 33), (20, 7)])  # self- and cross-attention shapes
def test_values_and_gradients_match_reference(t, s):
    rng = np.random.default_rng(0)
    q = jnp.asarray(3 * rng.standard_normal((2, t, 4, 8)), jnp.float32)  # peaked softmax
    k, v = (jnp.asarray(rng.standard_normal((2, s, 4, 8)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((2, t, 4, 8)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * w)

    ours = jax.jit(jax.value_and_grad(loss(softmax_attention), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.value_and_grad(loss(jax.nn.dot_product_attention),
                                     argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        assert np.abs(np.asarray(b)).max() > 1e-2
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(softmax_attention(q, k, v), jax.nn.dot_product_attention(q, k, v),
                               atol=1e-5)


def test_bfloat16_inputs():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
    out = softmax_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)
    grads = jax.grad(lambda q: jnp.sum(softmax_attention(q, k, v).astype(jnp.float32)))(q)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))


def _dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in ``jaxpr``, nested jaxprs (custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _dot_precisions(inner)
    return found


@pytest.mark.parametrize("dtype,expected", [(jnp.float32, jax.lax.Precision.HIGHEST),
                                            (jnp.bfloat16, jax.lax.Precision.DEFAULT)])
def test_matmul_precision_reaches_float32_einsums_only(dtype, expected):
    """float32 attention follows the ambient precision (the config's ``matmul_precision``);
    bfloat16 operands ask for DEFAULT, the one precision libtpu's fused kernel accepts for them
    (tests/test_plan.py compiles it for a TPU)."""
    q = jnp.ones((1, 4, 2, 8), dtype)
    grad = jax.grad(lambda q, k, v: jnp.sum(softmax_attention(q, k, v).astype(jnp.float32)),
                    argnums=(0, 1, 2))
    with jax.default_matmul_precision("highest"):
        jaxpr = jax.make_jaxpr(grad)(q, q, q).jaxpr
    precisions = _dot_precisions(jaxpr)
    assert len(precisions) == 7  # forward: scores, values; backward: scores, dv, dp, dq, dk
    assert set(precisions) == {(expected, expected)}


# --- model.attention: the implementations against the reference -----------------------------

def _reference_grads(q, k, v, w):
    """Output and (dq, dk, dv) of ``sum(attention * w)`` in float32 at the highest precision."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(
            jax.nn.dot_product_attention(q, k, v, implementation="xla") * w),
            argnums=(0, 1, 2))(*f32), jax.nn.dot_product_attention(*f32)


@pytest.mark.parametrize("heads,head_dim,length,dtype", [
    (1, 40, 256, jnp.float32),  # SD 1.5's first level (320 channels, 8 heads of 40)
    (2, 80, 128, jnp.bfloat16),  # its second level, bfloat16 as sd15.py runs
    (1, 160, 128, jnp.bfloat16),  # its third level: 160 > 128 is zero-padded to 256
    (1, 512, 128, jnp.float32),  # the VAE's single head (upcast to float32)
])
def test_flash_kernel_matches_reference(heads, head_dim, length, dtype):
    """The Pallas TPU flash kernel (interpret mode) at SD 1.5's head sizes: output and
    gradients of q, k and v equal the reference's, in float32 and in bfloat16."""
    from jax.experimental.pallas import tpu as pltpu

    from parrot_jax.models.attention_ops import attend

    keys = jax.random.split(jax.random.key(heads + head_dim), 4)
    q, k, v = (jax.random.normal(kk, (1, length, heads, head_dim)).astype(dtype)
               for kk in keys[:3])
    w = jax.random.normal(keys[3], q.shape)
    (value, grads), out_ref = _reference_grads(q, k, v, w)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(attend, static_argnums=3)(q, k, v, "flash")
        got, got_grads = jax.jit(jax.value_and_grad(
            lambda q, k, v: jnp.sum(attend(q, k, v, "flash").astype(jnp.float32) * w),
            argnums=(0, 1, 2)))(q, k, v)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), out_ref, atol=tol)
    assert abs(float(got - value)) <= tol * float(jnp.sum(jnp.abs(out_ref * w)))
    for a, b in zip(got_grads, grads):
        assert a.dtype == dtype
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=tol * max(scale, 1.0))


def test_flash_runs_per_device_under_a_mesh():
    """Traced on a mesh (``parallel.traced_on``) the kernel runs on each device's rows
    (shard_map), with the same result; a batch that does not split over the devices runs
    replicated, still exact."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from parrot_jax import parallel
    from parrot_jax.models.attention_ops import attend

    mesh = parallel.make_mesh({"data": 4}, jax.devices()[:4])
    for batch in (4, 2):
        q, k, v = (jax.random.normal(kk, (batch, 128, 2, 16))
                   for kk in jax.random.split(jax.random.key(batch), 3))
        _, ref = _reference_grads(q, k, v, jnp.ones_like(q))
        placed = [jax.device_put(x, NamedSharding(mesh, P("data" if batch == 4 else None)))
                  for x in (q, k, v)]
        with pltpu.force_tpu_interpret_mode(), parallel.traced_on(mesh):
            fn = jax.jit(attend, static_argnums=3)
            text = fn.lower(*placed, "flash").as_text()
            out = fn(*placed, "flash")
        assert "shard_map" in text or "sdy.manual_computation" in text
        np.testing.assert_allclose(out, ref, atol=2e-5)


def test_cudnn_applies_only_where_cudnn_takes_the_shapes():
    """'cudnn' takes half-precision heads up to 128 (a multiple of 8); float32 (the VAE's
    upcast attention) and SD 1.5's 160-wide heads take the XLA form, here exactly it."""
    from parrot_jax.models.attention_ops import attend, cudnn_applies

    half = jnp.ones((1, 64, 8, 40), jnp.bfloat16)
    assert cudnn_applies(half, half)
    assert not cudnn_applies(half.astype(jnp.float32), half.astype(jnp.float32))
    wide = jnp.ones((1, 64, 8, 160), jnp.bfloat16)
    assert not cudnn_applies(wide, wide)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 32, 2, 8)) for kk in keys)
    np.testing.assert_array_equal(attend(q, k, v, "cudnn"), softmax_attention(q, k, v))


def test_resolve_by_platform():
    from parrot_jax.models.attention_ops import resolve

    assert [resolve("auto", p) for p in ("tpu", "gpu", "cpu")] == ["flash", "cudnn", "xla"]
    assert resolve("xla", "tpu") == "xla" and resolve("flash", "tpu") == "flash"
    with pytest.raises(ValueError, match="'flash' is a TPU kernel; this is 'cpu'"):
        resolve("flash", "cpu")
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU"):
        resolve("cudnn", "tpu")
    with pytest.raises(ValueError, match="one of"):
        resolve("splash", "tpu")

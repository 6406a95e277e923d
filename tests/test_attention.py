"""softmax_attention (custom gradient) against jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parrot_jax.models.attention import softmax_attention


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

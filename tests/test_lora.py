"""LoRA as a pure transform of parameter trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parrot_jax import hub
from parrot_jax.models.lora import LoRA, init_lora, merge

CROSS_ATTN = r"attn2/(query|key|value|proj_attn)/kernel$"


@pytest.fixture(scope="module")
def unet(sd1_unet):
    return hub.load_unet(sd1_unet[1])


def _inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 16, 16, 4), dtype=np.float32), np.array([50]),
            rng.standard_normal((1, 5, 32), dtype=np.float32))


def test_targets_and_shapes(unet):
    _, params = unet
    lora = init_lora(jax.random.key(1), params, rank=4, alpha=8.0, targets=CROSS_ATTN)
    flat = jax.tree_util.tree_leaves_with_path(lora.factors)
    paths = ["/".join(k.key for k in p) for p, _ in flat]
    # 6 transformers (2 down, 1 mid, 3 up) x 4 projections x (a, b)
    assert all("attn2" in p for p in paths) and len(paths) == 6 * 4 * 2
    q = params["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["query"]["kernel"]
    f = lora.factors["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn2"]["query"]
    assert f["a"].shape == (q.shape[0], 4) and f["b"].shape == (4, q.shape[1])
    assert not np.any(np.asarray(f["b"])) and np.any(np.asarray(f["a"]))


def test_fresh_lora_merges_to_identical_params(unet):
    _, params = unet
    lora = init_lora(jax.random.key(1), params, rank=2, alpha=1.0, targets=CROSS_ATTN)
    merged = jax.jit(merge)(params, lora)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_merge_formula():
    params = {"dense": {"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)}}
    lora = init_lora(jax.random.key(0), params, rank=2, alpha=6.0, targets="dense")
    a = lora.factors["dense"]["a"]
    b = jnp.arange(10, dtype=jnp.float32).reshape(2, 5)
    lora = LoRA({"dense": {"a": a, "b": b}}, alpha=6.0)
    merged = merge(params, lora)
    np.testing.assert_allclose(merged["dense"]["kernel"], 1.0 + 3.0 * np.asarray(a) @ np.asarray(b),
                               rtol=1e-6)
    np.testing.assert_array_equal(merged["dense"]["bias"], params["dense"]["bias"])


def test_gradients_reach_only_lora_and_change_output(unet):
    module, params = unet
    x, t, ctx = _inputs()
    lora = init_lora(jax.random.key(1), params, rank=2, alpha=2.0, targets=CROSS_ATTN)

    def loss(lora, params):
        return jnp.mean(module.apply({"params": merge(params, lora)}, x, t, ctx) ** 2)

    grads = jax.jit(jax.grad(loss))(lora, params)
    assert isinstance(grads, LoRA) and grads.alpha == lora.alpha
    g_b = [np.abs(np.asarray(g)).max() for p, g in jax.tree_util.tree_leaves_with_path(grads)
           if p[-1].key == "b"]
    assert min(g_b) > 0  # B gets gradient although it starts at zero
    # One SGD step on the factors moves the output; the base parameters are untouched inputs.
    stepped = jax.tree_util.tree_map(lambda p, g: p - 1.0 * g, lora, grads)
    assert float(loss(stepped, params)) < float(loss(lora, params))


def test_bad_targets(unet):
    _, params = unet
    with pytest.raises(ValueError, match="match no kernel"):
        init_lora(jax.random.key(0), params, rank=2, alpha=1.0, targets="nonexistent")
    with pytest.raises(ValueError, match="non-Dense kernels: conv_in/kernel"):
        init_lora(jax.random.key(0), params, rank=2, alpha=1.0, targets="conv_in")
    with pytest.raises(ValueError, match="rank must be positive"):
        init_lora(jax.random.key(0), params, rank=0, alpha=1.0, targets=CROSS_ATTN)
    stray = LoRA({"nowhere": {"a": jnp.ones((2, 1)), "b": jnp.ones((1, 2))}})
    with pytest.raises(ValueError, match="LoRA factor nowhere has no kernel"):
        merge(params, stray)

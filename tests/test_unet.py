"""The UNet against diffusers' PyTorch UNet2DConditionModel on tiny random configs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SD1_LIKE_UNET, nchw, nhwc
from diffusers.models.embeddings import get_timestep_embedding

from parrot_jax import hub
from parrot_jax.models.layers import timestep_embedding
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig


def _inputs(cross_dim: int, seed: int = 0, batch: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, 16, 4), dtype=np.float32)
    t = np.array([3, 981][:batch], dtype=np.int64)
    ctx = rng.standard_normal((batch, 7, cross_dim), dtype=np.float32)
    return x, t, ctx


def _torch_out(model, x, t, ctx) -> np.ndarray:
    with torch.no_grad():
        return nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)


@pytest.fixture(scope="module")
def loaded(sd1_unet, sd2_unet):
    """Both tiny UNets loaded from their save_pretrained folders, with a jitted apply each."""
    out = {}
    for name, (model, folder) in {"sd1": sd1_unet, "sd2": sd2_unet}.items():
        module, params = hub.load_unet(folder)
        out[name] = (model, module, params, jax.jit(module.apply))
    return out


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_matches_diffusers(loaded, name):
    model, module, params, apply = loaded[name]
    x, t, ctx = _inputs(module.config.cross_attention_dim[0])
    ref = _torch_out(model, x, t, ctx)
    out = np.asarray(apply({"params": params}, x, t, ctx))
    assert out.shape == x.shape
    assert np.abs(ref).max() > 0.1  # a non-trivial output, so the comparison means something
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def _torch_gradients(model, x, t, ctx, weight, folder):
    """d sum(out * weight) / d (params, sample, context) from torch; the parameter gradients
    come back in our layout by saving them as a checkpoint and loading it with the hub."""
    model.zero_grad(set_to_none=True)
    sample = nchw(x).requires_grad_(True)
    context = torch.from_numpy(ctx).requires_grad_(True)
    out = model(sample, torch.from_numpy(t), context).sample
    (out * nchw(weight)).sum().backward()
    holder = copy.deepcopy(model)
    with torch.no_grad():
        for mine, source in zip(holder.parameters(), model.parameters()):
            mine.copy_(source.grad)
    holder.save_pretrained(folder)
    _, grads = hub.load_unet(folder)
    return grads, nhwc(sample.grad), context.grad.numpy()


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_gradients_match_diffusers(loaded, name, tmp_path):
    """Every backward pass we wrote by hand (convolution input gradients through both of
    models.conv's algorithms, GroupNorm, attention) against torch autograd."""
    model, module, params, _ = loaded[name]
    x, t, ctx = _inputs(module.config.cross_attention_dim[0])
    weight = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    ref_params, ref_x, ref_ctx = _torch_gradients(model, x, t, ctx, weight, tmp_path)

    def loss(p, sample, context):
        return jnp.sum(module.apply({"params": p}, sample, t, context) * weight)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, ctx)
    flat_ours = jax.tree_util.tree_flatten_with_path(grads[0])[0]
    flat_ref = dict(jax.tree_util.tree_flatten_with_path(ref_params)[0])
    assert len(flat_ours) == len(flat_ref)
    pairs = [(jax.tree_util.keystr(k), np.asarray(g), np.asarray(flat_ref[k]))
             for k, g in flat_ours] + [("sample", np.asarray(grads[1]), ref_x),
                                       ("context", np.asarray(grads[2]), ref_ctx)]
    for where, ours, ref in pairs:
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).max() <= 1e-4 * scale + 1e-6, where


def test_fractional_and_scalar_timesteps(loaded):
    model, module, params, apply = loaded["sd1"]
    x, _, ctx = _inputs(32)
    t = np.array([12.5, 12.5], dtype=np.float32)
    with torch.no_grad():
        ref = nhwc(model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    np.testing.assert_allclose(np.asarray(apply({"params": params}, x, t, ctx)), ref, atol=1e-4)
    # A scalar timestep broadcasts over the batch.
    scalar = np.asarray(apply({"params": params}, x, jnp.float32(12.5), ctx))
    np.testing.assert_allclose(scalar, ref, atol=1e-4)


def test_config_reads_attention_head_dim_as_head_count():
    cfg = UNetConfig.from_diffusers({**SD1_LIKE_UNET, "attention_head_dim": [2, 4]})
    assert cfg.num_attention_heads == (2, 4)
    # num_attention_heads, when given, takes precedence over the misnamed field.
    cfg = UNetConfig.from_diffusers({**SD1_LIKE_UNET, "num_attention_heads": 2})
    assert cfg.num_attention_heads == (2, 2)
    assert cfg.layers_per_block == (2, 2) and cfg.cross_attention_dim == (32, 32)


def test_head_split_follows_config():
    """2 heads of 16 and 4 heads of 8 give different functions on the same weights."""
    base = UNetConfig.from_diffusers(SD1_LIKE_UNET)
    x, t, ctx = _inputs(32, batch=1)
    mods = [UNet2DConditionModel(UNetConfig(**{**base.__dict__, "num_attention_heads": (h, h)}))
            for h in (2, 4)]
    params = mods[0].init_params(jax.random.key(1))
    outs = [np.asarray(jax.jit(m.apply)({"params": params}, x, t, ctx)) for m in mods]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3


@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 32), (False, 1, 32), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    t = np.array([0, 1, 17.5, 999], dtype=np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    out = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # sin(999 * f): one float32 ulp of exp(f) moves the argument by ~1e-5.
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
    assert np.abs(np.asarray(out)[:2] - ref[:2]).max() < 1e-6


def _loss_and_grads(module, params):
    x, t, ctx = _inputs(32)

    def loss(p):
        return jnp.mean(module.apply({"params": p}, x, t, ctx) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def plain_grads(loaded):
    _, module, params, _ = loaded["sd1"]
    return _loss_and_grads(module, params)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_remat_same_values_and_grads(loaded, plain_grads, policy):
    _, module, params, _ = loaded["sd1"]
    remat = UNet2DConditionModel(module.config, remat_policy=policy)
    v0, g0 = plain_grads
    v1, g1 = _loss_and_grads(remat, params)
    assert jax.tree_util.tree_structure(g0) == jax.tree_util.tree_structure(g1)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_remat_policy_name_checked():
    for bad in ("everything", "save_only_these_names"):
        with pytest.raises(ValueError, match=f"unknown remat policy '{bad}'"):
            UNet2DConditionModel(UNetConfig.from_diffusers(SD1_LIKE_UNET),
                                 remat_policy=bad).init_params(jax.random.key(0))


def test_bfloat16_activations_float32_params(sd1_unet, loaded):
    model, folder = sd1_unet
    module, params = hub.load_unet(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    x, t, ctx = _inputs(32)
    out = jax.jit(module.apply)({"params": params}, x, t, ctx)
    assert out.dtype == jnp.float32  # follows the sample's dtype
    ref = _torch_out(model, x, t, ctx)
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert 1e-5 < err < 0.05  # really ran in bfloat16, and still the same network


def test_sample_shape_checked(loaded):
    _, module, params, _ = loaded["sd1"]
    with pytest.raises(ValueError, match="divisible by 2"):
        module.apply({"params": params}, np.zeros((1, 15, 16, 4), np.float32),
                     np.zeros((1,)), np.zeros((1, 7, 32), np.float32))


def test_flash_attention_same_values_and_grads(loaded, plain_grads):
    """``attention_impl='flash'`` (the Pallas TPU kernel in interpret mode, on the 256-token
    first level; the 64-token second level takes the XLA form): the loss and parameter
    gradients of the XLA form (which test_gradients_match_diffusers holds to torch's)."""
    from jax.experimental.pallas import tpu as pltpu

    _, module, params, _ = loaded["sd1"]
    flash = module.clone(attention_impl="flash")
    x, t, ctx = _inputs(32)
    with pltpu.force_tpu_interpret_mode():
        jaxpr = str(jax.make_jaxpr(flash.apply)({"params": params}, x, t, ctx))
        v1, g1 = _loss_and_grads(flash, params)
    assert "pallas_call" in jaxpr
    v0, g0 = plain_grads
    np.testing.assert_allclose(v0, v1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)

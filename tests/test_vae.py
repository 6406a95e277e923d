"""The VAE against diffusers' PyTorch AutoencoderKL on a tiny random config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_VAE, nchw, nhwc
from safetensors.numpy import load_file, save_file

from parrot_jax import hub
from parrot_jax.models.vae import AutoencoderKL, VAEConfig


@pytest.fixture(scope="module")
def loaded(tiny_vae):
    model, folder = tiny_vae
    module, params = hub.load_vae(folder)
    return model, module, params


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


def test_encode_matches_diffusers(loaded, images):
    model, module, params = loaded
    with torch.no_grad():
        dist = model.encode(nchw(images)).latent_dist
    mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))(
        params, images)
    assert mean.shape == (2, 8, 8, 4) and logvar.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(np.asarray(mean), nhwc(dist.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), nhwc(dist.logvar), atol=1e-4, rtol=0)


def test_decode_matches_diffusers(loaded):
    model, module, params = loaded
    z = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(model.decode(nchw(z)).sample)
    out = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, z)
    assert out.shape == (2, 16, 16, 3)
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_scaling_factor_exposed_not_applied(tiny_vae, tmp_path, loaded, images):
    import json

    _, folder = tiny_vae
    _, module, params = loaded
    cfg = json.loads((folder / "config.json").read_text())
    assert module.config.scaling_factor == cfg["scaling_factor"] == 0.18215
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    cfg["scaling_factor"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    other, other_params = hub.load_vae(tmp_path)
    assert other.config.scaling_factor == 0.5
    a = module.apply({"params": params}, images, method=module.encode)[0]
    b = other.apply({"params": other_params}, images, method=other.encode)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_legacy_attention_names_load_the_same(tiny_vae, tmp_path, loaded, images):
    """Old checkpoints name the mid-block attention query/key/value/proj_attn, some as 1x1 convs."""
    _, folder = tiny_vae
    _, module, params = loaded
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for key, value in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(new, old)
                if value.ndim == 2:  # the original LDM conversion kept 1x1 conv weights
                    value = value[:, :, None, None]
        legacy[key] = np.ascontiguousarray(value)
    assert any(".query.weight" in k for k in legacy)
    save_file(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    _, legacy_params = hub.load_vae(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(legacy_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reconstruct_with_and_without_noise(loaded, images):
    _, module, params = loaded
    apply = jax.jit(module.apply, static_argnames="method")
    mean_rec = apply({"params": params}, images)
    mean, _ = apply({"params": params}, images, method=module.encode)
    np.testing.assert_allclose(np.asarray(mean_rec),
                               np.asarray(apply({"params": params}, mean, method=module.decode)),
                               atol=1e-6)
    noisy = apply({"params": params}, images, jax.random.key(0))
    assert np.abs(np.asarray(noisy) - np.asarray(mean_rec)).max() > 1e-4


def test_no_attention_variant_has_no_attention_params():
    cfg = VAEConfig.from_diffusers({**TINY_VAE, "mid_block_add_attention": False,
                                    "use_quant_conv": False})
    params = AutoencoderKL(cfg).init_params(jax.random.key(0))
    assert "attentions_0" not in params["encoder"]["mid_block"]
    assert "quant_conv" not in params and "post_quant_conv" in params
    assert jnp.ndim(params["encoder"]["conv_out"]["kernel"]) == 4


def test_flash_attention_decodes_as_diffusers(loaded):
    """``attention_impl='flash'`` (Pallas TPU kernel, interpret mode) in the middle blocks'
    single-head attention: 16 x 16 latents give it 256 tokens. Diffusers' decoding."""
    from jax.experimental.pallas import tpu as pltpu

    model, module, params = loaded
    z = np.random.default_rng(2).standard_normal((1, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(model.decode(nchw(z)).sample)
    flash = module.clone(attention_impl="flash")
    with pltpu.force_tpu_interpret_mode():
        decode = jax.jit(lambda p, z: flash.apply({"params": p}, z, method=flash.decode))
        jaxpr = str(jax.make_jaxpr(decode)(params, z))
        out = decode(params, z)
    assert "pallas_call" in jaxpr
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)

"""The toy VAE and UNet trainers on tiny configs: losses fall, the latent scale is SD's rule,
sampling returns images, and everything is a function of the seed."""

import dataclasses

import jax
import numpy as np
import pytest

from parrot_jax.models.clip import CLIPTextConfig, CLIPTextModel
from parrot_jax.models.random_init import random_params
from parrot_jax.toyworld import captions, render, tokenizers, world
from parrot_jax.toyworld.unet_train import (
    UNetTrainConfig,
    attribute_accuracy,
    draw_captions,
    noise_latents,
    sample_images,
    tokenize,
    train_unet,
)
from parrot_jax.toyworld.vae_train import (
    VAETrainConfig,
    encode_latents,
    psnr,
    render_batch,
    train_vae,
)

SIZE = 16  # tiny images: 16 x 16 -> 8 x 8 latents with one downsampling
VAE_CFG = VAETrainConfig(steps=16, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                         block_out_channels=(8, 8), norm_num_groups=4, image_size=SIZE,
                         eval_images=32, eval_batch_size=32)
UNET_CFG = UNetTrainConfig(steps=20, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                           ema_decay=0.9, train_images=64, block_out_channels=(16,),
                           down_block_types=("CrossAttnDownBlock2D",),
                           up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=2,
                           norm_num_groups=4, eval_captions=32, eval_prompts=4, sample_steps=2,
                           encode_batch_size=32)  # VAE calls on 32 images, as VAE_CFG's


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest: unoptimised XLA


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def vae_run():
    return train_vae(VAE_CFG, seed=0)


@pytest.fixture(scope="module")
def text():
    """(tokenizer, random CLIPTextModel, params): a stand-in for the trained toy text tower."""
    tok = tokenizers.clip_tokenizer()
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=int(tok.model_max_length),
                         eos_token_id=tok.eos_token_id)
    module = CLIPTextModel(cfg)
    return tok, module, random_params(module, 0)


@pytest.fixture(scope="module")
def unet_run(vae_run, text):
    vae, vae_params, _ = vae_run
    tok, encoder, text_params = text
    return train_unet(UNET_CFG, vae, vae_params, encoder, text_params, tok, seed=0,
                      image_size=SIZE)


def test_vae_loss_falls_and_scaling_factor_is_one_over_latent_std(vae_run):
    vae, params, m = vae_run
    assert m["loss_last"] < 0.8 * m["loss_first"]
    assert np.isfinite(m["eval_psnr"]) and m["eval_psnr"] > 0
    assert vae.config.scaling_factor == pytest.approx(m["scaling_factor"])
    assert m["scaling_factor"] == pytest.approx(1.0 / m["latent_std"], rel=1e-5)
    # Fresh renders, scaled: unit variance up to sampling error.
    images = render_batch(np.random.default_rng(7), 32, SIZE)
    z = encode_latents(vae, params, images, jax.random.key(7), batch_size=32)
    assert z.shape == (32, SIZE // 2, SIZE // 2, 4)
    assert np.std(z * vae.config.scaling_factor) == pytest.approx(1.0, rel=0.3)
    assert vae.config.block_out_channels == VAE_CFG.block_out_channels


def test_vae_is_a_function_of_the_seed(vae_run):
    _, params, m = vae_run
    _, again, m2 = train_vae(VAE_CFG, seed=0)
    for a, b in zip(leaves(params), leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert m2["scaling_factor"] == m["scaling_factor"]
    _, other, _ = train_vae(VAE_CFG, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(params), leaves(other)))


def test_psnr():
    x = np.zeros((2, 4, 4, 3), np.float32)
    y = x.copy()
    y[1] += 0.1  # mse 0.01 -> 20 dB
    np.testing.assert_allclose(psnr(x, y), [120.0, 20.0], rtol=1e-6)


@pytest.mark.parametrize("field,value", [("loss", "l3"), ("image_size", 15), ("steps", 0),
                                         ("warmup_steps", 99)])
def test_vae_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(VAE_CFG, **{field: value})


@pytest.mark.parametrize("field,value", [("latents", "mode"), ("caption_dropout", 1.5),
                                         ("ema_decay", 1.0), ("batch_size", 1000)])
def test_unet_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(UNET_CFG, **{field: value})


def test_unet_loss_falls_and_metrics_are_sane(unet_run):
    unet, params, m = unet_run
    assert m["loss_last"] < m["loss_first"]
    assert unet.config.sample_size == SIZE // 2 and unet.config.in_channels == 4
    assert np.isfinite(m["eval_eps_loss"]) and np.isfinite(m["eval_eps_loss_ema"])
    assert m["used_ema"] == float(m["eval_eps_loss_ema"] < m["eval_eps_loss"])
    for prefix in ("sample", "render"):
        for k in ("colour_acc", "shape_acc", "both_acc", "shape_iou", "hue_error"):
            assert 0.0 <= m[f"{prefix}_{k}"] <= 1.0
    assert all(np.isfinite(x).all() for x in leaves(params))


def test_unet_is_a_function_of_the_seed(unet_run, vae_run, text):
    vae, vae_params, _ = vae_run
    tok, encoder, text_params = text
    _, params, m = unet_run
    _, again, m2 = train_unet(UNET_CFG, vae, vae_params, encoder, text_params, tok, seed=0,
                              image_size=SIZE)  # same config: every function is compiled
    for a, b in zip(leaves(params), leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert m2["sample_hue_error"] == m["sample_hue_error"]


def test_sample_images_shape_range_and_seed(unet_run, vae_run, text):
    unet, params, _ = unet_run
    vae, vae_params, _ = vae_run
    tok, encoder, text_params = text
    # As many prompts and steps as UNET_CFG's evaluation: the compiled sampler is reused.
    prompts = ["a red circle", "a blue square on a navy background", "a green ring",
               "a white cross"]
    draw = lambda seed: sample_images(unet, params, vae, vae_params, encoder,  # noqa: E731
                                      text_params, tok, prompts, jax.random.key(seed),
                                      num_steps=2)
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (4, SIZE, SIZE, 3) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_null_prompt_is_tokenised_as_the_loop_does(text):
    tok, encoder, _ = text
    length = encoder.config.max_position_embeddings
    ids = tokenize(tok, ["", "a red circle"], length)
    loop_null = tok([""], padding="max_length", max_length=length)["input_ids"]
    np.testing.assert_array_equal(ids[:1], np.asarray(loop_null, np.int32))
    assert ids.shape == (2, length) and ids[0, 0] == tok.bos_token_id
    with pytest.raises(ValueError, match="context"):
        tokenize(tok, [" ".join(["red"] * 40)], length)


def test_caption_dropout_rate():
    scenes = world.sample_scenes(np.random.default_rng(0), 4000)
    texts = draw_captions(scenes, np.random.default_rng(1), 0.5, 0.1)
    assert 0.08 < np.mean([t == "" for t in texts]) < 0.12
    assert all(t == "" or captions.parse(t).keys() >= {"colour", "shape"} for t in texts)
    assert "" not in draw_captions(world.select(scenes, np.arange(100)),
                                   np.random.default_rng(2), 0.5, 0.0)


def test_noise_latents_keeps_unit_variance():
    import jax.numpy as jnp

    abar = jnp.linspace(0.99, 0.01, 10)
    rng = np.random.default_rng(0)
    x0, noise = (jnp.asarray(rng.standard_normal((10, 32, 32, 4)), jnp.float32) for _ in "ab")
    x_t = np.asarray(noise_latents(abar, x0, noise, jnp.arange(10)))
    np.testing.assert_allclose(x_t.reshape(10, -1).std(1), 1.0, atol=0.05)
    np.testing.assert_allclose(x_t[0], np.sqrt(0.99) * x0[0] + np.sqrt(0.01) * noise[0],
                               rtol=1e-5, atol=1e-6)


def test_attribute_accuracy_reads_the_prompted_colour_and_shape():
    rng = np.random.default_rng(0)
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green cross"]
    fixed = dict(size="large", saturation="vivid", edges="sharp", outline="none",
                 background="black", position="centre")
    images = np.concatenate([render.render(world.sample_scenes(
        rng, 1, {**captions.parse(p), **fixed}), rng) for p in prompts])
    right = attribute_accuracy(images, prompts)
    assert right["colour"].all() and right["shape"].all()
    wrong = attribute_accuracy(images, ["a green square", "a red circle", "a blue cross",
                                        "a yellow triangle"])
    assert not wrong["colour"].any() and not wrong["shape"].any()
    with pytest.raises(ValueError, match="colour and a shape"):
        attribute_accuracy(images[:1], ["a circle"])

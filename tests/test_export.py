"""Exporting our models as diffusers / transformers folders: our loaders read back identical
arrays, and the PyTorch libraries load every key and compute the same outputs."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from conftest import SD2_LIKE_UNET, TINY_FLAN_T5, TINY_T5, TINY_VAE, nchw, nhwc
from flax.traverse_util import flatten_dict
from safetensors import safe_open

from parrot_jax import export, hub
from parrot_jax.convert import CheckpointError, apply_transform, torch_key_to_path
from parrot_jax.data.tokenizer import build_clip_tokenizer
from parrot_jax.diffusion.schedule import DDIMSchedule
from parrot_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
)
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig

TEXT = CLIPTextConfig(vocab_size=40, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=8, eos_token_id=1)
VISION = CLIPVisionConfig(hidden_size=24, intermediate_size=30, num_hidden_layers=1,
                          num_attention_heads=2, image_size=12, patch_size=4, hidden_act="gelu")
# Sequence 0 pads with the end-of-text id 1 (pooling takes its first position).
IDS = np.array([[0, 5, 17, 9, 1, 1, 1, 1], [0, 30, 3, 7, 22, 11, 39, 1]])
MASK = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])
# One small UNet with the config features SD 1 and SD 2 differ in, for the diffusers comparison:
# per-block heads / depth / resnets, 1x1-conv projections, upcast attention, [sin, cos] time
# embedding with a frequency shift, a custom time width.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            layers_per_block=[1, 2], down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
            attention_head_dim=[2, 4], transformer_layers_per_block=[2, 1], norm_num_groups=8,
            upcast_attention=True, flip_sin_to_cos=False, freq_shift=1, time_embedding_dim=40)
SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False, prediction_type="epsilon")


def _random_params(module, seed: int) -> dict:
    """Non-trivial random parameters (norm scales ~1, non-zero biases) without compiling init."""
    shapes = jax.eval_shape(module.init_params, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = 1 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.3 * rng.standard_normal(shape)
        return np.asarray(value, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _build(kind: str, seed: int = 0):
    if kind in ("sd2", "unet"):
        conf = SD2_LIKE_UNET if kind == "sd2" else UNET
        module = UNet2DConditionModel(UNetConfig.from_diffusers(dict(conf)))
    elif kind == "vae":
        module = AutoencoderKL(VAEConfig.from_diffusers(dict(TINY_VAE)))
    elif kind == "text":
        module = CLIPTextModel(TEXT)
    elif kind == "text_proj":
        module = CLIPTextModel(dataclasses.replace(TEXT, projection_dim=16))
    elif kind == "clip":
        module = CLIPModel(CLIPConfig(text=dataclasses.replace(TEXT, projection_dim=16),
                                      vision=dataclasses.replace(VISION, projection_dim=16),
                                      projection_dim=16))
    else:
        module = T5ForConditionalGeneration(T5Config.from_transformers(
            dict(TINY_T5 if kind == "t5" else TINY_FLAN_T5)))
    return module, _random_params(module, seed)


SAVERS = {"sd2": (export.save_unet, hub.load_unet), "unet": (export.save_unet, hub.load_unet),
          "vae": (export.save_vae, hub.load_vae), "text": (export.save_clip_text,
                                                           hub.load_clip_text),
          "text_proj": (export.save_clip_text, hub.load_clip_text),
          "clip": (export.save_clip, hub.load_clip), "t5": (export.save_t5, hub.load_t5),
          "flan": (export.save_t5, hub.load_t5)}


pytestmark = pytest.mark.usefixtures("fast_compiles")  # conftest: unoptimised XLA


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every kind: (our module, our params, the exported folder)."""
    out = {}
    for i, (kind, (save, _)) in enumerate(SAVERS.items()):
        module, params = _build(kind, seed=i)
        folder = save(tmp_path_factory.mktemp(kind) / "model", module, params)
        out[kind] = (module, params, folder)
    return out


def _assert_same(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def _close(ours, ref, atol=1e-4):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert np.abs(ref).max() > 1e-2  # non-trivial outputs, so the comparison means something
    np.testing.assert_allclose(np.asarray(ours), ref, atol=atol, rtol=0)


def _loaded_cleanly(info: dict) -> None:
    for field in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(field), (field, info[field])


# --- keys and layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("key,not_lists", [
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight", ()),
    ("down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.bias", ()),
    ("time_embedding.linear_1.weight", export.UNET_KEYS.not_lists),
    ("encoder.mid_block.attentions.0.to_q.weight", ()),
    ("decoder.block.1.layer.2.DenseReluDense.wi_0.weight", export.T5_KEYS.not_lists),
    ("text_model.encoder.layers.0.self_attn.q_proj.bias", ()),
    ("vision_model.embeddings.class_embedding", ()),
    ("logit_scale", ()),
])
def test_path_to_torch_key_inverts_torch_key_to_path(key, not_lists):
    path = torch_key_to_path(key)
    leaf = {"weight": "kernel"}.get(path[-1], path[-1])  # the loader's first candidate
    assert export.path_to_torch_key(path[:-1] + (leaf,), not_lists) == key


def test_not_lists_matter():
    path = ("time_embedding", "linear_1", "kernel")
    assert export.path_to_torch_key(path) == "time_embedding.linear.1.weight"


@pytest.mark.parametrize("transform,shape", [("conv", (3, 3, 4, 8)), ("transpose", (5, 7)),
                                             ("squeeze_transpose", (5, 7)), ("identity", (6,))])
def test_unapply_transform_inverts_apply(transform, shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    torch_layout = export.unapply_transform(x, transform)
    np.testing.assert_array_equal(apply_transform(torch_layout, transform), x)
    if transform == "conv":
        assert torch_layout.shape == (8, 4, 3, 3)  # OIHW
    if transform == "squeeze_transpose":
        assert torch_layout.shape == (7, 5, 1, 1)


# --- round trips through our loaders ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(SAVERS))
def test_round_trip(exported, kind):
    module, params, folder = exported[kind]
    loaded_module, loaded = SAVERS[kind][1](folder)
    _assert_same(loaded, params)
    expected = module.config
    if kind in ("t5", "flan"):  # the start token is written out (T5's convention: pad)
        expected = dataclasses.replace(expected, decoder_start_token_id=expected.start_token)
    assert loaded_module.config == expected


def test_files_and_configs(exported):
    _, _, unet_folder = exported["sd2"]
    config = json.loads((unet_folder / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    assert config["attention_head_dim"] == [2, 4, 8]  # heads, under diffusers' misnomer
    assert (unet_folder / "diffusion_pytorch_model.safetensors").is_file()
    _, _, t5_folder = exported["flan"]
    with safe_open(t5_folder / "model.safetensors", framework="np") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert {"shared.weight", "lm_head.weight",
            "decoder.block.0.layer.2.DenseReluDense.wi_1.weight"} <= keys
    assert not any("embed_tokens" in k for k in keys)
    _, _, text_folder = exported["text"]
    with safe_open(text_folder / "model.safetensors", framework="np") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # SD's text_encoder layout


# --- PyTorch reads the folders ---------------------------------------------------------------


def test_diffusers_unet(exported):
    import diffusers

    module, params, folder = exported["unet"]
    model, info = diffusers.UNet2DConditionModel.from_pretrained(folder, output_loading_info=True)
    _loaded_cleanly(info)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    t = np.array([3, 981])
    ctx = rng.standard_normal((2, 5, module.config.cross_attention_dim[0]), dtype=np.float32)
    with torch.no_grad():
        ref = nhwc(model.eval()(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    _close(jax.jit(module.apply)({"params": params}, x, t, ctx), ref)


def test_diffusers_vae(exported):
    import diffusers

    module, params, folder = exported["vae"]
    model, info = diffusers.AutoencoderKL.from_pretrained(folder, output_loading_info=True)
    _loaded_cleanly(info)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        mean_ref = nhwc(model.eval().encode(nchw(images)).latent_dist.mean)
        decoded_ref = nhwc(model.decode(torch.from_numpy(
            np.ascontiguousarray(np.transpose(mean_ref, (0, 3, 1, 2))))).sample)
    mean, _ = jax.jit(module.apply, static_argnames="method")(
        {"params": params}, images, method=module.encode)
    _close(mean, mean_ref)
    decoded = jax.jit(module.apply, static_argnames="method")(
        {"params": params}, mean_ref, method=module.decode)
    _close(decoded, decoded_ref)


@pytest.mark.parametrize("kind", ["text", "text_proj"])
def test_transformers_clip_text(exported, kind):
    import transformers

    module, params, folder = exported[kind]
    cls = (transformers.CLIPTextModel if kind == "text"
           else transformers.CLIPTextModelWithProjection)
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    _loaded_cleanly(info)
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK))
    out = jax.jit(module.apply)({"params": params}, IDS, MASK)
    _close(out["last_hidden_state"], ref.last_hidden_state)
    if kind == "text":
        _close(out["pooler_output"], ref.pooler_output)
    else:
        _close(out["text_embeds"], ref.text_embeds)


def test_transformers_clip_model(exported):
    import transformers

    module, params, folder = exported["clip"]
    model, info = transformers.CLIPModel.from_pretrained(folder, output_loading_info=True)
    _loaded_cleanly(info)
    pixels = np.random.default_rng(2).standard_normal((3, 12, 12, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK),
                           pixel_values=nchw(pixels))
    out = jax.jit(module.apply)({"params": params}, IDS, pixels, MASK)
    _close(out["logits_per_image"], ref.logits_per_image)
    _close(out["text_embeds"], ref.text_embeds)
    _close(out["image_embeds"], ref.image_embeds)


@pytest.mark.parametrize("kind", ["t5", "flan"])
def test_transformers_t5(exported, kind):
    import transformers

    module, params, folder = exported[kind]
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True)
    _loaded_cleanly(info)
    assert (model.lm_head.weight is model.shared.weight) == (kind == "t5")
    rng = np.random.default_rng(3)
    ids, dec = rng.integers(2, 100, (2, 12)), rng.integers(2, 100, (2, 6))
    mask, dec_mask = np.ones_like(ids), np.ones_like(dec)
    mask[1, 8:] = 0
    dec[:, 0] = 0
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                           decoder_input_ids=torch.from_numpy(dec)).logits
    _close(jax.jit(module.apply)({"params": params}, ids, mask, dec, dec_mask), ref)


# --- pipeline, options, refusals -------------------------------------------------------------


def test_pipeline(exported, tmp_path):
    unet, unet_params, _ = exported["unet"]
    vae, vae_params, _ = exported["vae"]
    tokenizer = build_clip_tokenizer(["a red circle", "a blue square, soft", "<reward 1>"], 8)
    text_encoder = CLIPTextModel(dataclasses.replace(
        TEXT, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, hidden_size=24))
    text_params = _random_params(text_encoder, 7)
    root = export.save_pipeline(
        tmp_path / "sd", unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
        text_encoder=text_encoder, text_params=text_params, tokenizer=tokenizer,
        scheduler_config=SCHEDULER)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    # What loading.load_models does with config.model.pretrained=root.
    _assert_same(hub.load_unet(root, subfolder="unet")[1], unet_params)
    _assert_same(hub.load_vae(root, subfolder="vae")[1], vae_params)
    _, loaded_text = hub.load_clip_text(root, subfolder="text_encoder")
    _assert_same(loaded_text, text_params)
    loaded_tok = hub.load_tokenizer(root, subfolder="tokenizer")
    assert loaded_tok("a red circle")["input_ids"] == tokenizer("a red circle")["input_ids"]
    schedule = DDIMSchedule.from_pretrained(root, 10)
    reference = DDIMSchedule.from_config(SCHEDULER, 10)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), np.asarray(reference.timesteps))
    np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod),
                                  np.asarray(reference.alphas_cumprod))
    # Parts that do not fit are refused before anything is written.
    with pytest.raises(ValueError, match="unet in_channels 4 != vae latent_channels 3"):
        bad_vae = AutoencoderKL(dataclasses.replace(vae.config, latent_channels=3))
        export.save_pipeline(tmp_path / "bad", unet=unet, unet_params=unet_params, vae=bad_vae,
                             vae_params=vae_params, text_encoder=text_encoder,
                             text_params=text_params, tokenizer=tokenizer,
                             scheduler_config=SCHEDULER)
    assert not (tmp_path / "bad").exists()


def test_float16(exported, tmp_path):
    module, params, folder = exported["vae"]
    half = export.save_vae(tmp_path / "half", module, params, dtype="float16")
    name = "diffusion_pytorch_model.safetensors"
    ratio = (half / name).stat().st_size / (folder / name).stat().st_size
    assert 0.45 < ratio < 0.55
    with safe_open(half / name, framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    _, loaded = hub.load_vae(half)
    rounded = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.float16)
                                     .astype(np.float32), params)
    _assert_same(loaded, rounded)
    with pytest.raises(ValueError, match="dtype='int8'"):
        export.save_vae(tmp_path / "int8", module, params, dtype="int8")
    big = jax.tree_util.tree_map(np.asarray, params)
    big["encoder"]["conv_in"]["bias"] = big["encoder"]["conv_in"]["bias"] + 1e6
    with pytest.raises(CheckpointError, match="encoder/conv_in/bias has values outside"):
        export.save_vae(tmp_path / "big", module, big, dtype="float16")


def test_overwrite(exported, tmp_path):
    module, params, _ = exported["vae"]
    folder = export.save_vae(tmp_path / "vae", module, params)
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export.save_vae(folder, module, params)
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"stale")
    (folder / "README.md").write_text("kept")
    doubled = jax.tree_util.tree_map(lambda x: 2 * np.asarray(x), params)
    export.save_vae(folder, module, doubled, overwrite=True)
    _assert_same(hub.load_vae(folder)[1], doubled)
    assert not (folder / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (folder / "README.md").read_text() == "kept"


def test_self_check_fails_loudly(exported, tmp_path):
    module, params, _ = exported["flan"]
    broken = jax.tree_util.tree_map(np.asarray, params)
    del broken["lm_head"]
    with pytest.raises(CheckpointError, match="missing parameter.*lm_head/kernel"):
        export.save_t5(tmp_path / "a", module, broken)
    broken = jax.tree_util.tree_map(np.asarray, params)
    broken["shared"]["embedding"] = broken["shared"]["embedding"][:-1]
    with pytest.raises(CheckpointError, match=r"shape mismatch.*shared\.weight \(99, 32\)"):
        export.save_t5(tmp_path / "a", module, broken)
    with pytest.raises(TypeError, match="save_unet module: expected a UNet2DConditionModel"):
        export.save_unet(tmp_path / "b", module, params)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

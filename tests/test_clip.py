"""CLIP text / vision / dual encoder against transformers' PyTorch CLIP on tiny random configs."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers as tf

from parrot_jax import hub
from parrot_jax.convert import CheckpointError
from parrot_jax.models.config import ConfigError

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
            bos_token_id=97, eos_token_id=98, pad_token_id=98)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=30, patch_size=6, hidden_act="gelu")
# Sequence 0 is padded with the end-of-text id (as SD's tokenizer pads): pooling must take the
# first end-of-text position. Sequence 1 fills the context.
IDS = np.array([[97, 5, 60, 7, 98, 98, 98, 98], [97, 9, 10, 96, 12, 13, 14, 98]])
MASK = np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])


def _save(model, tmp_path_factory, name):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name)
    model.eval().save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def full_clip(tmp_path_factory):
    torch.manual_seed(0)
    config = tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model, folder = _save(tf.CLIPModel(config), tmp_path_factory, "clip")
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # not the init value, so loading it is checked
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).standard_normal((2, 30, 30, 3)).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _nchw(x):
    return _t(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _close(ours, ref, atol=1e-4):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(np.asarray(ours), ref, atol=atol, rtol=0)


def test_clip_model_logits_and_features(full_clip, pixels):
    model, folder = full_clip
    module, params = hub.load_clip(folder)
    assert float(params["logit_scale"]) == pytest.approx(3.1)
    with torch.no_grad():
        ref = model(input_ids=_t(IDS), attention_mask=_t(MASK), pixel_values=_nchw(pixels))
        text_ref = model.get_text_features(input_ids=_t(IDS), attention_mask=_t(MASK))
        image_ref = model.get_image_features(pixel_values=_nchw(pixels))
    out = jax.jit(module.apply)({"params": params}, IDS, pixels, MASK)
    _close(out["logits_per_image"], ref.logits_per_image)
    _close(out["logits_per_text"], ref.logits_per_text)
    text = module.apply({"params": params}, IDS, MASK, method=module.get_text_features)
    image = module.apply({"params": params}, pixels, method=module.get_image_features)
    _close(text, text_ref.pooler_output)  # projected and unnormalised
    _close(image, image_ref.pooler_output)


def test_text_tower_from_full_folder(full_clip):
    model, folder = full_clip
    module, params = hub.load_clip_text(folder)
    assert "vision_model" not in params and "text_projection" in params
    with torch.no_grad():
        ref = model.text_model(input_ids=_t(IDS), attention_mask=_t(MASK))
        embeds = model.text_projection(ref.pooler_output)
    out = jax.jit(module.apply)({"params": params}, IDS, MASK)
    _close(out["last_hidden_state"], ref.last_hidden_state)
    _close(out["pooler_output"], ref.pooler_output)
    _close(out["text_embeds"], embeds)


def test_vision_tower_from_full_folder(full_clip, pixels):
    model, folder = full_clip
    module, params = hub.load_clip_vision(folder)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=_nchw(pixels))
    out = jax.jit(module.apply)({"params": params}, pixels)
    assert out["last_hidden_state"].shape == (2, 1 + 25, 32)
    _close(out["last_hidden_state"], ref.last_hidden_state)
    _close(out["image_embeds"], model.visual_projection(ref.pooler_output))


@pytest.mark.parametrize("cls", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_text_model_folders(tmp_path_factory, cls):
    """SD's text encoder (no projection) and the projected variant; a legacy eos id of 2."""
    torch.manual_seed(1)
    config = tf.CLIPTextConfig(**{**TEXT, "projection_dim": 20})
    model, folder = _save(getattr(tf, cls)(config), tmp_path_factory, cls)
    module, params = hub.load_clip_text(folder)
    with torch.no_grad():
        ref = model(input_ids=_t(IDS), attention_mask=_t(MASK))
    out = module.apply({"params": params}, IDS, MASK)
    _close(out["last_hidden_state"], ref.last_hidden_state)
    if cls == "CLIPTextModel":
        assert "text_embeds" not in out and "text_projection" not in params
        _close(out["pooler_output"], ref.pooler_output)
    else:
        _close(out["text_embeds"], ref.text_embeds)

    # Pre-2023 configs carry eos_token_id=2 and pool at argmax(input_ids) instead.
    legacy = {**json.loads((folder / "config.json").read_text()), "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(legacy))
    module, params = hub.load_clip_text(folder)
    model.config.eos_token_id = 2
    getattr(model, "text_model", model).eos_token_id = 2
    with torch.no_grad():
        ref = model(input_ids=_t(IDS), attention_mask=_t(MASK))
    out = module.apply({"params": params}, IDS, MASK)
    key = "pooler_output" if cls == "CLIPTextModel" else "text_embeds"
    _close(out[key], getattr(ref, key))


def test_prefixed_and_bare_text_encoder_keys_load_alike(tmp_path_factory):
    """transformers >= 5 saves a bare CLIPTextModel without the ``text_model.`` prefix that SD
    checkpoints (written by older versions) carry; both must load to the same parameters."""
    from safetensors.numpy import load_file, save_file

    torch.manual_seed(3)
    _, folder = _save(tf.CLIPTextModel(tf.CLIPTextConfig(**TEXT)), tmp_path_factory, "bare")
    tensors = load_file(folder / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in tensors)
    old = tmp_path_factory.mktemp("prefixed")
    (old / "config.json").write_bytes((folder / "config.json").read_bytes())
    prefixed = {f"text_model.{k}": v for k, v in tensors.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(16)[None]  # an old buffer
    save_file(prefixed, old / "model.safetensors")
    _, a = hub.load_clip_text(folder)
    _, b = hub.load_clip_text(old)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_vision_with_projection_folder(tmp_path_factory, pixels):
    torch.manual_seed(2)
    config = tf.CLIPVisionConfig(**{**VISION, "projection_dim": 20})
    model, folder = _save(tf.CLIPVisionModelWithProjection(config), tmp_path_factory, "vis")
    module, params = hub.load_clip_vision(folder)
    with torch.no_grad():
        ref = model(pixel_values=_nchw(pixels))
    _close(module.apply({"params": params}, pixels)["image_embeds"], ref.image_embeds)


def test_bad_inputs(full_clip, tmp_path, pixels):
    _, folder = full_clip
    module, params = hub.load_clip_text(folder)
    with pytest.raises(ValueError, match="at most 16"):
        module.apply({"params": params}, np.zeros((1, 17), np.int32))
    vision, vparams = hub.load_clip_vision(folder)
    with pytest.raises(ValueError, match=r"NHWC\); got \(2, 3, 30, 30\)"):
        vision.apply({"params": vparams}, np.transpose(pixels, (0, 3, 1, 2)))
    with pytest.raises(CheckpointError, match="model_type 'clip_text_model' is not one of clip$"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
        hub.load_clip(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = "swish"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config.json text_config: hidden_act='swish'"):
        hub.load_clip(tmp_path)

"""Loading diffusers folders: layouts (sharded, variants, msgpack, pipelines, hub cache) and the
errors for bad input, each of which must name the file and key at fault."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import load_file, save_file

from parrot_jax import hub
from parrot_jax.convert import CheckpointError
from parrot_jax.models.config import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def reference(sd1_unet):
    """The tiny SD-1-like UNet folder, its tensors, and the params loaded from it."""
    _, folder = sd1_unet
    _, params = hub.load_unet(folder)
    return folder, load_file(folder / WEIGHTS), params


def _folder(tmp_path, reference, tensors=None, config_edit=None, weights_name=WEIGHTS):
    """A copy of the reference folder with edited tensors / config."""
    src, ref_tensors, _ = reference
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config.update(config_edit)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tensors is not False:
        save_file(ref_tensors if tensors is None else tensors, tmp_path / weights_name)
    return tmp_path


def _assert_same(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- layouts -------------------------------------------------------------------------------


def test_sharded_index(tmp_path, reference):
    _, tensors, params = reference
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder = _folder(tmp_path, reference, tensors=False)
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, folder / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / (WEIGHTS + ".index.json")).write_text(json.dumps(index))
    _, loaded = hub.load_unet(folder)
    _assert_same(loaded, params)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is listed"):
        hub.load_unet(folder)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_variant_half_precision(tmp_path, reference, dtype):
    import ml_dtypes

    _, tensors, params = reference
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    half = {k: v.astype(np_dtype) for k, v in tensors.items()}
    folder = _folder(tmp_path, reference, tensors=half,
                     weights_name="diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(CheckpointError, match="no weights found"):
        hub.load_unet(folder)  # the plain name is absent: no silent pick of the variant
    _, loaded = hub.load_unet(folder, variant="fp16")
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np_dtype)
                                      .astype(np.float32))
    _, as_bf16 = hub.load_unet(folder, variant="fp16", param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(as_bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_flax_msgpack(tmp_path, reference):
    _, _, params = reference
    folder = _folder(tmp_path, reference, tensors=False)
    (folder / "diffusion_flax_model.msgpack").write_bytes(serialization.to_bytes(params))
    _, loaded = hub.load_unet(folder)
    _assert_same(loaded, params)
    broken = jax.tree_util.tree_map(np.asarray, params)
    del broken["conv_in"]["bias"]
    (folder / "diffusion_flax_model.msgpack").write_bytes(serialization.msgpack_serialize(broken))
    with pytest.raises(CheckpointError, match=r"flax_model\.msgpack.*missing: conv_in/bias"):
        hub.load_unet(folder)


def test_pipeline_subfolder(tmp_path, reference):
    _, _, params = reference
    _folder(tmp_path / "unet", reference)
    (tmp_path / "model_index.json").write_text("{}")
    _, loaded = hub.load_unet(tmp_path, subfolder="unet")
    _assert_same(loaded, params)
    with pytest.raises(CheckpointError, match="pipeline folder: pass subfolder='unet'"):
        hub.load_unet(tmp_path)
    with pytest.raises(CheckpointError, match="vae: not a folder"):
        hub.load_vae(tmp_path, subfolder="vae")


def test_hub_id_from_local_cache(tmp_path, reference, monkeypatch):
    """A hub id resolves through huggingface_hub; here offline, from a populated cache."""
    import huggingface_hub.constants as hf_constants

    _, _, params = reference
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _folder(repo / "snapshots" / commit / "unet", reference)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    _, loaded = hub.load_unet("someone/tiny-sd", subfolder="unet")
    _assert_same(loaded, params)
    with pytest.raises(CheckpointError, match="hub repo 'someone/absent'.*config.json"):
        hub.load_unet("someone/absent", subfolder="unet")


# --- bad input -----------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        hub.load_unet(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path}: missing config.json"):
        hub.load_unet(tmp_path)


def test_invalid_json_names_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "in_channels": 4,\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        hub.load_unet(tmp_path)


@pytest.mark.parametrize("edit,match", [
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]}, "down_block_types"),
    ({"attention_head_dim": [2, 4, 8]}, r"needs 2 entries"),
    ({"norm_num_groups": 7}, "not divisible by norm_num_groups=7"),
    ({"some_new_option": 1}, "unknown keys: some_new_option"),
    ({"act_fn": "mish"}, "act_fn='mish'"),
])
def test_unsupported_config_values(tmp_path, reference, edit, match):
    folder = _folder(tmp_path, reference, tensors=False, config_edit=edit)
    with pytest.raises(ConfigError, match=match) as err:
        hub.load_unet(folder)
    assert str(folder / "config.json") in str(err.value)


def test_problems_reported_together(tmp_path, reference):
    folder = _folder(tmp_path, reference, tensors=False,
                     config_edit={"dual_cross_attention": True, "act_fn": "mish"})
    with pytest.raises(ConfigError, match="act_fn='mish'.*dual_cross_attention=True"):
        hub.load_unet(folder)


def test_no_weights_and_bin_hint(tmp_path, reference):
    folder = _folder(tmp_path, reference, tensors=False)
    with pytest.raises(CheckpointError, match="no weights found.*diffusion_pytorch_model"):
        hub.load_unet(folder)
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="convert it to safetensors"):
        hub.load_unet(folder)


def test_missing_unexpected_and_mismatched_keys(tmp_path, reference):
    _, tensors, _ = reference
    edited = dict(tensors)
    del edited["conv_in.bias"]
    edited["extra.weight"] = np.zeros(3, np.float32)
    edited["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
    folder = _folder(tmp_path, reference, tensors=edited)
    with pytest.raises(CheckpointError) as err:
        hub.load_unet(folder)
    msg = str(err.value)
    assert str(folder / WEIGHTS) in msg
    assert "1 missing parameter(s)" in msg and "conv_in/bias" in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    assert "conv_out.weight (4, 32, 1, 1) -> conv_out/kernel (3, 3, 32, 4)" in msg
    assert "conv_out/kernel," not in msg.split("missing")[1].split(";")[0]  # reported once


def test_weights_from_another_config(tmp_path, reference):
    """Weights of another width: each mis-shaped cross-attention projection is named."""
    folder = _folder(tmp_path, reference, config_edit={"cross_attention_dim": 48})
    expected = (r"attn2.to_k.weight \(32, 32\) -> "
                r"down_blocks_0/attentions_0/transformer_blocks_0/attn2/key/kernel \(48, 32\)")
    with pytest.raises(CheckpointError, match=expected):
        hub.load_unet(folder)


def test_conv_projections_into_linear_config(tmp_path, reference, sd1_unet):
    """1x1-conv proj_in/out weights load into a linear-projection model: the same function."""
    folder = _folder(tmp_path, reference, config_edit={"use_linear_projection": True})
    linear, params = hub.load_unet(folder)
    conv, conv_params = hub.load_unet(sd1_unet[1])
    assert params["mid_block"]["attentions_0"]["proj_in"]["kernel"].ndim == 2
    x = np.random.default_rng(0).standard_normal((1, 16, 16, 4), dtype=np.float32)
    t, ctx = np.array([10]), np.ones((1, 3, 32), np.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(linear.apply)({"params": params}, x, t, ctx)),
                               np.asarray(jax.jit(conv.apply)({"params": conv_params}, x, t, ctx)),
                               atol=1e-5)


def test_corrupt_safetensors(tmp_path, reference):
    folder = _folder(tmp_path, reference, tensors=False)
    (folder / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        hub.load_unet(folder)


def test_loading_leaves_files_untouched(tmp_path, reference):
    _, tensors, _ = reference
    good = _folder(tmp_path / "good", reference)
    bad = _folder(tmp_path / "bad", reference, tensors={**tensors, "x.bias": np.zeros(1)})

    def snapshot():
        return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")
                if p.is_file()}

    before = snapshot()
    hub.load_unet(good)
    with pytest.raises(CheckpointError, match="x.bias"):
        hub.load_unet(bad)
    assert snapshot() == before

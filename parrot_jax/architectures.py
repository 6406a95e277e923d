"""Architectures (config.json contents, no weights) of the public models our configs name.

The AOT planner (``parrot_jax.plan``) needs only shapes, so it can plan a run for a model whose
weights are not on this machine. A local folder's own config.json always wins; these copies of
the hub's config files cover the default hub ids offline. ``tests/test_architectures.py``
checks them against the reference libraries' parameter counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# <pipeline>/unet/config.json, vae/config.json, text_encoder/config.json and
# scheduler/scheduler_config.json of Stable Diffusion 1.5.
SD15 = {
    "unet": dict(
        _class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8,
        block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
        cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
        layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32,
        out_channels=4, sample_size=64,
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "vae": dict(
        _class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
        layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
        up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215),
    "text_encoder": dict(
        architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_act="quick_gelu",
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, vocab_size=49408, bos_token_id=0, eos_token_id=2,
        projection_dim=768, layer_norm_eps=1e-05),
    "scheduler": dict(
        _class_name="PNDMScheduler", beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", num_train_timesteps=1000, set_alpha_to_one=False,
        skip_prk_steps=True, steps_offset=1, clip_sample=False, trained_betas=None,
        prediction_type="epsilon"),
}

# config.json of google/flan-t5-base.
FLAN_T5_BASE = dict(
    architectures=["T5ForConditionalGeneration"], model_type="t5", d_ff=2048, d_kv=64,
    d_model=768, decoder_start_token_id=0, dropout_rate=0.1, eos_token_id=1,
    feed_forward_proj="gated-gelu", initializer_factor=1.0, is_encoder_decoder=True,
    layer_norm_epsilon=1e-06, n_positions=512, num_decoder_layers=12, num_heads=12,
    num_layers=12, pad_token_id=0, relative_attention_max_distance=128,
    relative_attention_num_buckets=32, tie_word_embeddings=False, vocab_size=32128)

PIPELINES: dict[str, dict[str, dict[str, Any]]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
    "runwayml/stable-diffusion-v1-5": SD15,
}
T5_MODELS: dict[str, dict[str, Any]] = {"google/flan-t5-base": FLAN_T5_BASE}


def _clip(text: dict[str, Any], vision: dict[str, Any], projection_dim: int,
          act: str) -> dict[str, Any]:
    """A ``CLIPModel`` config.json from its towers' sizes (224-px images, CLIP's vocabulary)."""
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=projection_dim,
                text_config=dict(vocab_size=49408, max_position_embeddings=77, hidden_act=act,
                                 layer_norm_eps=1e-5, **text),
                vision_config=dict(image_size=224, num_channels=3, hidden_act=act,
                                   layer_norm_eps=1e-5, **vision))


def _tower(hidden: int, layers: int, heads: int, **extra: int) -> dict[str, int]:
    return dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, **extra)


# config.json of the reward backbones (parrot_jax.rewards.configs): OpenAI's ViT-L/14 and
# ViT-B/32, and PickScore's OpenCLIP ViT-H/14.
CLIP_MODELS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14": _clip(_tower(768, 12, 12),
                                           _tower(1024, 24, 16, patch_size=14), 768,
                                           "quick_gelu"),
    "yuvalkirstain/PickScore_v1": _clip(_tower(1024, 24, 16), _tower(1280, 32, 16, patch_size=14),
                                        1024, "gelu"),
    "openai/clip-vit-base-patch32": _clip(_tower(512, 12, 8), _tower(768, 12, 12, patch_size=32),
                                          512, "quick_gelu"),
}


# --- lookups: a folder's own file first, then these copies, then the hub's file --------------

def _read_json(path: Path, field: str, source: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config.{field}={source!r}: no {path}")
    return json.loads(path.read_text())


def _from_hub(source: str, subfolder: str | None, filename: str | None = None) -> dict[str, Any]:
    from parrot_jax import hub  # downloads one small json file, for an id not covered here

    if filename is None:
        return hub.read_config(hub.ModelSource(source, subfolder, None))[0]
    return json.loads(hub.ModelSource(source, subfolder, None).require(filename).read_text())


def pipeline_component(root: str, name: str, field: str = "model.pretrained") -> dict[str, Any]:
    """``<root>/<name>/config.json`` of a diffusers pipeline (``name``: unet, vae,
    text_encoder; 'scheduler' reads scheduler_config.json)."""
    filename = "scheduler_config.json" if name == "scheduler" else "config.json"
    folder = Path(root).expanduser()
    if folder.exists():
        return _read_json(folder / name / filename, field, root)
    if root in PIPELINES:
        return PIPELINES[root][name]
    return _from_hub(root, name, filename if name == "scheduler" else None)


def _model_config(source: str, known: dict[str, dict[str, Any]], field: str) -> dict[str, Any]:
    folder = Path(source).expanduser()
    if folder.exists():
        return _read_json(folder / "config.json", field, source)
    if source in known:
        return known[source]
    return _from_hub(source, None)


def t5_config(source: str, field: str = "model.pen") -> dict[str, Any]:
    """config.json of a T5 folder or hub id."""
    return _model_config(source, T5_MODELS, field)


def clip_config(source: str, field: str = "model.rewards") -> dict[str, Any]:
    """config.json of a CLIPModel folder or hub id."""
    return _model_config(source, CLIP_MODELS, field)

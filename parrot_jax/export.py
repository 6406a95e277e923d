"""Write our linen models as diffusers / transformers folders: the inverse of ``parrot_jax.hub``.

Each ``save_*`` writes ``config.json`` and one safetensors file in PyTorch layout, so the same
folder loads with ``hub.load_*`` and with ``from_pretrained`` of diffusers / transformers.
``save_pipeline`` writes a Stable Diffusion pipeline root (``model_index.json``, ``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``). No torch: numpy, safetensors, json.

Keys: our path ``('down_blocks_0', 'attentions_1', 'proj_attn', 'kernel')`` becomes
``down_blocks.0.attentions.1.to_out.0.weight``. A trailing ``_<digit>`` marks a list index except
in the few names of each family that really end so (``linear_1``, ``wi_0``). Every export is
self-checked: ``convert.plan_conversion`` (what the loaders run) must map the written keys and
shapes back to exactly the paths and layouts they came from, or nothing is written.
To export a LoRA fine-tuned PEN, merge the adapters first (``parrot_jax.models.lora.merge``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from parrot_jax.convert import CheckpointError, plan_conversion
from parrot_jax.hub import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, clip_tower_key_fn
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

__all__ = [
    "CLIP_KEYS", "CLIP_TEXT_KEYS", "DTYPES", "KeyScheme", "T5_KEYS", "UNET_KEYS", "VAE_KEYS",
    "clip_config_dict", "clip_text_config_dict",
    "clip_vision_config_dict", "path_to_torch_key", "save_clip", "save_clip_text",
    "save_pipeline", "save_t5", "save_unet", "save_vae", "t5_config_dict", "to_torch_layout",
    "torch_state_dict", "unapply_transform", "unet_config_dict", "vae_config_dict",
]

ParamPath = tuple[str, ...]

# Storage dtypes a folder may be written in (parameters are cast on the way out).
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Our module names -> torch ones: the inverse of convert's attention renames.
_INVERSE_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
# Our leaf names -> torch's (kernel, LayerNorm/RMSNorm scale and Embed table are all "weight").
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_LIST_ITEM = re.compile(r"(.+)_(\d+)")
_SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


@dataclasses.dataclass(frozen=True)
class KeyScheme:
    """How one model family's torch keys relate to our parameter paths.

    ``not_lists``: module names ending in ``_<digit>`` that are names, not list items.
    ``key_fn``: the key rewrite the family's loader applies (for the self-check).
    """

    not_lists: frozenset[str] = frozenset()
    key_fn: Callable[[str], str] | None = None


UNET_KEYS = KeyScheme(frozenset({"linear_1", "linear_2"}))  # time_embedding.linear_1
VAE_KEYS = KeyScheme()
CLIP_KEYS = KeyScheme()
CLIP_TEXT_KEYS = KeyScheme(key_fn=clip_tower_key_fn("text_model"))
T5_KEYS = KeyScheme(frozenset({"wi_0", "wi_1"}))  # DenseReluDense.wi_0 of gated feed-forwards


def path_to_torch_key(path: ParamPath, not_lists: Iterable[str] = frozenset()) -> str:
    """``('down_blocks_0', 'attentions_1', 'proj_attn', 'kernel')`` ->
    ``'down_blocks.0.attentions.1.to_out.0.weight'`` (inverse of ``convert.torch_key_to_path``)."""
    keep = frozenset(not_lists)
    parts: list[str] = []
    for name in path[:-1]:
        name = _INVERSE_RENAMES.get(name, name)
        match = _LIST_ITEM.fullmatch(name)
        parts.extend([match[1], match[2]] if match and name not in keep else [name])
    parts.append(_LEAF_NAMES.get(path[-1], path[-1]))
    return ".".join(parts)


def unapply_transform(array: np.ndarray, transform: str) -> np.ndarray:
    """The torch-layout tensor that ``convert.apply_transform(result, transform)`` maps back to
    ``array`` (our layout): conv HWIO -> OIHW, Dense [in, out] -> [out, in], a Dense kernel ->
    a 1x1 conv weight [out, in, 1, 1] (legacy VAE attention), or identity."""
    if transform == "conv":
        return np.transpose(array, (3, 2, 0, 1))
    if transform == "transpose":
        return np.transpose(array)
    if transform == "squeeze_transpose":
        return np.transpose(array)[:, :, None, None]
    if transform == "identity":
        return array
    raise ValueError(f"unknown transform {transform!r}")


def to_torch_layout(path: ParamPath, array: np.ndarray) -> tuple[np.ndarray, str]:
    """Our parameter -> ``(torch tensor, transform the loader will apply to it)``.

    Kernels of rank 4 are convolutions, of rank 2 linear layers; everything else is stored as
    is. (The legacy 1x1-conv attention layout is read by the loader but never written.)
    """
    if path[-1] == "kernel":
        if array.ndim == 4:
            return unapply_transform(array, "conv"), "conv"
        if array.ndim == 2:
            return unapply_transform(array, "transpose"), "transpose"
        raise CheckpointError(f"{'/'.join(path)}: a kernel of shape {array.shape} (expected a "
                              "rank-2 Dense or rank-4 Conv kernel)")
    return array, "identity"


def _target_shapes(module: Any) -> dict[ParamPath, tuple[int, ...]]:
    shapes = jax.eval_shape(module.init_params, jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes).items()}


def _storage_dtype(dtype: str) -> Any:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: supported storage dtypes are {', '.join(DTYPES)}")
    return DTYPES[dtype]


def torch_state_dict(module: Any, params: Any, scheme: KeyScheme, *,
                     dtype: str = "float32") -> dict[str, np.ndarray]:
    """Our ``params`` (for ``module``) as a torch-layout state dict, self-checked.

    Raises CheckpointError when the params do not fit the module (missing / unexpected /
    mis-shaped, as the loader would report them), when the loader's ``plan_conversion`` would
    not map a written key back to the path and layout it came from, or when a value overflows
    the storage ``dtype``.
    """
    np_dtype = _storage_dtype(dtype)
    flat = flatten_dict(unfreeze(params))
    tensors: dict[str, np.ndarray] = {}
    expected: dict[str, tuple[ParamPath, str]] = {}
    for path, value in flat.items():
        path = tuple(str(p) for p in path)
        array, transform = to_torch_layout(path, np.asarray(value, np.float32))
        key = path_to_torch_key(path, scheme.not_lists)
        if key in tensors:
            raise CheckpointError(f"export: {'/'.join(expected[key][0])} and {'/'.join(path)} "
                                  f"both map to {key}")
        with np.errstate(over="ignore"):  # overflow is reported below, naming the parameter
            stored = np.array(array, dtype=np_dtype, order="C")  # 0-d stays 0-d (logit_scale)
        if not np.all(np.isfinite(stored[np.isfinite(array)].astype(np.float32))):
            raise CheckpointError(f"export: {'/'.join(path)} has values outside the {dtype} "
                                  "range; export in float32")
        tensors[key] = stored
        expected[key] = (path, transform)
    name = type(module).__name__
    plan = plan_conversion({k: v.shape for k, v in tensors.items()}, _target_shapes(module),
                           source=f"export of {name}", key_fn=scheme.key_fn)
    wrong = [f"{k} -> {'/'.join(plan[k][0])} ({plan[k][1]}), written from "
             f"{'/'.join(expected[k][0])} ({expected[k][1]})"
             for k in tensors if plan.get(k) != expected[k]]
    if wrong:
        raise CheckpointError(f"export of {name}: the loader would read {len(wrong)} key(s) "
                              f"back wrongly: {'; '.join(wrong[:8])}")
    return tensors


# --- config.json writers ---------------------------------------------------------------------


def _version(package: str) -> dict[str, str]:
    try:
        return {"version": metadata.version(package)}
    except metadata.PackageNotFoundError:
        return {}


def _uniform(values: tuple) -> Any:
    """One value when every block has the same, else the per-block list (diffusers' style)."""
    return values[0] if len(set(values)) == 1 else list(values)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def unet_config_dict(config: UNetConfig) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config.json dict (read by ``UNetConfig.from_diffusers``
    and by diffusers). Heads go under diffusers' misnamed ``attention_head_dim``."""
    c = config
    if len(set(c.cross_attention_dim)) != 1:
        raise ValueError(f"cross_attention_dim={c.cross_attention_dim}: our UNet takes one "
                         "context width for every block")
    out = {
        "_class_name": "UNet2DConditionModel",
        **{f"_diffusers_{k}": v for k, v in _version("diffusers").items()},
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": list(c.block_out_channels),
        "down_block_types": list(c.down_block_types), "up_block_types": list(c.up_block_types),
        "mid_block_type": c.mid_block_type,
        "layers_per_block": _uniform(c.layers_per_block),
        "attention_head_dim": _uniform(c.num_attention_heads),
        "transformer_layers_per_block": _uniform(c.transformer_layers_per_block),
        "cross_attention_dim": c.cross_attention_dim[0],
        "use_linear_projection": c.use_linear_projection, "upcast_attention": c.upcast_attention,
        "center_input_sample": c.center_input_sample, "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": _number(c.freq_shift), "time_embedding_dim": c.time_embedding_dim,
        "downsample_padding": c.downsample_padding,
        "mid_block_scale_factor": _number(c.mid_block_scale_factor), "act_fn": c.act_fn,
        "norm_num_groups": c.norm_num_groups, "norm_eps": c.norm_eps,
        "conv_in_kernel": c.conv_in_kernel, "conv_out_kernel": c.conv_out_kernel,
    }
    if c.sample_size is not None:
        out["sample_size"] = c.sample_size
    return out


def vae_config_dict(config: VAEConfig) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config.json dict."""
    c = config
    n = len(c.block_out_channels)
    out = {
        "_class_name": "AutoencoderKL",
        **{f"_diffusers_{k}": v for k, v in _version("diffusers").items()},
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "latent_channels": c.latent_channels, "block_out_channels": list(c.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups,
        "act_fn": c.act_fn, "use_quant_conv": c.use_quant_conv,
        "use_post_quant_conv": c.use_post_quant_conv,
        "mid_block_add_attention": c.mid_block_add_attention,
        "scaling_factor": c.scaling_factor,
    }
    if c.sample_size is not None:  # diffusers needs a number here; its default is 32
        out["sample_size"] = c.sample_size
    return out


def _transformers_header(architecture: str | None, model_type: str, dtype: str) -> dict:
    out: dict[str, Any] = {"architectures": [architecture]} if architecture else {}
    out["model_type"] = model_type
    out["dtype"] = dtype
    out.update({f"transformers_{k}": v for k, v in _version("transformers").items()})
    return out


def clip_text_config_dict(config: CLIPTextConfig, *, bos_token_id: int | None = None,
                          pad_token_id: int | None = None, dtype: str = "float32",
                          architecture: str | None = None) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict; ``CLIPTextModelWithProjection`` when the config
    has a projection. ``bos_token_id`` / ``pad_token_id`` come from the tokenizer (the model
    never reads them; ``None`` keeps transformers from warning about ids outside a small
    vocabulary)."""
    c = config
    if architecture is None:
        architecture = ("CLIPTextModel" if c.projection_dim is None
                        else "CLIPTextModelWithProjection")
    out = _transformers_header(architecture, "clip_text_model", dtype)
    out.update(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
               intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
               num_attention_heads=c.num_attention_heads,
               max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
               layer_norm_eps=c.layer_norm_eps, eos_token_id=c.eos_token_id,
               bos_token_id=bos_token_id, pad_token_id=pad_token_id, attention_dropout=0.0)
    if c.projection_dim is not None:
        out["projection_dim"] = c.projection_dim
    return out


def clip_vision_config_dict(config: CLIPVisionConfig, *, dtype: str = "float32",
                            architecture: str | None = None) -> dict[str, Any]:
    """A transformers ``CLIPVisionConfig`` dict."""
    c = config
    if architecture is None:
        architecture = ("CLIPVisionModel" if c.projection_dim is None
                        else "CLIPVisionModelWithProjection")
    out = _transformers_header(architecture, "clip_vision_model", dtype)
    out.update(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
               num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
               num_channels=c.num_channels, image_size=c.image_size, patch_size=c.patch_size,
               hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, attention_dropout=0.0)
    if c.projection_dim is not None:
        out["projection_dim"] = c.projection_dim
    return out


def clip_config_dict(config: CLIPConfig, *, bos_token_id: int | None = None,
                     pad_token_id: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``CLIPConfig`` (dual encoder) dict with nested tower configs."""
    dim = config.projection_dim
    towers = {
        "text_config": clip_text_config_dict(
            dataclasses.replace(config.text, projection_dim=dim), bos_token_id=bos_token_id,
            pad_token_id=pad_token_id, dtype=dtype),
        "vision_config": clip_vision_config_dict(
            dataclasses.replace(config.vision, projection_dim=dim), dtype=dtype),
    }
    for tower in towers.values():
        for key in ("architectures", "dtype", "transformers_version"):
            tower.pop(key, None)
    out = _transformers_header("CLIPModel", "clip", dtype)
    out.update(projection_dim=dim, logit_scale_init_value=config.logit_scale_init_value, **towers)
    return out


def t5_config_dict(config: T5Config, *, dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``T5Config`` dict. ``tie_word_embeddings`` and ``scale_decoder_outputs``
    are both explicit (transformers 4 reads the first, 5 the second); the decoder start token
    is written out (T5's convention: the pad token) because generation needs it."""
    c = config
    act, gated = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True)}[c.feed_forward_proj]
    out = _transformers_header("T5ForConditionalGeneration", "t5", dtype)
    out.update(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
               num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers,
               num_heads=c.num_heads,
               relative_attention_num_buckets=c.relative_attention_num_buckets,
               relative_attention_max_distance=c.relative_attention_max_distance,
               layer_norm_epsilon=c.layer_norm_epsilon, feed_forward_proj=c.feed_forward_proj,
               dense_act_fn=act, is_gated_act=gated, is_encoder_decoder=True,
               tie_word_embeddings=c.tie_word_embeddings,
               scale_decoder_outputs=c.scale_decoder_outputs, pad_token_id=c.pad_token_id,
               eos_token_id=c.eos_token_id, decoder_start_token_id=c.start_token)
    return out


# --- folders ---------------------------------------------------------------------------------

# Weight files a folder may hold besides the one we write; removed on overwrite so that no
# stale weights (a shard index, a variant, a msgpack) outlive the export.
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.msgpack", "*.bin")


def _prepare(folder: str | os.PathLike, overwrite: bool) -> Path:
    """``folder`` created, refusing a non-empty one unless ``overwrite``."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{folder}: not empty (pass overwrite=True to replace the "
                                  "model files in it)")
        for pattern in _WEIGHT_PATTERNS:
            for stale in folder.glob(pattern):
                if stale.is_file():
                    stale.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_folder(folder: str | os.PathLike, config: Mapping[str, Any],
                  tensors: dict[str, np.ndarray], stem: str, overwrite: bool) -> Path:
    """config.json + ``stem``.safetensors, each written to a temporary name then moved."""
    folder = _prepare(folder, overwrite)
    weights = folder / f"{stem}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, tmp, metadata=_SAFETENSORS_METADATA)
    os.replace(tmp, weights)
    _write_json(folder / "config.json", config)
    return folder


def _check_module(module: Any, cls: type, what: str) -> None:
    if not isinstance(module, cls):
        raise TypeError(f"{what}: expected a {cls.__name__}, got {type(module).__name__}")


def save_unet(folder: str | os.PathLike, module: UNet2DConditionModel, params: Any, *,
              dtype: str = "float32", overwrite: bool = False) -> Path:
    """A diffusers ``UNet2DConditionModel`` folder (config.json +
    diffusion_pytorch_model.safetensors), weights stored in ``dtype``."""
    _check_module(module, UNet2DConditionModel, "save_unet module")
    tensors = torch_state_dict(module, params, UNET_KEYS, dtype=dtype)
    return _write_folder(folder, unet_config_dict(module.config), tensors, DIFFUSERS_WEIGHTS,
                         overwrite)


def save_vae(folder: str | os.PathLike, module: AutoencoderKL, params: Any, *,
             dtype: str = "float32", overwrite: bool = False) -> Path:
    """A diffusers ``AutoencoderKL`` folder (attention in the current to_q / to_out.0 layout)."""
    _check_module(module, AutoencoderKL, "save_vae module")
    tensors = torch_state_dict(module, params, VAE_KEYS, dtype=dtype)
    return _write_folder(folder, vae_config_dict(module.config), tensors, DIFFUSERS_WEIGHTS,
                         overwrite)


def save_clip_text(folder: str | os.PathLike, module: CLIPTextModel, params: Any, *,
                   bos_token_id: int | None = None, pad_token_id: int | None = None,
                   dtype: str = "float32", overwrite: bool = False) -> Path:
    """A transformers ``CLIPTextModel`` folder (``CLIPTextModelWithProjection`` when the module
    has a projection), keys under ``text_model.`` as in SD's ``text_encoder``."""
    _check_module(module, CLIPTextModel, "save_clip_text module")
    tensors = torch_state_dict(module, params, CLIP_TEXT_KEYS, dtype=dtype)
    config = clip_text_config_dict(module.config, bos_token_id=bos_token_id,
                                   pad_token_id=pad_token_id, dtype=dtype)
    return _write_folder(folder, config, tensors, TRANSFORMERS_WEIGHTS, overwrite)


def save_clip(folder: str | os.PathLike, module: CLIPModel, params: Any, *,
              bos_token_id: int | None = None, pad_token_id: int | None = None,
              dtype: str = "float32", overwrite: bool = False) -> Path:
    """A transformers ``CLIPModel`` (dual encoder) folder: both towers, both projections and
    ``logit_scale``."""
    _check_module(module, CLIPModel, "save_clip module")
    tensors = torch_state_dict(module, params, CLIP_KEYS, dtype=dtype)
    config = clip_config_dict(module.config, bos_token_id=bos_token_id,
                              pad_token_id=pad_token_id, dtype=dtype)
    return _write_folder(folder, config, tensors, TRANSFORMERS_WEIGHTS, overwrite)


def save_t5(folder: str | os.PathLike, module: T5ForConditionalGeneration, params: Any, *,
            dtype: str = "float32", overwrite: bool = False) -> Path:
    """A transformers ``T5ForConditionalGeneration`` folder. The token embedding is written once,
    as ``shared.weight`` (the loaders tie ``encoder/decoder.embed_tokens`` to it); ``lm_head``
    only when the head is untied."""
    _check_module(module, T5ForConditionalGeneration, "save_t5 module")
    tensors = torch_state_dict(module, params, T5_KEYS, dtype=dtype)
    return _write_folder(folder, t5_config_dict(module.config, dtype=dtype), tensors,
                         TRANSFORMERS_WEIGHTS, overwrite)


def save_pipeline(root: str | os.PathLike, *, unet: UNet2DConditionModel, unet_params: Any,
                  vae: AutoencoderKL, vae_params: Any, text_encoder: CLIPTextModel,
                  text_params: Any, tokenizer: Any, scheduler_config: Mapping[str, Any],
                  dtype: str = "float32", overwrite: bool = False) -> Path:
    """A diffusers Stable Diffusion folder that ``hub.load_*(root, subfolder=...)``,
    ``DDIMSchedule.from_pretrained(root, ...)`` and so ``loading.load_models`` (with
    ``config.model.pretrained=root``) read.

    ``tokenizer``: a transformers tokenizer (``save_pretrained`` into ``tokenizer/``).
    ``scheduler_config``: a diffusers DDIM scheduler config dict, checked here.
    The parts must fit together: the UNet's context width is the text encoder's width, its
    input channels the VAE's latent channels, and ``unet.config.sample_size`` one int (the
    latent side ``load_models`` samples at).
    """
    from parrot_jax.diffusion.schedule import DDIMSchedule

    problems = []
    if unet.config.cross_attention_dim[0] != text_encoder.config.hidden_size:
        problems.append(f"unet cross_attention_dim {unet.config.cross_attention_dim[0]} != "
                        f"text_encoder hidden_size {text_encoder.config.hidden_size}")
    if unet.config.in_channels != vae.config.latent_channels:
        problems.append(f"unet in_channels {unet.config.in_channels} != vae latent_channels "
                        f"{vae.config.latent_channels}")
    if not isinstance(unet.config.sample_size, int) or isinstance(unet.config.sample_size, bool):
        problems.append(f"unet sample_size {unet.config.sample_size!r} is not one int")
    if len(tokenizer) > text_encoder.config.vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens, text_encoder vocab_size "
                        f"{text_encoder.config.vocab_size}")
    if problems:
        raise ValueError("save_pipeline: the parts do not fit: " + "; ".join(problems))
    DDIMSchedule.from_config(dict(scheduler_config), 1, "save_pipeline scheduler_config")

    root = _prepare(root, overwrite)
    save_unet(root / "unet", unet, unet_params, dtype=dtype, overwrite=overwrite)
    save_vae(root / "vae", vae, vae_params, dtype=dtype, overwrite=overwrite)
    save_clip_text(root / "text_encoder", text_encoder, text_params,
                   bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                   dtype=dtype, overwrite=overwrite)
    tokenizer_dir = _prepare(root / "tokenizer", overwrite)
    tokenizer.save_pretrained(tokenizer_dir)
    scheduler_dir = _prepare(root / "scheduler", overwrite)
    _write_json(scheduler_dir / "scheduler_config.json",
                {"_class_name": "DDIMScheduler", **dict(scheduler_config)})
    text_class = json.loads((root / "text_encoder" / "config.json").read_text())["architectures"]
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        **{f"_diffusers_{k}": v for k, v in _version("diffusers").items()},
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", text_class[0]],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    })
    return root

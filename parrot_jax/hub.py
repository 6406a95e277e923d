"""Load diffusers / transformers model folders (or hub ids) into our linen modules, no torch.

A diffusers folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``, sharded
``*.safetensors.index.json`` + shards, ``variant`` files such as ``*.fp16.safetensors``, or a
diffusers-Flax ``diffusion_flax_model.msgpack``; a transformers folder holds ``config.json`` and
``model.safetensors`` (or shards). A pipeline root (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``) works through ``subfolder``. Every problem raises one ``CheckpointError`` (or
``ConfigError``) naming the file and keys; nothing is ever loaded partially.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict

from parrot_jax.convert import CheckpointError, apply_transform, plan_conversion
from parrot_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)
from parrot_jax.models.config import ConfigError
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "CheckpointError", "ConfigError", "ModelSource", "load_clip", "load_clip_text",
    "load_clip_vision", "load_t5", "load_tokenizer", "load_unet", "load_vae",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
DIFFUSERS_FLAX_WEIGHTS = "diffusion_flax_model"


class ModelSource:
    """A model folder on disk, or a folder of a hub repository fetched file by file.

    ``file(name)`` returns a local path, or None when the file does not exist.
    """

    def __init__(self, path_or_id: str | os.PathLike, subfolder: str | None = None,
                 revision: str | None = None):
        self.name = str(path_or_id)
        self.subfolder = subfolder
        self.revision = revision
        local = Path(path_or_id).expanduser()
        if local.exists():
            self.root: Path | None = local / subfolder if subfolder else local
            if not self.root.is_dir():
                raise CheckpointError(f"{self.root}: not a folder")
            self.where = str(self.root)
        elif _looks_like_repo_id(self.name):
            self.root = None
            self.where = f"hub repo {self.name!r}"
            if subfolder:
                self.where += f" subfolder {subfolder!r}"
        else:
            raise CheckpointError(f"{self.name}: no such folder (and not a hub repo id)")

    def file(self, name: str) -> Path | None:
        if self.root is not None:
            path = self.root / name
            return path if path.is_file() else None
        return _hub_file(self.name, name, self.subfolder, self.revision, self.where)

    def require(self, name: str) -> Path:
        path = self.file(name)
        if path is None:
            hint = ""
            if name == "config.json" and self.file("model_index.json") is not None:
                hint = " (this is a pipeline folder: pass subfolder='unet' or 'vae')"
            raise CheckpointError(f"{self.where}: missing {name}{hint}")
        return path


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return (0 < len(parts) <= 2 and all(parts) and not name.startswith((".", "~"))
            and "\\" not in name and not name.endswith((".json", ".safetensors")))


def _hub_file(repo: str, name: str, subfolder: str | None, revision: str | None,
              where: str) -> Path | None:
    """Fetch one file of a hub repo (or find it in the local cache); None if the repo lacks it."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(repo, name, subfolder=subfolder,
                                                    revision=revision))
    except EntryNotFoundError:
        return None
    except LocalEntryNotFoundError as e:
        # Offline (or unreachable) and not cached. A missing optional file in a cached
        # snapshot also lands here; the caller decides whether the file was required.
        if _cached_snapshot_has_config(repo, subfolder, revision):
            return None
        raise CheckpointError(f"{where}: cannot fetch {name} (offline or unreachable, and not "
                              f"in the local cache): {e}") from e
    except Exception as e:  # repository not found, gated, network errors ...
        raise CheckpointError(f"{where}: cannot fetch {name}: {type(e).__name__}: {e}") from e


def _cached_snapshot_has_config(repo: str, subfolder: str | None, revision: str | None) -> bool:
    import huggingface_hub

    name = f"{subfolder}/config.json" if subfolder else "config.json"
    found = huggingface_hub.try_to_load_from_cache(repo, name, revision=revision)
    return isinstance(found, str)


def read_config(source: ModelSource) -> tuple[dict[str, Any], str]:
    """The parsed ``config.json`` and its path; JSON errors name the file and line."""
    path = source.require("config.json")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: "
                              f"{e.msg}") from e


def _variant_name(stem: str, ext: str, variant: str | None) -> str:
    return f"{stem}.{variant}.{ext}" if variant else f"{stem}.{ext}"


def _safetensors_files(source: ModelSource, stem: str, variant: str | None) -> list[Path] | None:
    """The safetensors file(s) holding the weights, via the shard index when there is one."""
    single = source.file(_variant_name(stem, "safetensors", variant))
    if single is not None:
        return [single]
    index_names = [_variant_name(stem, "safetensors.index.json", None)]
    if variant:  # diffusers names it stem.safetensors.index.<variant>.json; accept both
        index_names = [f"{stem}.safetensors.index.{variant}.json",
                       f"{stem}.{variant}.safetensors.index.json"]
    for index_name in index_names:
        index = source.file(index_name)
        if index is None:
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' "
                                  f"({type(e).__name__}: {e})") from e
        shards = []
        for shard in sorted(set(weight_map.values())):
            path = source.file(shard)
            if path is None:
                raise CheckpointError(f"{index}: shard {shard} is listed but missing from "
                                      f"{source.where}")
            shards.append(path)
        return shards
    return None


class _SafetensorsReader:
    """Shapes without loading, then one tensor at a time (bfloat16 included) as numpy."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.files = files
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, Path] = {}
        self._dtypes: dict[str, str] = {}
        self._handles: dict[tuple[Path, str], Any] = {}
        for path in files:
            try:
                with safe_open(path, framework="np") as f:
                    for key in f.keys():
                        if key in self._where:
                            raise CheckpointError(f"{path}: key {key} also in {self._where[key]}")
                        sl = f.get_slice(key)
                        self.shapes[key] = tuple(sl.get_shape())
                        self._dtypes[key] = sl.get_dtype()
                        self._where[key] = path
            except CheckpointError:
                raise
            except Exception as e:  # truncated or corrupt header
                raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e

    def get(self, key: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._where[key]
        # numpy has no bfloat16; the flax reader returns it through ml_dtypes.
        framework = "flax" if self._dtypes[key] == "BF16" else "np"
        try:
            # One open handle per (file, framework): the header is parsed once, not per key.
            handle = self._handles.get((path, framework))
            if handle is None:
                handle = self._handles[(path, framework)] = safe_open(path, framework=framework)
            return np.asarray(handle.get_tensor(key))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {key}: {e}") from e


def _target_shapes(init: Callable[[jax.Array], Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(init, jax.random.key(0))
    return {k: tuple(v.shape) for k, v in flatten_dict(shapes).items()}


def _check_flax_tree(flat: dict, target: dict, where: str) -> None:
    """The same missing / unexpected / shape checks for an already-Flax parameter tree."""
    problems = []
    missing = sorted("/".join(k) for k in target if k not in flat)
    unexpected = sorted("/".join(k) for k in flat if k not in target)
    mismatched = sorted(f"{'/'.join(k)} {tuple(np.shape(v))} (expected {target[k]})"
                        for k, v in flat.items() if k in target and tuple(np.shape(v)) != target[k])
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:12])}"
                            + (" ..." if len(items) > 12 else ""))
    if problems:
        raise CheckpointError(f"{where} does not match the model config: " + "; ".join(problems))


def load_weights(source: ModelSource, init: Callable[[jax.Array], Any], *,
                 variant: str | None = None, param_dtype: Any = jnp.float32,
                 torch_stem: str = DIFFUSERS_WEIGHTS,
                 flax_stem: str | None = DIFFUSERS_FLAX_WEIGHTS,
                 renames: Mapping[str, str] | None = None,
                 ignore: Iterable[str] = (),
                 key_fn: Callable[[str], str] | None = None) -> dict:
    """Read, convert and check a folder's weights against the tree ``init(key)`` would build.

    ``torch_stem`` / ``flax_stem``: weight file names without extension (diffusers'
    ``diffusion_pytorch_model`` / ``diffusion_flax_model``; transformers' ``model``, whose Flax
    layout differs from ours, so ``flax_stem=None`` there). ``renames``, ``ignore`` and
    ``key_fn`` go to ``plan_conversion`` (module renames; regexes of non-parameter keys; a key
    rewrite).
    """
    target = _target_shapes(init)
    files = _safetensors_files(source, torch_stem, variant)
    if files is not None:
        reader = _SafetensorsReader(files)
        where = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
        extra = {} if renames is None else {"renames": renames}
        plan = plan_conversion(reader.shapes, target, source=where, ignore=ignore,
                               key_fn=key_fn, **extra)
        flat = {}
        for key, (path, transform) in plan.items():
            value = apply_transform(reader.get(key), transform)
            flat[path] = jnp.asarray(value, dtype=param_dtype)
        return unflatten_dict(flat)
    msgpack = flax_stem and source.file(_variant_name(flax_stem, "msgpack", variant))
    if msgpack is not None:
        try:
            tree = serialization.msgpack_restore(msgpack.read_bytes())
        except Exception as e:
            raise CheckpointError(f"{msgpack}: unreadable msgpack file: {e}") from e
        if isinstance(tree, dict) and set(tree) == {"params"}:
            tree = tree["params"]
        flat = flatten_dict(tree) if isinstance(tree, dict) else {}
        _check_flax_tree(flat, target, str(msgpack))
        return unflatten_dict({k: jnp.asarray(v, dtype=param_dtype) for k, v in flat.items()})
    pickles = [_variant_name(stem, "bin", variant) for stem in (torch_stem, "pytorch_model")]
    bins = [name for name in pickles if source.file(name)]
    hint = (f"; found {bins[0]}: PyTorch pickles need torch to read, convert it to safetensors"
            if bins else "")
    wanted = [_variant_name(torch_stem, "safetensors", variant), "its sharded index"]
    if flax_stem:
        wanted.append(_variant_name(flax_stem, "msgpack", variant))
    raise CheckpointError(f"{source.where}: no weights found (looked for "
                          f"{', '.join(wanted)}){hint}")


def load_unet(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
              dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              variant: str | None = None, revision: str | None = None,
              remat_policy: str | None = None,
              attention_impl: str = "xla") -> tuple[UNet2DConditionModel, dict]:
    """A diffusers ``UNet2DConditionModel`` folder or hub id -> ``(module, params)``.

    ``dtype`` is the activation dtype; parameters are cast to ``param_dtype``.
    ``attention_impl``: 'xla', 'flash' (TPU) or 'cudnn' (GPU), see ``attention_ops``.
    """
    source = ModelSource(path_or_id, subfolder, revision)
    config = UNetConfig.from_diffusers(*read_config(source))
    module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype,
                                  remat_policy=remat_policy, attention_impl=attention_impl)
    params = load_weights(source, module.init_params, variant=variant, param_dtype=param_dtype)
    return module, params


def load_vae(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
             dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
             variant: str | None = None, revision: str | None = None,
             attention_impl: str = "xla") -> tuple[AutoencoderKL, dict]:
    """A diffusers ``AutoencoderKL`` folder or hub id -> ``(module, params)``
    (``attention_impl`` as ``load_unet``'s)."""
    source = ModelSource(path_or_id, subfolder, revision)
    config = VAEConfig.from_diffusers(*read_config(source))
    module = AutoencoderKL(config, dtype=dtype, param_dtype=param_dtype,
                           attention_impl=attention_impl)
    params = load_weights(source, module.init_params, variant=variant, param_dtype=param_dtype)
    return module, params


# --- transformers: CLIP and tokenizers -----------------------------------------------------

TRANSFORMERS_WEIGHTS = "model"
# Old checkpoints saved the position-id buffer; it is not a parameter.
_BUFFERS = (r".*\.position_ids",)
_TEXT_TOWER = (r"text_model\..*", r"text_projection\..*")
_VISION_TOWER = (r"vision_model\..*", r"visual_projection\..*")


def _clip_kind(config: dict[str, Any], where: str, allowed: tuple[str, ...]) -> str:
    kind = config.get("model_type", allowed[-1])
    if kind not in allowed:
        raise CheckpointError(f"{where}: model_type {kind!r} is not one of {', '.join(allowed)}")
    return kind


def _has_projection(config: dict[str, Any], name: str) -> bool:
    return name in (config.get("architectures") or [])


def clip_tower_key_fn(tower: str) -> Callable[[str], str]:
    """Adds the ``tower.`` prefix (``text_model`` / ``vision_model``) that transformers >= 5
    drops when it saves a bare CLIPTextModel / CLIPVisionModel; older checkpoints (SD's text
    encoder among them) keep it, so both layouts load."""
    keep = (f"{tower}.", "text_projection.", "visual_projection.", "logit_scale")
    return lambda key: key if key.startswith(keep) else f"{tower}.{key}"


def _load_transformers(source: ModelSource, module: Any, ignore: Iterable[str],
                       param_dtype: Any, tower: str | None = None) -> dict:
    """Weights of a transformers folder; ``tower``: see ``clip_tower_key_fn``."""
    return load_weights(source, module.init_params, param_dtype=param_dtype,
                        torch_stem=TRANSFORMERS_WEIGHTS, flax_stem=None,
                        ignore=tuple(ignore) + _BUFFERS,
                        key_fn=clip_tower_key_fn(tower) if tower else None)


# Per tower: (bare model_type, the class whose folders carry a projection, our config class,
# our module class, the other tower's keys to skip in a full CLIPModel folder).
_CLIP_TOWERS = {
    "text_model": ("clip_text_model", "CLIPTextModelWithProjection", CLIPTextConfig,
                   CLIPTextModel, _VISION_TOWER),
    "vision_model": ("clip_vision_model", "CLIPVisionModelWithProjection", CLIPVisionConfig,
                     CLIPVisionModel, _TEXT_TOWER),
}


def _load_clip_tower(tower: str, path_or_id: str | os.PathLike, subfolder: str | None,
                     dtype: Any, param_dtype: Any, revision: str | None) -> tuple[Any, dict]:
    """One CLIP tower from its own folder or from a full ``CLIPModel`` folder."""
    bare_type, projected_class, config_cls, module_cls, other_tower = _CLIP_TOWERS[tower]
    source = ModelSource(path_or_id, subfolder, revision)
    config, where = read_config(source)
    if _clip_kind(config, where, ("clip", bare_type)) == "clip":
        full = CLIPConfig.from_transformers(config, where)
        tower_config = full.text if tower == "text_model" else full.vision
        ignore = other_tower + (r"logit_scale",)
    else:
        dim = config.get("projection_dim", 512) if _has_projection(
            config, projected_class) else None
        tower_config, ignore = config_cls.from_transformers(config, where, dim), ()
    module = module_cls(tower_config, dtype=dtype, param_dtype=param_dtype)
    return module, _load_transformers(source, module, ignore, param_dtype, tower)


def load_clip_text(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                   dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   revision: str | None = None) -> tuple[CLIPTextModel, dict]:
    """A CLIP text encoder -> ``(module, params)``.

    Reads ``CLIPTextModel`` folders (SD's ``text_encoder``), ``CLIPTextModelWithProjection``
    folders (with ``text_projection``), and full ``CLIPModel`` folders, whose vision tower is
    skipped deliberately.
    """
    return _load_clip_tower("text_model", path_or_id, subfolder, dtype, param_dtype, revision)


def load_clip_vision(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                     dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     revision: str | None = None) -> tuple[CLIPVisionModel, dict]:
    """A CLIP image encoder (``CLIPVisionModelWithProjection``, ``CLIPVisionModel`` or the vision
    tower of a full ``CLIPModel`` folder) -> ``(module, params)``."""
    return _load_clip_tower("vision_model", path_or_id, subfolder, dtype, param_dtype, revision)


def load_clip(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
              dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              revision: str | None = None) -> tuple[CLIPModel, dict]:
    """A full ``CLIPModel`` folder (openai/clip-*, laion/CLIP-ViT-H-14, PickScore) ->
    ``(module, params)`` with both towers, both projections and ``logit_scale``."""
    source = ModelSource(path_or_id, subfolder, revision)
    config, where = read_config(source)
    _clip_kind(config, where, ("clip",))
    module = CLIPModel(CLIPConfig.from_transformers(config, where), dtype=dtype,
                       param_dtype=param_dtype)
    return module, _load_transformers(source, module, (), param_dtype)


def load_tokenizer(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                   revision: str | None = None) -> Any:
    """A transformers tokenizer (fast, ``tokenizers``-backed; no torch) from a folder or hub id.

    A pipeline root works with ``subfolder='tokenizer'``.
    """
    from transformers import AutoTokenizer

    source = ModelSource(path_or_id, subfolder, revision)
    # transformers 5 builds an *empty* tokenizer from a bare tokenizer_config.json; refuse that.
    vocab_files = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
    if not any(source.file(name) for name in vocab_files):
        raise CheckpointError(f"{source.where}: no tokenizer vocabulary (looked for "
                              f"{', '.join(vocab_files)})")
    target = str(source.root) if source.root is not None else source.name
    kwargs = {} if source.root is not None else {"subfolder": subfolder or "",
                                                  "revision": revision}
    try:
        return AutoTokenizer.from_pretrained(target, **kwargs)
    except Exception as e:  # transformers raises OSError / ValueError / KeyError here
        raise CheckpointError(f"{source.where}: cannot load a tokenizer: "
                              f"{type(e).__name__}: {e}") from e


# --- transformers: T5 ----------------------------------------------------------------------

# Stored aliases of ``shared.weight``: transformers 5 writes none, older exports may write them.
_T5_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# A cross-attention bias table some old checkpoints carry; T5 never uses it (transformers skips it).
_T5_UNUSED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)


def _t5_tied_copies(reader: _SafetensorsReader, tie: bool, where: str) -> tuple[bool, list[str]]:
    """Whether the LM head is tied to ``shared``, and the stored copies of ``shared.weight`` to
    skip (each checked to be an exact copy; a different input embedding raises)."""
    if "shared.weight" not in reader.shapes:
        return tie, []  # load_weights reports shared/embedding as missing
    shared = reader.get("shared.weight")

    def same(key: str) -> bool:
        return reader.shapes[key] == shared.shape and np.array_equal(reader.get(key), shared)

    copies = []
    for key in _T5_EMBED_ALIASES:
        if key in reader.shapes:
            if not same(key):
                raise CheckpointError(f"{where}: {key} differs from shared.weight (separate input "
                                      "embeddings are not supported)")
            copies.append(key)
    if tie and "lm_head.weight" in reader.shapes:
        if same("lm_head.weight"):
            copies.append("lm_head.weight")
        else:  # what transformers 5 does too: a stored head that differs is a separate head
            tie = False
    return tie, copies


def load_t5(path_or_id: str | os.PathLike, *, subfolder: str | None = None,
            dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
            revision: str | None = None) -> tuple[T5ForConditionalGeneration, dict]:
    """A transformers ``T5ForConditionalGeneration`` folder or hub id (``config.json`` +
    ``model.safetensors`` or its sharded index) -> ``(module, params)``.

    The token embedding is loaded once, as ``shared``. Whether the LM head is tied: a config's
    ``tie_word_embeddings: false`` (T5 v1.1 / FLAN-T5 as published) means a separate
    ``lm_head.weight``, which must then be present. transformers 5 always writes ``true`` and
    stores a separate head only when it differs, so a stored ``lm_head.weight`` that differs from
    ``shared.weight`` is a separate head whatever the config says, and an identical one is a tied
    copy. Tied copies (``lm_head``, ``encoder.embed_tokens``, ``decoder.embed_tokens``) are
    skipped only after checking they equal ``shared.weight``, which reads that tensor twice.
    """
    source = ModelSource(path_or_id, subfolder, revision)
    config, where = read_config(source)
    config = T5Config.from_transformers(config, where)
    ignore = list(_T5_UNUSED)
    files = _safetensors_files(source, "model", None)
    if files is not None:
        reader = _SafetensorsReader(files)
        tie, copies = _t5_tied_copies(reader, config.tie_word_embeddings, str(files[0]))
        config = dataclasses.replace(config, tie_word_embeddings=tie)
        ignore += [re.escape(key) for key in copies]
    module = T5ForConditionalGeneration(config, dtype=dtype, param_dtype=param_dtype)
    params = load_weights(source, module.init_params, param_dtype=param_dtype, torch_stem="model",
                          flax_stem=None, ignore=ignore)
    return module, params

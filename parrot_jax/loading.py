"""The models a Parrot run needs, loaded from folders / hub ids or built tiny and random.

``load_models(config, workdir, mesh, prompts)`` returns a ``ParrotModels`` bundle: the T2I model
(UNet, VAE, CLIP text encoder + tokenizer, DDIM schedule), the PEN (T5 + tokenizer) and the
``RewardSet``. ``model.pretrained = 'tiny'`` builds random models of ``model.tiny``'s shapes from
``config.seed``, a CLIP-style word-level tokenizer and a T5-style BPE tokenizer from the prompts;
the tokenizers are saved under ``workdir/tokenizers`` once and read back from there. Reward sets
other than 'tiny' come by name from ``parrot_jax.plugins`` (the paper's, the toy world's).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from parrot_jax import architectures, hub, parallel, plugins, storage
from parrot_jax.data.tokenizer import build_clip_tokenizer, pad_vocabulary, train_t5_tokenizer
from parrot_jax.diffusion import DDIMSchedule
from parrot_jax.expansion.identifiers import reward_identifier
from parrot_jax.expansion.template import InstructionTemplate
from parrot_jax.models.attention_ops import resolve
from parrot_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
)
from parrot_jax.models.random_init import random_params
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL, VAEConfig
from parrot_jax.rewards import (
    Aesthetic,
    ClipBackbone,
    ClipScore,
    ImageProcessorConfig,
    PickScore,
    RewardSet,
    Sentiment,
)
from parrot_jax.rewards.aesthetic import LAION_AESTHETIC_DIMS
from parrot_jax.rewards.clip_heads import SENTIMENT_DESCRIPTIONS
from parrot_jax.rewards.configs import CLIP_VIT_B32, CLIP_VIT_L14, PICKSCORE

TOKENIZER_DIR = "tokenizers"

# Words the random PEN may emit and the CLIP tokenizer should know (style modifiers).
MODIFIERS = ("highly detailed", "digital art", "trending on artstation", "sharp focus",
             "cinematic lighting", "vivid colors", "soft pastel", "4k", "oil painting",
             "concept art", "bright background", "dark background", "outlined", "matte")


@dataclasses.dataclass(eq=False)
class ParrotModels:
    """Everything the loop runs; modules are static (hashable), params are pytrees."""

    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    text_encoder: CLIPTextModel
    text_params: Any
    clip_tokenizer: Any  # host tokenizer of the T2I text encoder (context = its max length)
    schedule: DDIMSchedule
    pen: T5ForConditionalGeneration
    pen_params: Any
    pen_tokenizer: Any
    rewards: RewardSet
    latent_shape: tuple[int, int, int]  # (h, w, c) of the UNet's input

    @property
    def context_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def place(self, sharding: Any, frozen_dtype: Any = None) -> None:
        """Put the text encoder's, VAE's and PEN's parameters on the devices with ``sharding``
        (replicated: small next to the batch); with ``frozen_dtype``, keep the text encoder's,
        the VAE's and the reward models' weights in it (``model.frozen_dtype``)."""
        self.text_params = jax.device_put(self.text_params, sharding)
        self.vae_params = jax.device_put(self.vae_params, sharding)
        self.pen_params = jax.device_put(self.pen_params, sharding)
        if frozen_dtype is not None:
            self.text_params = store_as(self.text_params, frozen_dtype)
            self.vae_params = store_as(self.vae_params, frozen_dtype)
            self.rewards.params = store_as(self.rewards.params, frozen_dtype)


def _dtype(name: str) -> Any:
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={name!r}; 'float32' or 'bfloat16'")
    return jnp.dtype(name)


def frozen_dtype(config: ml_collections.ConfigDict) -> Any:
    """``config.model.frozen_dtype`` ('auto': ``model.dtype``) as a dtype."""
    name = config.model.frozen_dtype
    return _dtype(config.model.dtype if name == "auto" else name)


def store_as(tree: Any, dtype: Any) -> Any:
    """``tree`` with its floating-point leaves in ``dtype`` (placement kept)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def latent_shape(config: ml_collections.ConfigDict, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, side: int) -> tuple[int, int, int]:
    """``(h, w, c)`` of the UNet's input: ``side`` (the model's own latent side), or
    ``config.model.resolution`` pixels through the VAE's downsampling."""
    if not config.model.resolution:
        return side, side, unet.config.in_channels
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    factor = vae_factor * 2 ** (len(unet.config.down_block_types) - 1)
    if config.model.resolution % factor:
        raise ValueError(f"config.model.resolution={config.model.resolution} must be a multiple "
                         f"of {factor} (the VAE's and the UNet's downsampling)")
    side = config.model.resolution // vae_factor
    return side, side, unet.config.in_channels


def attention_impl(config: ml_collections.ConfigDict, platform: str) -> str:
    """``config.model.attention`` for ``platform`` (``attention_ops.resolve``): the UNet's and
    VAE's self-attention implementation."""
    try:
        return resolve(config.model.attention, platform)
    except ValueError as e:
        raise ValueError(f"config.model.attention: {e}") from e


def check_source(field: str, value: str) -> str:
    """A model source named by ``config.<field>``: an existing folder or a hub id; a path that
    does not exist is an error naming the field."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"config.{field} is empty: give a folder, a hub id or 'tiny'")
    if Path(value).expanduser().exists():
        return str(Path(value).expanduser())
    if not hub._looks_like_repo_id(value):
        raise FileNotFoundError(f"config.{field}={value!r}: no such folder (and not a hub id)")
    return value


def _loading(field: str, value: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; failures re-raised naming the config field and value."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        message = f"config.{field}={value!r}: {e}"
        try:
            named = type(e)(message)
        except Exception:  # an exception type that takes other arguments
            named = RuntimeError(message)
        raise named from e


# --- tokenizers ------------------------------------------------------------------------------

def _clip_corpus(prompts: Sequence[str], num_rewards: int) -> list[str]:
    return (list(prompts) + list(MODIFIERS)
            + [reward_identifier(k) + ", " for k in range(num_rewards)] * 10)


def _saved_tokenizer(folder: epath.Path, build) -> Any:
    """The tokenizer saved in ``folder``, built (and saved by process 0) the first time."""
    if not (folder / "tokenizer.json").is_file():
        tokenizer = build()
        if jax.process_index() == 0:
            storage.save_folder(tokenizer.save_pretrained, folder)
        else:
            return tokenizer
    return hub.load_tokenizer(storage.local_copy(folder))


# --- tiny random models ----------------------------------------------------------------------

def _aesthetic_layers(dims: tuple[int, ...], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"kernel": np.asarray(rng.standard_normal((a, b)) / np.sqrt(a), np.float32),
             "bias": np.zeros((b,), np.float32)} for a, b in zip(dims[:-1], dims[1:])]


def _tiny_t2i(config: ml_collections.ConfigDict, tokenizer: Any, dtype: Any) -> dict[str, Any]:
    t = config.model.tiny
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=t.context_length,
                              eos_token_id=tokenizer.eos_token_id, **t.text.to_dict())
    text_encoder = CLIPTextModel(text_cfg, dtype=dtype)
    unet_cfg = UNetConfig.from_diffusers(
        {**t.unet.to_dict(), "in_channels": 4, "out_channels": 4,
         "cross_attention_dim": text_cfg.hidden_size, "sample_size": t.latent_size},
        "config.model.tiny.unet")
    unet = UNet2DConditionModel(unet_cfg, dtype=dtype)
    vae_cfg = VAEConfig.from_diffusers(t.vae.to_dict(), "config.model.tiny.vae")
    vae = AutoencoderKL(vae_cfg, dtype=dtype)
    if vae_cfg.latent_channels != unet_cfg.in_channels:
        raise ValueError(f"config.model.tiny.vae.latent_channels={vae_cfg.latent_channels} must "
                         f"be the UNet's {unet_cfg.in_channels} input channels")
    schedule = DDIMSchedule.from_config(config.sample.scheduler.to_dict(),
                                        config.sample.num_steps, "config.sample.scheduler")
    return dict(
        unet=unet, unet_params=random_params(unet, config.seed + 1),
        vae=vae, vae_params=random_params(vae, config.seed + 2),
        text_encoder=text_encoder, text_params=random_params(text_encoder, config.seed + 3),
        schedule=schedule, latent_shape=(t.latent_size, t.latent_size, unet_cfg.in_channels))


def _tiny_rewards(config: ml_collections.ConfigDict, tokenizer: Any, image_size: int,
                  sharding: Any) -> RewardSet:
    """A random CLIP dual encoder and the paper's four heads on it (aesthetic MLP random)."""
    t = config.model.tiny
    dim = t.projection_dim
    clip = CLIPModel(CLIPConfig(
        text=CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=t.context_length,
                            eos_token_id=tokenizer.eos_token_id, projection_dim=dim,
                            **t.text.to_dict()),
        vision=CLIPVisionConfig(image_size=image_size, projection_dim=dim, **t.vision.to_dict()),
        projection_dim=dim), dtype=_dtype(config.model.dtype))
    backbone = ClipBackbone("tiny_clip", clip, random_params(clip, config.seed + 4),
                            ImageProcessorConfig.square(image_size), tokenizer)
    heads = [Aesthetic(backbone, _aesthetic_layers((dim, 32, 16, 1), config.seed + 5)),
             PickScore(backbone),
             ClipScore(backbone), Sentiment.zero_shot(backbone)]
    return RewardSet(heads, sharding=sharding)


def _tiny_pen(config: ml_collections.ConfigDict, tokenizer: Any, dtype: Any) -> tuple[Any, Any]:
    fields = config.model.tiny.t5.to_dict()
    t5 = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.pad_token_id, **fields)
    module = T5ForConditionalGeneration(t5, dtype=dtype)
    return module, random_params(module, config.seed + 6)


# --- full-size random models ----------------------------------------------------------------

def _random_t2i(config: ml_collections.ConfigDict, tokenizers: epath.Path, corpus: list[str],
                dtype: Any) -> tuple[dict[str, Any], Any]:
    """model.pretrained's UNet, VAE, text encoder and schedule at their architectures with
    random weights, and a stand-in CLIP tokenizer of the text encoder's vocabulary and context
    (``model.random_weights``)."""
    root = check_source("model.pretrained", config.model.pretrained)
    text_cfg = CLIPTextConfig.from_transformers(
        architectures.pipeline_component(root, "text_encoder"), root)
    tokenizer = _saved_tokenizer(tokenizers / "clip", lambda: pad_vocabulary(
        build_clip_tokenizer(corpus, text_cfg.max_position_embeddings), text_cfg.vocab_size))
    unet = UNet2DConditionModel(UNetConfig.from_diffusers(
        architectures.pipeline_component(root, "unet"), root), dtype=dtype)
    vae = AutoencoderKL(VAEConfig.from_diffusers(
        architectures.pipeline_component(root, "vae"), root), dtype=dtype)
    text_encoder = CLIPTextModel(text_cfg, dtype=dtype)
    schedule = DDIMSchedule.from_config(architectures.pipeline_component(root, "scheduler"),
                                        config.sample.num_steps, f"{root} scheduler")
    side = unet.config.sample_size
    frozen = frozen_dtype(config)  # the VAE and text encoder are stored in it anyway
    return dict(unet=unet, unet_params=random_params(unet, config.seed + 1, put=jnp.asarray),
                vae=vae, vae_params=random_params(vae, config.seed + 2, frozen, jnp.asarray),
                text_encoder=text_encoder,
                text_params=random_params(text_encoder, config.seed + 3, frozen, jnp.asarray),
                schedule=schedule, latent_shape=(side, side, unet.config.in_channels)), tokenizer


def _random_pen(config: ml_collections.ConfigDict, tokenizers: epath.Path, corpus: list[str],
                dtype: Any) -> tuple[Any, Any, Any]:
    """``(module, params, tokenizer)``: model.pen's T5 at its architecture, random, with a
    stand-in tokenizer of its vocabulary size (T5's ids: pad 0, EOS 1)."""
    source = check_source("model.pen", config.model.pen)
    t5 = T5Config.from_transformers(architectures.t5_config(source), source)
    tokenizer = _saved_tokenizer(tokenizers / "pen", lambda: pad_vocabulary(
        train_t5_tokenizer(corpus, t5.vocab_size), t5.vocab_size))
    module = T5ForConditionalGeneration(t5, dtype=dtype)
    return module, random_params(module, config.seed + 6, put=jnp.asarray), tokenizer


def _random_rewards(config: ml_collections.ConfigDict, tokenizer: Any, sharding: Any,
                    ) -> RewardSet:
    """The paper's reward set ('parrot') on random backbones of its CLIP architectures (224-px
    CLIP preprocessing; texts through the T2I stand-in tokenizer, CLIP's vocabulary)."""
    if config.model.rewards != "parrot":
        raise ValueError(f"config.model.rewards={config.model.rewards!r}: "
                         "model.random_weights builds 'parrot' or 'tiny' only")
    dtype = _dtype(config.model.dtype)

    def backbone(source: str, seed: int) -> ClipBackbone:
        clip = CLIPModel(CLIPConfig.from_transformers(architectures.clip_config(source), source),
                         dtype=dtype)
        # Drawn on the device in the dtype they are stored in (model.frozen_dtype).
        params = random_params(clip, seed, frozen_dtype(config), jnp.asarray)
        return ClipBackbone(source.split("/")[-1], clip, params,
                            ImageProcessorConfig.square(224), tokenizer)

    large = backbone(CLIP_VIT_L14, config.seed + 7)
    heads = [Aesthetic(large, _aesthetic_layers(LAION_AESTHETIC_DIMS, config.seed + 5)),
             PickScore(backbone(PICKSCORE, config.seed + 8)),
             ClipScore(backbone(CLIP_VIT_B32, config.seed + 9)), Sentiment.zero_shot(large)]
    return RewardSet(heads, sharding=sharding)


# --- the bundle ------------------------------------------------------------------------------

def load_models(config: ml_collections.ConfigDict, workdir: str | os.PathLike, mesh: Mesh,
                prompts: Sequence[str]) -> ParrotModels:
    """Load or build every model ``config.model`` names (see the module docstring); the tiny
    tokenizers are built from ``prompts`` (the run's RL prompts, templated as the PEN reads
    them)."""
    template = InstructionTemplate()
    m = config.model
    dtype = _dtype(m.dtype)
    tokenizers = storage.path(workdir) / TOKENIZER_DIR
    sharding = parallel.batch_sharding(mesh)
    num_rewards = 4
    clip_tokenizer = None

    if m.pretrained == "tiny":
        clip_tokenizer = _saved_tokenizer(tokenizers / "clip", lambda: build_clip_tokenizer(
            _clip_corpus(prompts, num_rewards), m.tiny.context_length))
        t2i = _tiny_t2i(config, clip_tokenizer, dtype)
    elif m.random_weights:
        t2i, clip_tokenizer = _random_t2i(config, tokenizers,
                                          _clip_corpus(prompts, num_rewards) + [
                                              t for texts in SENTIMENT_DESCRIPTIONS.values()
                                              for t in texts],
                                          dtype)
    else:
        root = check_source("model.pretrained", m.pretrained)
        field = "model.pretrained"
        unet, unet_params = _loading(field, root, hub.load_unet, root, subfolder="unet",
                                     dtype=dtype)
        vae, vae_params = _loading(field, root, hub.load_vae, root, subfolder="vae", dtype=dtype)
        text_encoder, text_params = _loading(field, root, hub.load_clip_text, root,
                                             subfolder="text_encoder", dtype=dtype)
        clip_tokenizer = _loading(field, root, hub.load_tokenizer, root, subfolder="tokenizer")
        schedule = _loading(field, root, DDIMSchedule.from_pretrained, root,
                            config.sample.num_steps)
        side = unet.config.sample_size
        if not isinstance(side, int):
            raise ValueError(f"config.model.pretrained={root!r}: unet sample_size {side!r} is "
                             "not one int (the latent side)")
        t2i = dict(unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
                   text_encoder=text_encoder, text_params=text_params, schedule=schedule,
                   latent_shape=(side, side, unet.config.in_channels))

    template_corpus = [template.format(p) for p in prompts] + list(prompts) + list(MODIFIERS)
    if m.pen == "tiny":
        pen_tokenizer = _saved_tokenizer(tokenizers / "pen", lambda: train_t5_tokenizer(
            template_corpus, m.tiny.t5_vocab_size))
        pen, pen_params = _tiny_pen(config, pen_tokenizer, dtype)
    elif m.random_weights:
        pen, pen_params, pen_tokenizer = _random_pen(config, tokenizers, template_corpus, dtype)
    else:
        source = check_source("model.pen", m.pen)
        pen, pen_params = _loading("model.pen", source, hub.load_t5, source, dtype=dtype)
        tok_source = check_source("model.pen_tokenizer", m.pen_tokenizer or source)
        pen_tokenizer = _loading("model.pen_tokenizer", tok_source, hub.load_tokenizer,
                                 tok_source)

    t2i["latent_shape"] = latent_shape(config, t2i["unet"], t2i["vae"], t2i["latent_shape"][0])
    impl = attention_impl(config, jax.default_backend())
    t2i["unet"] = t2i["unet"].clone(attention_impl=impl)
    t2i["vae"] = t2i["vae"].clone(attention_impl=impl)
    vae_factor = 2 ** (len(t2i["vae"].config.block_out_channels) - 1)
    if m.rewards == "tiny":
        if m.pretrained != "tiny" and not m.random_weights:
            raise ValueError("config.model.rewards='tiny' needs config.model.pretrained='tiny' "
                             "or model.random_weights (a stand-in tokenizer); use 'parrot' "
                             "with real models")
        if clip_tokenizer.model_max_length != m.tiny.context_length:
            raise ValueError(f"config.model.rewards='tiny' reads {m.tiny.context_length} tokens "
                             f"(model.tiny.context_length); the text encoder's tokenizer gives "
                             f"{clip_tokenizer.model_max_length}")
        rewards = _tiny_rewards(config, clip_tokenizer, t2i["latent_shape"][0] * vae_factor,
                                sharding)
    elif m.random_weights:
        rewards = _random_rewards(config, clip_tokenizer, sharding)
    else:
        rewards = _loading("model.rewards", m.rewards, plugins.reward_set, m.rewards,
                           sharding=sharding, dtype=m.dtype)
    return ParrotModels(clip_tokenizer=clip_tokenizer, pen=pen, pen_params=pen_params,
                        pen_tokenizer=pen_tokenizer, rewards=rewards, **t2i)

"""Contrastive pretraining of the toy CLIP on rendered scenes and their training captions.

The toy CLIP is our ``models.clip.CLIPModel`` (ViT with 4-pixel patches on 32x32 images, a
causal text transformer on the word-level toy tokenizer). It serves twice: its text tower is
the UNet's text encoder (as SD uses CLIP's), and its image embedding feeds the reward heads.

Loss: symmetric InfoNCE with *multiple positives*. A toy batch repeats captions ("a red circle"
appears many times in 256 scenes), so the usual one-hot target would push apart pairs that
truly match. A caption is a positive for every image whose scene has all the attributes it
names (``consistency``), and each side's target spreads evenly over its positives.

Data are drawn fresh every step from the world API (seeded ``numpy`` Generators): scenes,
renders, captions naming colour + shape and each other attribute with ``p_attribute``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parrot_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
)
from parrot_jax.models.random_init import random_params
from parrot_jax.rewards.preprocess import ImageProcessorConfig, preprocess
from parrot_jax.toyworld import captions, render, world

MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clamps the learned temperature at 100


@dataclasses.dataclass(frozen=True)
class ClipTrainConfig:
    """The toy CLIP and its training run; the defaults are the real build budget (measured on
    the shared 2-core machine: 1200 steps in 16.5 min wall / 10.8 min CPU under load; held-out
    zero-shot colour 0.99, shape 0.76, caption top-1 among 512 0.54)."""

    vision_width: int = 64  # ViT token width
    vision_layers: int = 3  # ViT blocks
    vision_heads: int = 4
    patch_size: int = 4  # 32x32 images -> 64 patches + the class token
    text_width: int = 64  # text tower width (= the UNet's cross-attention dim)
    text_layers: int = 3
    text_heads: int = 4
    projection_dim: int = 64  # width of the joint embedding the reward heads read
    batch_size: int = 128  # (image, caption) pairs per step
    steps: int = 1200  # optimiser steps
    learning_rate: float = 1e-3  # peak AdamW rate (linear warmup, cosine decay to 10%)
    warmup_steps: int = 100
    weight_decay: float = 0.05  # on matrices only (not biases, norms, embeddings' scale)
    grad_clip: float = 1.0  # global gradient norm
    p_attribute: float = 0.5  # chance a caption names each non-core attribute
    eval_size: int = 512  # held-out scenes for the metrics
    log_every: int = 100  # steps between printed losses (0: silent)

    def __post_init__(self):
        for name in ("vision_width", "vision_layers", "text_width", "text_layers", "batch_size",
                     "steps", "projection_dim", "eval_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ClipTrainConfig.{name}={getattr(self, name)} must be > 0")
        if render.IMAGE_SIZE % self.patch_size:
            raise ValueError(f"ClipTrainConfig.patch_size={self.patch_size} must divide the "
                             f"{render.IMAGE_SIZE}-pixel images")


def build_clip(config: ClipTrainConfig, tokenizer: Any) -> CLIPModel:
    """The dual encoder for ``tokenizer`` (vocabulary, context = ``model_max_length``)."""
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width,
        intermediate_size=4 * config.text_width, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=int(tokenizer.model_max_length),
        eos_token_id=tokenizer.eos_token_id, projection_dim=config.projection_dim)
    vision = CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
        image_size=render.IMAGE_SIZE, patch_size=config.patch_size,
        projection_dim=config.projection_dim)
    return CLIPModel(CLIPConfig(text=text, vision=vision, projection_dim=config.projection_dim))


def processor() -> ImageProcessorConfig:
    """The preprocessing the toy CLIP is trained with and its ``ClipBackbone`` applies."""
    return ImageProcessorConfig.square(render.IMAGE_SIZE)


def text_encoder(clip: CLIPModel, params: Any) -> tuple[CLIPTextModel, Any]:
    """The text tower alone, as SD's ``text_encoder`` (``CLIPTextModel``, no projection): the
    UNet cross-attends to its ``last_hidden_state [B, L, text_width]``."""
    module = CLIPTextModel(dataclasses.replace(clip.config.text, projection_dim=None))
    return module, {"text_model": params["text_model"]}


# --- data ------------------------------------------------------------------------------------

def tokenize(tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> ``(ids, mask)`` int32 ``[N, context]`` padded (end-of-text kept on truncation),
    as ``ClipBackbone.tokenize`` does."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True,
                    max_length=int(tokenizer.model_max_length), return_tensors="np")
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def consistency(scenes: Mapping[str, np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """bool ``[N_images, N_texts]``: text j names only attributes scene i has (``parse``)."""
    n = len(next(iter(scenes.values())))
    out = np.ones((n, len(texts)), bool)
    for j, text in enumerate(texts):
        for attr, value in captions.parse(text).items():
            out[:, j] &= scenes[attr] == world.ATTRIBUTES[attr].index(value)
    return out


def draw_batch(rng: np.random.Generator, n: int, tokenizer: Any, p_attribute: float
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fresh scenes -> (batch, scenes). batch: ``images [n, 32, 32, 3]`` in [0, 1], caption
    ``ids`` / ``mask`` ``[n, L]``, ``positives`` bool ``[n, n]`` (diagonal always true)."""
    scenes = world.sample_scenes(rng, n)
    images = render.render(scenes, rng)
    texts = captions.captions(scenes, rng, p_attribute)
    ids, mask = tokenize(tokenizer, texts)
    batch = {"images": images, "ids": ids, "mask": mask,
             "positives": consistency(scenes, texts)}
    return batch, scenes


# --- loss and step ---------------------------------------------------------------------------

def multi_positive_infonce(logits: jax.Array, positives: jax.Array) -> jax.Array:
    """Symmetric InfoNCE, logits ``[N_img, N_txt]``, positives bool (each row / column has one):
    mean over both directions of ``CE(softmax(logits), positives / #positives)``."""
    pos = positives.astype(jnp.float32)
    i2t = -jnp.sum(pos / pos.sum(1, keepdims=True) * jax.nn.log_softmax(logits, 1), 1)
    t2i = -jnp.sum(pos / pos.sum(0, keepdims=True) * jax.nn.log_softmax(logits, 0), 0)
    return 0.5 * (i2t.mean() + t2i.mean())


def embed(clip: CLIPModel, params: Any, images: jax.Array, ids: jax.Array,
          mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images ``[N, 32, 32, 3]`` in [0, 1], tokens ``[M, L]`` -> L2-normalised image ``[N, P]``
    and text ``[M, P]`` embeddings."""
    pixels = preprocess(images, processor())
    img = clip.apply({"params": params}, pixels, method=clip.get_image_features)
    txt = clip.apply({"params": params}, ids, mask, method=clip.get_text_features)
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return norm(img), norm(txt)


def contrastive_loss(params: Any, batch: dict[str, jax.Array], clip: CLIPModel) -> jax.Array:
    img, txt = embed(clip, params, batch["images"], batch["ids"], batch["mask"])
    logits = jnp.exp(params["logit_scale"]) * img @ txt.T
    return multi_positive_infonce(logits, batch["positives"])


def make_optimizer(config: ClipTrainConfig) -> optax.GradientTransformation:
    """Clipped AdamW, warmup then cosine to 10% of the peak; weight decay on matrices only."""
    rate = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps,
        max(config.steps, config.warmup_steps + 1), end_value=0.1 * config.learning_rate)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(config.grad_clip),
                       optax.adamw(rate, weight_decay=config.weight_decay, mask=decay_mask))


@functools.partial(jax.jit, static_argnames=("clip", "optimizer", "loss_fn"),
                   donate_argnums=(0, 1))
def train_step(params: Any, opt_state: Any, batch: dict[str, jax.Array], *, clip: CLIPModel,
               optimizer: optax.GradientTransformation, loss_fn=contrastive_loss
               ) -> tuple[Any, Any, jax.Array]:
    """One AdamW step on ``loss_fn(params, batch, clip)``; the logit scale stays <= log 100."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, clip)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = {**params, "logit_scale": jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE)}
    return params, opt_state, loss


# --- metrics ---------------------------------------------------------------------------------

def retrieval_top1(similarity: np.ndarray, positives: np.ndarray) -> float:
    """Image -> text top-1: the fraction of rows whose most similar text is a positive.
    similarity / positives ``[N_img, N_txt]``."""
    best = np.argmax(similarity, axis=1)
    return float(np.mean(positives[np.arange(len(best)), best]))


def zero_shot_accuracy(similarity: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of rows whose most similar class text is the true class. similarity
    ``[N, C]``, truth int ``[N]``."""
    return float(np.mean(np.argmax(similarity, axis=1) == truth))


def class_prompts() -> list[str]:
    """The user prompt (``"a red circle"``, ``"an orange ring"``) of every colour and shape,
    colour-major ``[C * S]``."""
    colours, shapes = world.ATTRIBUTES["colour"], world.ATTRIBUTES["shape"]
    scenes = world.sample_scenes(np.random.default_rng(0), len(colours) * len(shapes))
    scenes["colour"] = np.repeat(np.arange(len(colours)), len(shapes))
    scenes["shape"] = np.tile(np.arange(len(shapes)), len(colours))
    return captions.user_prompts(scenes, np.random.default_rng(0), p_background=0.0)


@functools.partial(jax.jit, static_argnames=("clip",))
def _embed_jit(params: Any, images: jax.Array, ids: jax.Array, mask: jax.Array, *,
               clip: CLIPModel) -> tuple[jax.Array, jax.Array]:
    return embed(clip, params, images, ids, mask)


def evaluate(clip: CLIPModel, params: Any, tokenizer: Any, rng: np.random.Generator, n: int,
             p_attribute: float = 0.5) -> dict[str, float]:
    """Held-out metrics on ``n`` fresh scenes: contrastive loss, image -> caption top-1 among
    the ``n`` captions (a consistent caption counts), and zero-shot colour / shape accuracy
    (argmax over the 40 prompts ``"a <colour> <shape>"``, each attribute judged alone)."""
    batch, scenes = draw_batch(rng, n, tokenizer, p_attribute)
    ids, mask = tokenize(tokenizer, class_prompts())
    img, txt = _embed_jit(params, batch["images"], np.concatenate([batch["ids"], ids]),
                          np.concatenate([batch["mask"], mask]), clip=clip)
    sim, zs = np.asarray(img @ txt[:n].T), np.asarray(img @ txt[n:].T)
    scale = float(np.exp(params["logit_scale"]))
    loss = float(multi_positive_infonce(jnp.asarray(scale * sim), batch["positives"]))
    n_shapes = len(world.ATTRIBUTES["shape"])
    return {"eval_loss": loss, "retrieval_top1": retrieval_top1(sim, batch["positives"]),
            "zero_shot_colour": zero_shot_accuracy(zs.reshape(n, -1, n_shapes).max(2),
                                                   scenes["colour"]),
            "zero_shot_shape": zero_shot_accuracy(zs.reshape(n, -1, n_shapes).max(1),
                                                  scenes["shape"]),
            "logit_scale": scale}


# --- the run ---------------------------------------------------------------------------------

def train_clip(config: ClipTrainConfig, tokenizer: Any, seed: int
               ) -> tuple[CLIPModel, Any, dict[str, float]]:
    """Train the toy CLIP from scratch -> ``(module, params, metrics)``.

    Metrics: ``initial_*`` / final held-out ``evaluate`` values, ``train_loss`` (mean of the
    last 10% of steps), ``first_loss``, ``steps_per_s`` (excluding the first, compiling step).
    Training data come from ``seed``; the held-out scenes from a separate stream of it.
    """
    clip = build_clip(config, tokenizer)
    params = jax.tree.map(jnp.asarray, random_params(clip, seed))
    optimizer = make_optimizer(config)
    opt_state = optimizer.init(params)
    data_rng = np.random.default_rng([seed, 0])
    metrics = {f"initial_{k}": v for k, v in evaluate(
        clip, params, tokenizer, np.random.default_rng([seed, 1]), config.eval_size,
        config.p_attribute).items()}
    losses, start = [], None
    for step in range(config.steps):
        batch, _ = draw_batch(data_rng, config.batch_size, tokenizer, config.p_attribute)
        params, opt_state, loss = train_step(params, opt_state, batch, clip=clip,
                                             optimizer=optimizer)
        losses.append(loss)
        if start is None:
            jax.block_until_ready(loss)
            start = time.perf_counter()
        if config.log_every and (step + 1) % config.log_every == 0:
            if not np.isfinite(float(loss)):
                raise FloatingPointError(f"toy CLIP step {step + 1}: loss {float(loss)}")
            print(f"clip step {step + 1}/{config.steps}: loss {float(loss):.4f}", flush=True)
    losses = np.asarray(jax.device_get(losses), np.float64)
    if not np.all(np.isfinite(losses)):
        bad = int(np.argmin(np.isfinite(losses))) + 1
        raise FloatingPointError(f"toy CLIP: non-finite loss at step {bad}")
    elapsed = time.perf_counter() - start
    metrics.update(evaluate(clip, params, tokenizer, np.random.default_rng([seed, 1]),
                            config.eval_size, config.p_attribute))
    tail = max(1, len(losses) // 10)
    metrics.update(first_loss=float(losses[0]), train_loss=float(losses[-tail:].mean()),
                   steps_per_s=(len(losses) - 1) / elapsed if len(losses) > 1 else 0.0)
    return clip, params, metrics

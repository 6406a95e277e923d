"""The toy world's four reward heads, trained on (or fine-tuned from) the frozen toy CLIP.

Each stands for one of the paper's rewards and is scored by the same class as at paper scale:

- aesthetics (``rewards.Aesthetic``): the LAION-style linear stack on the L2-normalised image
  embedding, regressed (MSE) on ``labels.aesthetic_label``;
- human preference (``rewards.PickScore``): like PickScore, a *copy* of the toy CLIP fine-tuned
  on preference pairs with the Bradley-Terry objective (softmax over the two images' scaled
  cosines to the prompt, against which has the higher ``labels.preference_label``);
- alignment (``rewards.ClipScore``): the toy CLIP's own cosine to the original prompt, untrained;
- sentiment (``rewards.Sentiment``): a 3-way linear probe trained by softmax cross-entropy on
  ``labels.sentiment_label``.

``train_heads`` returns the four as a ``RewardSet`` named (aesthetics, human_preference,
alignment, sentiment), the order of ``rewards.build_parrot_rewards``; ``build_reward_set``
rebuilds it from saved parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parrot_jax.models.clip import CLIPModel
from parrot_jax.rewards import (
    Aesthetic,
    ClipBackbone,
    ClipScore,
    PickScore,
    RewardSet,
    Sentiment,
)
from parrot_jax.rewards.aesthetic import aesthetic_mlp
from parrot_jax.rewards.base import l2_normalise
from parrot_jax.toyworld import captions, labels, render, world
from parrot_jax.toyworld.clip_train import MAX_LOGIT_SCALE, processor, tokenize

REWARD_NAMES = ("aesthetics", "human_preference", "alignment", "sentiment")
CLIP_NAME, PICKSCORE_NAME = "toy_clip", "toy_pickscore"  # backbone names in the RewardSet


@dataclasses.dataclass(frozen=True)
class HeadsTrainConfig:
    """Data and optimisation of the three trained heads; defaults are the real build budget."""

    num_images: int = 16384  # rendered scenes whose frozen embeddings train the two probes
    eval_images: int = 2048  # held-out scenes for the aesthetic / sentiment metrics
    embed_batch: int = 512  # images per jitted embedding call
    aesthetic_hidden: tuple[int, ...] = (64, 16)  # linear-stack widths between P and 1
    probe_steps: int = 3000  # Adam steps of each probe (aesthetic, sentiment)
    probe_batch: int = 1024  # embeddings per probe step
    aesthetic_lr: float = 3e-3
    sentiment_lr: float = 3e-2
    preference_steps: int = 300  # fine-tuning steps of the PickScore copy
    preference_batch: int = 64  # prompts per step, two images each
    preference_lr: float = 5e-5  # AdamW, warmup then cosine
    preference_warmup: int = 30
    preference_weight_decay: float = 0.05
    p_match: float = 0.6  # chance an image of a pair is drawn to match its prompt (else random)
    eval_pairs: int = 1024  # held-out preference pairs
    log_every: int = 50  # preference steps between printed losses (0: silent)

    def __post_init__(self):
        for name in ("num_images", "eval_images", "embed_batch", "probe_steps", "probe_batch",
                     "preference_steps", "preference_batch", "eval_pairs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HeadsTrainConfig.{name}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.p_match <= 1.0:
            raise ValueError(f"HeadsTrainConfig.p_match={self.p_match} must be in [0, 1]")


# --- the reward set --------------------------------------------------------------------------

def build_reward_set(clip: CLIPModel, clip_params: Any, tokenizer: Any, *,
                     aesthetic: list[dict], sentiment: dict, pickscore_params: Any,
                     sharding: Any = None) -> RewardSet:
    """The toy rewards as a ``RewardSet`` with columns ``REWARD_NAMES``: aesthetics, alignment
    and sentiment on the toy CLIP (one backbone, run once), human preference on its fine-tuned
    copy. ``aesthetic``: ``[{"kernel": [in, out], "bias": [out]}, ...]``; ``sentiment``:
    ``{"weight": [3, P], "bias": [3]}``; ``sharding``: the batch sharding (see ``RewardSet``)."""
    base = ClipBackbone(CLIP_NAME, clip, clip_params, processor(), tokenizer)
    pick = ClipBackbone(PICKSCORE_NAME, clip, pickscore_params, processor(), tokenizer)
    heads = [Aesthetic(base, aesthetic), PickScore(pick), ClipScore(base),
             Sentiment(base, sentiment)]
    rewards = RewardSet(heads, sharding=sharding)
    if rewards.names != REWARD_NAMES:
        raise RuntimeError(f"reward names {rewards.names} differ from {REWARD_NAMES}")
    return rewards


# --- metrics ---------------------------------------------------------------------------------

def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..N-1 of ``x`` ``[N]``, ties sharing their mean rank."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    _, inverse, counts = np.unique(x[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts + 1) / 2.0  # mean of [end - count, end - 1]
    ranks = np.empty(len(x), np.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of two ``[N]`` arrays (Pearson on tie-averaged ranks)."""
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])


def r_squared(pred: np.ndarray, target: np.ndarray) -> float:
    """``1 - SSE / SST`` of predictions against targets ``[N]``."""
    target = np.asarray(target, np.float64)
    sse = np.sum((np.asarray(pred, np.float64) - target) ** 2)
    return float(1.0 - sse / np.sum((target - target.mean()) ** 2))


def pairwise_accuracy(scores: np.ndarray, labels_: np.ndarray) -> float:
    """Fraction of pairs ``[N, 2]`` whose higher score is the higher label (ties in the label
    skipped; a tie in the score counts as half)."""
    scores, labels_ = np.asarray(scores), np.asarray(labels_)
    decided = labels_[:, 0] != labels_[:, 1]
    want = labels_[decided, 0] > labels_[decided, 1]
    s = scores[decided]
    right = np.where(s[:, 0] == s[:, 1], 0.5, (s[:, 0] > s[:, 1]) == want)
    return float(np.mean(right)) if len(right) else float("nan")


# --- frozen embeddings and the two probes ----------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _encode_images(backbone: ClipBackbone, params: Any, images: jax.Array) -> jax.Array:
    return backbone.encode_images(params, images)


def image_embeddings(backbone: ClipBackbone, images: np.ndarray, batch: int) -> np.ndarray:
    """images ``[N, 32, 32, 3]`` in [0, 1] -> projected embeddings ``[N, P]`` (what the
    ``RewardSet`` hands its heads), in jitted chunks of ``batch`` (the last padded)."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_encode_images(backbone, backbone.params, chunk))[:batch - pad])
    return np.concatenate(out)


def _scene_data(rng: np.random.Generator, n: int, backbone: ClipBackbone, batch: int
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    scenes = world.sample_scenes(rng, n)
    return image_embeddings(backbone, render.render(scenes, rng), batch), scenes


def _mse(layers: list[dict], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((aesthetic_mlp(layers, x) - y) ** 2)


def _sentiment_logits(probe: dict, x: jax.Array) -> jax.Array:
    return l2_normalise(x) @ probe["weight"].T + probe["bias"]


def _xent(probe: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(_sentiment_logits(probe, x), y).mean()


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps", "batch", "lr"))
def fit_probe(params: Any, x: jax.Array, y: jax.Array, key: jax.Array, *, loss_fn: Any,
              steps: int, batch: int, lr: float) -> tuple[Any, jax.Array]:
    """Adam on ``loss_fn(params, x[idx], y[idx])`` over ``steps`` random minibatches (one
    ``lax.scan``) -> (params, per-step losses ``[steps]``). x ``[N, P]``, y ``[N]``."""
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05))

    def step(carry, k):
        p, state = carry
        idx = jax.random.randint(k, (batch,), 0, x.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, x[idx], y[idx])
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                       jax.random.split(key, steps))
    return params, losses


def init_aesthetic(dims: tuple[int, ...], rng: np.random.Generator) -> list[dict]:
    """Linear layers ``dims[0] -> ... -> dims[-1]``, kernels ~ N(0, 1/fan_in), biases 0."""
    return [{"kernel": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
             "bias": jnp.zeros((b,), jnp.float32)} for a, b in zip(dims[:-1], dims[1:])]


def train_probes(config: HeadsTrainConfig, backbone: ClipBackbone, seed: int
                 ) -> tuple[list[dict], dict, dict[str, float]]:
    """Aesthetic stack and sentiment probe on frozen embeddings -> (layers, probe, metrics)."""
    batch = config.embed_batch
    x, scenes = _scene_data(np.random.default_rng([seed, 10]), config.num_images, backbone,
                            batch)
    xe, scenes_e = _scene_data(np.random.default_rng([seed, 11]), config.eval_images, backbone,
                               batch)
    key = jax.random.key(seed)
    aes_y, aes_ye = labels.aesthetic_label(scenes), labels.aesthetic_label(scenes_e)
    dims = (backbone.projection_dim, *config.aesthetic_hidden, 1)
    layers = init_aesthetic(dims, np.random.default_rng([seed, 12]))
    # Start the last bias at the label mean: the stack then learns only the variation.
    layers[-1]["bias"] = jnp.full((1,), float(aes_y.mean()), jnp.float32)
    initial_mse = float(np.mean((np.asarray(aesthetic_mlp(layers, xe)) - aes_ye) ** 2))
    layers, aes_losses = fit_probe(layers, x, aes_y, jax.random.fold_in(key, 0), loss_fn=_mse,
                                   steps=config.probe_steps, batch=config.probe_batch,
                                   lr=config.aesthetic_lr)
    pred = np.asarray(aesthetic_mlp(layers, xe))
    tail = max(1, config.probe_steps // 10)

    sen_y, sen_ye = labels.sentiment_label(scenes), labels.sentiment_label(scenes_e)
    dim = backbone.projection_dim
    probe = {"weight": jnp.zeros((3, dim), jnp.float32), "bias": jnp.zeros((3,), jnp.float32)}
    probe, sen_losses = fit_probe(probe, x, sen_y, jax.random.fold_in(key, 1), loss_fn=_xent,
                                  steps=config.probe_steps, batch=config.probe_batch,
                                  lr=config.sentiment_lr)
    sen_pred = np.argmax(np.asarray(_sentiment_logits(probe, xe)), axis=1)
    majority = np.bincount(sen_y, minlength=3).argmax()
    metrics = {
        "aesthetic_first_loss": float(aes_losses[0]),
        "aesthetic_train_loss": float(aes_losses[-tail:].mean()),
        "aesthetic_initial_eval_mse": initial_mse,
        "aesthetic_eval_mse": float(np.mean((pred - aes_ye) ** 2)),
        "aesthetic_eval_r2": r_squared(pred, aes_ye),
        "aesthetic_eval_spearman": spearman(pred, aes_ye),
        "sentiment_first_loss": float(sen_losses[0]),
        "sentiment_train_loss": float(sen_losses[-tail:].mean()),
        "sentiment_eval_accuracy": float(np.mean(sen_pred == sen_ye)),
        "sentiment_majority_accuracy": float(np.mean(sen_ye == majority)),
    }
    return jax.tree.map(jnp.asarray, layers), probe, metrics


# --- the preference model (PickScore-style fine-tune) ----------------------------------------

def preference_pairs(rng: np.random.Generator, n: int, tokenizer: Any, p_match: float
                     ) -> dict[str, np.ndarray]:
    """``n`` user prompts, two images each: ``images [n, 2, 32, 32, 3]``, prompt ``ids`` /
    ``mask`` ``[n, L]``, ``labels [n, 2]`` (``preference_label``). Each image matches its prompt
    with probability ``p_match`` (``scenes_for_prompt``), else is a random scene, so pairs
    differ in the prompted attributes as well as in style."""
    prompts = captions.user_prompts(world.sample_scenes(rng, n), rng)
    doubled = [p for p in prompts for _ in range(2)]
    matched = rng.random(2 * n) < p_match
    scenes = world.sample_scenes(rng, 2 * n)
    for i in np.flatnonzero(matched):
        fixed = captions.scenes_for_prompt(doubled[i], rng, 1)
        for a in scenes:
            scenes[a][i] = fixed[a][0]
    images = render.render(scenes, rng)
    ids, mask = tokenize(tokenizer, prompts)
    return {"images": images.reshape(n, 2, *images.shape[1:]), "ids": ids, "mask": mask,
            "labels": labels.preference_label(scenes, doubled).reshape(n, 2)}


def preference_scores(backbone: ClipBackbone, params: Any, images: jax.Array, ids: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """PickScore of each image for its pair's prompt: images ``[n, 2, H, W, 3]``, tokens
    ``[n, L]`` -> ``exp(logit_scale) * cos`` ``[n, 2]``."""
    from parrot_jax.rewards.backbone import Tokens

    n = images.shape[0]
    img = l2_normalise(backbone.encode_images(params, images.reshape(2 * n, *images.shape[2:])))
    txt = l2_normalise(backbone.encode_text(params, Tokens(ids, mask)))
    cos = jnp.sum(img.reshape(n, 2, -1) * txt[:, None], axis=-1)
    return jnp.exp(params["logit_scale"]) * cos


def bradley_terry_loss(scores: jax.Array, labels_: jax.Array) -> jax.Array:
    """Softmax over each pair's two scores ``[n, 2]`` against the preferred one (targets 1 / 0,
    or 0.5 / 0.5 for a tie in the label), mean over pairs."""
    target = jnp.where(labels_[:, :1] == labels_[:, 1:], 0.5,
                       (labels_ == labels_.max(axis=1, keepdims=True)).astype(jnp.float32))
    return jnp.mean(-jnp.sum(target * jax.nn.log_softmax(scores, axis=1), axis=1))


@functools.partial(jax.jit, static_argnames=("backbone", "optimizer"), donate_argnums=(0, 1))
def _preference_step(params: Any, opt_state: Any, batch: dict[str, jax.Array], *,
                     backbone: ClipBackbone, optimizer: optax.GradientTransformation
                     ) -> tuple[Any, Any, jax.Array]:
    def loss_fn(p):
        scores = preference_scores(backbone, p, batch["images"], batch["ids"], batch["mask"])
        return bradley_terry_loss(scores, batch["labels"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = {**params, "logit_scale": jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE)}
    return params, opt_state, loss


_preference_scores_jit = jax.jit(preference_scores, static_argnums=0)


def _pair_accuracy(backbone: ClipBackbone, params: Any, pairs: dict[str, np.ndarray],
                   chunk: int = 256) -> float:
    out = [np.asarray(_preference_scores_jit(backbone, params, pairs["images"][s:s + chunk],
                                             pairs["ids"][s:s + chunk],
                                             pairs["mask"][s:s + chunk]))
           for s in range(0, len(pairs["ids"]), chunk)]
    return pairwise_accuracy(np.concatenate(out), pairs["labels"])


def train_preference(config: HeadsTrainConfig, clip: CLIPModel, clip_params: Any,
                     tokenizer: Any, seed: int) -> tuple[Any, dict[str, float]]:
    """Fine-tune a copy of the toy CLIP as a PickScore -> (params, metrics)."""
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), clip_params)
    backbone = ClipBackbone(PICKSCORE_NAME, clip, None, processor(), tokenizer)
    rate = optax.warmup_cosine_decay_schedule(
        0.0, config.preference_lr, config.preference_warmup,
        max(config.preference_steps, config.preference_warmup + 1),
        end_value=0.1 * config.preference_lr)
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        rate, weight_decay=config.preference_weight_decay, mask=decay_mask))
    opt_state = optimizer.init(params)
    heldout = preference_pairs(np.random.default_rng([seed, 21]), config.eval_pairs, tokenizer,
                               config.p_match)
    metrics = {"preference_initial_accuracy": _pair_accuracy(backbone, params, heldout)}
    rng = np.random.default_rng([seed, 20])
    losses, start = [], None
    for step in range(config.preference_steps):
        batch = preference_pairs(rng, config.preference_batch, tokenizer, config.p_match)
        params, opt_state, loss = _preference_step(params, opt_state, batch, backbone=backbone,
                                                   optimizer=optimizer)
        losses.append(loss)
        if start is None:
            jax.block_until_ready(loss)
            start = time.perf_counter()
        if config.log_every and (step + 1) % config.log_every == 0:
            print(f"preference step {step + 1}/{config.preference_steps}: loss "
                  f"{float(loss):.4f}", flush=True)
    losses = np.asarray(jax.device_get(losses), np.float64)
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError("toy PickScore: non-finite loss "
                                 f"at step {int(np.argmin(np.isfinite(losses))) + 1}")
    tail = max(1, len(losses) // 10)
    metrics.update(
        preference_first_loss=float(losses[0]),
        preference_train_loss=float(losses[-tail:].mean()),
        preference_eval_accuracy=_pair_accuracy(backbone, params, heldout),
        preference_steps_per_s=((len(losses) - 1) / (time.perf_counter() - start)
                                if len(losses) > 1 else 0.0))
    return params, metrics


# --- all heads -------------------------------------------------------------------------------

def train_heads(config: HeadsTrainConfig, clip: CLIPModel, clip_params: Any, tokenizer: Any,
                seed: int, *, sharding: Any = None) -> tuple[RewardSet, dict[str, Any],
                                                             dict[str, float]]:
    """Train the aesthetic stack, the sentiment probe and the PickScore copy on the frozen toy
    CLIP -> ``(reward_set, params, metrics)``; ``params``: ``{"aesthetic": [layers],
    "sentiment": {weight, bias}, "pickscore": CLIP params}`` (``build_reward_set``'s inputs)."""
    start = time.perf_counter()
    base = ClipBackbone(CLIP_NAME, clip, clip_params, processor(), tokenizer)
    aesthetic, sentiment, metrics = train_probes(config, base, seed)
    metrics["probes_seconds"] = time.perf_counter() - start
    pick, pick_metrics = train_preference(config, clip, clip_params, tokenizer, seed)
    metrics.update(pick_metrics)
    metrics["seconds"] = time.perf_counter() - start
    params = {"aesthetic": aesthetic, "sentiment": sentiment, "pickscore": pick}
    rewards = build_reward_set(clip, clip_params, tokenizer, aesthetic=aesthetic,
                               sentiment=sentiment, pickscore_params=pick, sharding=sharding)
    return rewards, params, metrics

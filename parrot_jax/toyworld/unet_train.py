"""Train the toy world's latent-diffusion UNet: SD's epsilon objective on VAE latents, frozen
CLIP text conditioning, 10% caption dropout to the null prompt.

Data: a pool of ``train_images`` seeded random scenes is rendered and encoded once (encoding
every step would cost more than the UNet step); every step draws a batch from the pool and
captions it afresh (``captions.captions``: colour and shape always, each other attribute with
``p_attribute``), so one latent is seen under many captions and the attributes a caption leaves
out stay a distribution the model must cover. Latents are ``scaling_factor *`` one posterior
sample per image (SD's ``latent_dist.sample()``; ``latents='mean'`` takes the means).

Text is encoded exactly as the Parrot loop and ``parrot_jax.sample`` do: the tokenizer pads to
the text encoder's context with ``padding='max_length'`` (nothing truncated: a caption that does
not fit is an error), the ids go through ``CLIPTextModel`` with no attention mask, and the UNet
cross-attends to ``last_hidden_state``. A dropped caption is the empty string, tokenised the
same way: the null prompt the sampler uses for classifier-free guidance.

Evaluation: the epsilon loss on held-out captions (fixed noise and timesteps), and samples for
held-out user prompts with the repo's sampler (DDIM, eta 1, CFG), decoded by the VAE and scored
by the pixel oracle: colour accuracy (the prompted colour is the nearest of the eight) and shape
accuracy (the prompted shape's template fits best), beside the same numbers for true renders.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parrot_jax.diffusion import CFG, DDIMSchedule, branch_contexts, rollout
from parrot_jax.models.clip import CLIPTextModel
from parrot_jax.models.unet import UNet2DConditionModel, UNetConfig
from parrot_jax.models.vae import AutoencoderKL
from parrot_jax.toyworld import captions, oracle, render, world
from parrot_jax.toyworld.vae_train import encode_latents, optimizer_for

# SD 1.x's DDPM noise process (diffusers scheduler config keys), as configs/tiny.py's
# SD_SCHEDULER: the UNet is trained on it and the Parrot loop samples with it.
SD_SCHEDULER: tuple[tuple[str, Any], ...] = (
    ("num_train_timesteps", 1000), ("beta_start", 0.00085), ("beta_end", 0.012),
    ("beta_schedule", "scaled_linear"), ("steps_offset", 1), ("set_alpha_to_one", False),
    ("prediction_type", "epsilon"), ("clip_sample", False),
)
LATENTS = ("sample", "mean")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UNetTrainConfig:
    """What to build and how long to train it. Defaults are the shipped model's budget (about
    20 minutes on 2 CPU cores). Hashable: it is a static argument of the jitted step."""

    steps: int = 5000  # optimiser steps
    batch_size: int = 64  # latents per step
    learning_rate: float = 1e-3  # AdamW peak rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 200  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global-norm gradient clip
    ema_decay: float = 0.999  # EMA of the weights (0: none); the better of EMA / raw on the
    # held-out eps loss is returned
    caption_dropout: float = 0.1  # share of captions replaced by the null prompt ""
    p_attribute: float = 0.5  # chance a caption names each attribute beyond colour and shape
    train_images: int = 32768  # scenes rendered and encoded once (the pool)
    latents: str = "sample"  # 'sample' (one posterior sample per image, as SD) or 'mean'
    scheduler: tuple[tuple[str, Any], ...] = SD_SCHEDULER  # diffusers scheduler config items
    # Architecture (diffusers UNet2DConditionModel kwargs; cross_attention_dim is the text
    # encoder's width, in/out channels the VAE's latent channels).
    block_out_channels: tuple[int, ...] = (32, 64)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 1  # resnets per down block (+1 per up block)
    attention_head_dim: int = 4  # heads per attention (diffusers' misnamed key)
    norm_num_groups: int = 8  # GroupNorm groups
    # Evaluation.
    eval_captions: int = 512  # held-out (latent, caption) pairs for the eps loss
    eval_prompts: int = 64  # held-out user prompts sampled once each (0: no sampling)
    sample_steps: int = 20  # DDIM steps of the evaluation samples
    guidance_scale: float = 5.0  # CFG weight w of the evaluation samples
    eta: float = 1.0  # DDIM eta of the evaluation samples (1: the policy Parrot trains)
    encode_batch_size: int = 256  # images per VAE call when building the pool
    log_every: int = 250  # steps between logged losses (0: silent)

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "train_images", "layers_per_block",
                     "attention_head_dim", "norm_num_groups", "eval_captions", "sample_steps",
                     "encode_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} (a positive int)")
        if self.eval_prompts < 0:
            problems.append(f"eval_prompts={self.eval_prompts!r} (>= 0)")
        for name in ("caption_dropout", "p_attribute", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)!r} (in [0, 1])")
        if self.ema_decay == 1.0:
            problems.append("ema_decay=1.0 (the EMA would never move; 0 turns it off)")
        if self.latents not in LATENTS:
            problems.append(f"latents={self.latents!r} (one of {LATENTS})")
        if not 0 <= self.warmup_steps < self.steps:
            problems.append(f"warmup_steps={self.warmup_steps!r} (0 .. steps - 1)")
        if self.batch_size > self.train_images:
            problems.append(f"batch_size={self.batch_size} exceeds train_images="
                            f"{self.train_images}")
        if problems:
            raise ValueError("UNetTrainConfig: " + "; ".join(problems))

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.scheduler)

    def diffusers_config(self, latent_channels: int, latent_size: int,
                         cross_attention_dim: int) -> dict[str, Any]:
        """The architecture as diffusers ``UNet2DConditionModel`` kwargs."""
        return dict(in_channels=latent_channels, out_channels=latent_channels,
                    block_out_channels=self.block_out_channels,
                    down_block_types=self.down_block_types, up_block_types=self.up_block_types,
                    layers_per_block=self.layers_per_block,
                    attention_head_dim=self.attention_head_dim,
                    norm_num_groups=self.norm_num_groups,
                    cross_attention_dim=cross_attention_dim, sample_size=latent_size)


# --- text --------------------------------------------------------------------------------------

def tokenize(tokenizer: Any, texts: Sequence[str], context_length: int) -> np.ndarray:
    """int32 ``[N, context_length]`` ids padded with ``padding='max_length'``, as the Parrot loop
    tokenises the null prompt and ``parrot_jax.sample`` the prompts; a text longer than the
    context is an error naming it (never cut)."""
    enc = tokenizer(list(texts), padding="max_length", max_length=context_length)
    for text, ids in zip(texts, enc["input_ids"]):
        if len(ids) > context_length:
            raise ValueError(f"text {text!r} takes {len(ids)} tokens; the text encoder's "
                             f"context is {context_length}")
    return np.asarray(enc["input_ids"], np.int32)


def encode_text(text_encoder: CLIPTextModel, text_params: Any, ids: jax.Array) -> jax.Array:
    """ids ``[N, L]`` -> ``last_hidden_state [N, L, D]``, no attention mask (as the loop)."""
    return text_encoder.apply({"params": text_params}, ids)["last_hidden_state"]


# --- data --------------------------------------------------------------------------------------

def build_pool(vae: AutoencoderKL, vae_params: Any, rng: np.random.Generator, n: int,
               latents: str, key: jax.Array, batch_size: int = 256,
               size: int = render.IMAGE_SIZE) -> tuple[world.Scenes, np.ndarray]:
    """``n`` random scenes and their scaled latents ``[n, h, w, c]`` (float32), rendered and
    encoded ``batch_size`` at a time (memory stays small)."""
    scenes = world.sample_scenes(rng, n)
    out = []
    for i, lo in enumerate(range(0, n, batch_size)):
        chunk = world.select(scenes, np.arange(lo, min(lo + batch_size, n)))
        images = render.render(chunk, rng, size) * 2.0 - 1.0
        out.append(encode_latents(vae, vae_params, images,
                                  jax.random.fold_in(key, i) if latents == "sample" else None,
                                  batch_size))
    return scenes, (np.concatenate(out) * vae.config.scaling_factor).astype(np.float32)


def draw_captions(scenes: world.Scenes, rng: np.random.Generator, p_attribute: float,
                  dropout: float) -> list[str]:
    """Fresh training captions for ``scenes``, each replaced by "" with probability
    ``dropout``."""
    texts = captions.captions(scenes, rng, p_attribute)
    drop = rng.random(len(texts)) < dropout
    return ["" if d else t for t, d in zip(texts, drop)]


# --- the objective -----------------------------------------------------------------------------

def noise_latents(alphas_cumprod: jax.Array, x0: jax.Array, noise: jax.Array,
                  t: jax.Array) -> jax.Array:
    """DDPM forward process: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; x0, noise
    ``[B, h, w, c]``, t int ``[B]``."""
    abar = alphas_cumprod[t][:, None, None, None]
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def eps_loss(unet: UNet2DConditionModel, params: Any, alphas_cumprod: jax.Array,
             x0: jax.Array, context: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Per-sample mean squared epsilon error ``[B]`` (context ``[B, L, D]``)."""
    pred = unet.apply({"params": params}, noise_latents(alphas_cumprod, x0, noise, t), t,
                      context)
    return jnp.mean(jnp.square(pred - noise), axis=(1, 2, 3))


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "config"),
                   donate_argnums=(0, 1, 2))
def train_step(params: Any, opt_state: Any, ema: Any, x0: jax.Array, ids: jax.Array,
               key: jax.Array, text_params: Any, alphas_cumprod: jax.Array, *,
               unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
               config: UNetTrainConfig) -> tuple[Any, Any, Any, jax.Array]:
    """One AdamW step on x0 ``[B, h, w, c]`` and caption ids ``[B, L]`` (the text encoder is
    frozen) -> (params, opt_state, ema, loss). ``ema`` is None without an EMA."""
    context = jax.lax.stop_gradient(encode_text(text_encoder, text_params, ids))
    t_key, n_key = jax.random.split(key)
    t = jax.random.randint(t_key, (x0.shape[0],), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(eps_loss(unet, p, alphas_cumprod, x0, context, noise, t)))(params)
    updates, opt_state = optimizer_for(config).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if ema is not None:
        d = config.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    return params, opt_state, ema, loss


@functools.partial(jax.jit, static_argnames=("unet", "text_encoder"))
def _eval_loss(params: Any, text_params: Any, alphas_cumprod: jax.Array, x0: jax.Array,
               ids: jax.Array, noise: jax.Array, t: jax.Array, *, unet: UNet2DConditionModel,
               text_encoder: CLIPTextModel) -> jax.Array:
    return eps_loss(unet, params, alphas_cumprod, x0,
                    encode_text(text_encoder, text_params, ids), noise, t)


def eval_eps_loss(unet: UNet2DConditionModel, params: Any, text_encoder: CLIPTextModel,
                  text_params: Any, alphas_cumprod: jax.Array, x0: np.ndarray, ids: np.ndarray,
                  key: jax.Array, batch_size: int = 256) -> float:
    """Mean epsilon loss over x0 ``[N, h, w, c]`` / ids ``[N, L]`` with timesteps and noise
    fixed by ``key`` (the same draws for every params, so values compare)."""
    t_key, n_key = jax.random.split(key)
    t = np.asarray(jax.random.randint(t_key, (len(x0),), 0, alphas_cumprod.shape[0]))
    noise = np.asarray(jax.random.normal(n_key, x0.shape, jnp.float32))
    losses = [_eval_loss(params, text_params, alphas_cumprod, x0[i:i + batch_size],
                         ids[i:i + batch_size], noise[i:i + batch_size], t[i:i + batch_size],
                         unet=unet, text_encoder=text_encoder)
              for i in range(0, len(x0), batch_size)]
    return float(np.mean(np.concatenate([np.asarray(v) for v in losses])))


# --- sampling ----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("unet", "text_encoder", "vae", "latent_shape",
                                             "eta", "scaling_factor"))
def _sample(unet_params: Any, text_params: Any, vae_params: Any, schedule: DDIMSchedule,
            guidance: CFG, ids: jax.Array, null_ids: jax.Array, key: jax.Array, *,
            unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae: AutoencoderKL,
            latent_shape: tuple[int, int, int], eta: float,
            scaling_factor: float) -> jax.Array:
    contexts = branch_contexts(encode_text(text_encoder, text_params, null_ids),
                               encode_text(text_encoder, text_params, ids))
    x_0, _ = rollout(unet, unet_params, schedule, contexts, guidance, key,
                     latent_shape=latent_shape, eta=eta, with_log_probs=False)
    images = vae.apply({"params": vae_params}, x_0 / scaling_factor, method=vae.decode)
    return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)


def sample_images(unet: UNet2DConditionModel, unet_params: Any, vae: AutoencoderKL,
                  vae_params: Any, text_encoder: CLIPTextModel, text_params: Any,
                  tokenizer: Any, prompts: Sequence[str], key: jax.Array, *,
                  num_steps: int = 20, guidance_scale: float = 5.0, eta: float = 1.0,
                  scheduler: Mapping[str, Any] | None = None) -> np.ndarray:
    """One image per prompt, ``[N, H, W, 3]`` float32 in [0, 1]: DDIM (``eta``) with CFG
    against the null prompt "", as the Parrot loop samples, decoded by the VAE."""
    if not prompts:
        raise ValueError("sample_images: no prompts")
    context = text_encoder.config.max_position_embeddings
    ids = tokenize(tokenizer, prompts, context)
    null_ids = tokenize(tokenizer, [""], context)
    schedule = DDIMSchedule.from_config(dict(scheduler or dict(SD_SCHEDULER)), num_steps)
    side = unet.config.sample_size
    if not isinstance(side, int):
        raise ValueError(f"unet.config.sample_size={side!r}: need the latent side (an int)")
    images = _sample(unet_params, text_params, vae_params, schedule, CFG(guidance_scale), ids,
                     null_ids, key, unet=unet, text_encoder=text_encoder, vae=vae,
                     latent_shape=(side, side, unet.config.in_channels), eta=float(eta),
                     scaling_factor=float(vae.config.scaling_factor))
    return np.asarray(images, np.float32)


# --- oracle accuracy ---------------------------------------------------------------------------

def attribute_accuracy(images: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """bool ``[N]`` per attribute from pixels: ``colour`` the prompted colour has a strictly
    smaller oracle hue error than each other colour; ``shape`` the prompted shape's template has
    a strictly larger IoU than each other shape's. Every prompt must name colour and shape."""
    named = [captions.parse(p) for p in prompts]
    for p, n in zip(prompts, named):
        if "colour" not in n or "shape" not in n:
            raise ValueError(f"prompt {p!r} does not name both a colour and a shape")
    colours, shapes = world.ATTRIBUTES["colour"], world.ATTRIBUTES["shape"]
    hue = np.stack([oracle.oracle_metrics(images, [f"a {c} {n['shape']}" for n in named]
                                          )["hue_error"] for c in colours], axis=1)
    iou = np.stack([oracle.oracle_metrics(images, [f"a {n['colour']} {s}" for n in named]
                                          )["shape_iou"] for s in shapes], axis=1)
    rows = np.arange(len(named))
    ci = np.array([colours.index(n["colour"]) for n in named])
    si = np.array([shapes.index(n["shape"]) for n in named])
    hue_others = np.where(np.arange(len(colours)) == ci[:, None], np.inf, hue).min(1)
    iou_others = np.where(np.arange(len(shapes)) == si[:, None], -np.inf, iou).max(1)
    return {"colour": hue[rows, ci] < hue_others, "shape": iou[rows, si] > iou_others}


def sample_metrics(images: np.ndarray, prompts: Sequence[str], prefix: str) -> dict[str, float]:
    """Means of the oracle metrics and accuracies, the std of area and contrast (variety in
    what the prompt leaves open), keyed ``{prefix}_{name}``."""
    scores = oracle.oracle_metrics(images, prompts)
    acc = attribute_accuracy(images, prompts)
    out = {f"{prefix}_{k}": float(np.mean(v)) for k, v in scores.items()}
    out.update({f"{prefix}_{k}_std": float(np.std(scores[k])) for k in ("area", "contrast")})
    out[f"{prefix}_colour_acc"] = float(np.mean(acc["colour"]))
    out[f"{prefix}_shape_acc"] = float(np.mean(acc["shape"]))
    out[f"{prefix}_both_acc"] = float(np.mean(acc["colour"] & acc["shape"]))
    return out


# --- the trainer -------------------------------------------------------------------------------

def build_unet(config: UNetTrainConfig, vae: AutoencoderKL, text_encoder: CLIPTextModel,
               image_size: int = render.IMAGE_SIZE) -> UNet2DConditionModel:
    """The UNet for ``vae``'s latents and ``text_encoder``'s hidden width."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's "
                         f"downsampling factor {factor}")
    cfg = UNetConfig.from_diffusers(
        config.diffusers_config(vae.config.latent_channels, image_size // factor,
                                text_encoder.config.hidden_size), "UNetTrainConfig")
    return UNet2DConditionModel(cfg)


def train_unet(config: UNetTrainConfig, vae: AutoencoderKL, vae_params: Any,
               text_encoder: CLIPTextModel, text_params: Any, tokenizer: Any, seed: int = 0,
               image_size: int = render.IMAGE_SIZE
               ) -> tuple[UNet2DConditionModel, Any, dict[str, float]]:
    """Train a UNet from scratch on ``vae``'s scaled latents with ``text_encoder`` frozen.

    Returns the module, float32 params (the EMA's when it has the lower held-out eps loss) and
    metrics: ``loss_first`` / ``loss_last`` (train eps loss, mean of the first / last 10% of
    steps), ``eval_eps_loss`` and ``eval_eps_loss_ema``, ``used_ema`` (1 / 0),
    ``pool_seconds``, ``train_seconds``, ``steps_per_second`` (after compilation), and with
    ``eval_prompts > 0`` ``sample_*`` oracle metrics and accuracies of samples beside the same
    ``render_*`` numbers for true renders of the prompts, ``sample_seconds``."""
    from parrot_jax.models.random_init import random_params

    unet = build_unet(config, vae, text_encoder, image_size)
    context = text_encoder.config.max_position_embeddings
    schedule = DDIMSchedule.from_config(config.scheduler_config, config.sample_steps,
                                        "UNetTrainConfig.scheduler")
    alphas = schedule.alphas_cumprod
    pool_key, step_key, eval_key, sample_key = jax.random.split(jax.random.key(seed), 4)

    start = time.perf_counter()
    scenes, pool = build_pool(vae, vae_params, np.random.default_rng([seed, 0]),
                              config.train_images, config.latents, pool_key,
                              config.encode_batch_size, image_size)
    eval_rng = np.random.default_rng([seed, 1])
    eval_scenes, eval_x0 = build_pool(vae, vae_params, eval_rng, config.eval_captions,
                                      config.latents, jax.random.fold_in(pool_key, 1),
                                      config.encode_batch_size, image_size)
    eval_ids = tokenize(tokenizer, captions.captions(eval_scenes, eval_rng, config.p_attribute),
                        context)
    pool_seconds = time.perf_counter() - start

    params = random_params(unet, seed)
    opt_state = optimizer_for(config).init(params)
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None
    rng = np.random.default_rng([seed, 2])
    losses = []
    start = time.perf_counter()
    compiled_at = start
    for i in range(config.steps):
        idx = rng.integers(0, len(pool), config.batch_size)
        texts = draw_captions(world.select(scenes, idx), rng, config.p_attribute,
                              config.caption_dropout)
        params, opt_state, ema, loss = train_step(
            params, opt_state, ema, jnp.asarray(pool[idx]), jnp.asarray(tokenize(
                tokenizer, texts, context)), jax.random.fold_in(step_key, i), text_params,
            alphas, unet=unet, text_encoder=text_encoder, config=config)
        losses.append(loss)
        if i == 0:
            loss.block_until_ready()
            compiled_at = time.perf_counter()
        if config.log_every and (i + 1) % config.log_every == 0:
            recent = float(jnp.mean(jnp.stack(losses[-config.log_every:])))
            log.info("unet step %d/%d: eps loss %.4f (%.1f s)", i + 1, config.steps, recent,
                     time.perf_counter() - start)
    jax.block_until_ready(params)
    end = time.perf_counter()
    losses = np.asarray(jnp.stack(losses))
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"train_unet: non-finite loss at step "
                                 f"{int(np.argmin(np.isfinite(losses)))}")

    window = max(1, config.steps // 10)
    metrics = {"loss_first": float(losses[:window].mean()),
               "loss_last": float(losses[-window:].mean()),
               "pool_seconds": pool_seconds, "train_seconds": end - start,
               "steps_per_second": (config.steps - 1) / max(end - compiled_at, 1e-9)}
    evaluate = functools.partial(eval_eps_loss, unet, text_encoder=text_encoder,
                                 text_params=text_params, alphas_cumprod=alphas, x0=eval_x0,
                                 ids=eval_ids, key=eval_key)
    metrics["eval_eps_loss"] = evaluate(params=params)
    metrics["eval_eps_loss_ema"] = metrics["eval_eps_loss"]
    if ema is not None:
        metrics["eval_eps_loss_ema"] = evaluate(params=ema)
        if metrics["eval_eps_loss_ema"] < metrics["eval_eps_loss"]:
            params = ema
    metrics["used_ema"] = float(ema is not None and params is ema)
    log.info("unet eval eps loss %.4f (EMA %.4f)", metrics["eval_eps_loss"],
             metrics["eval_eps_loss_ema"])

    if config.eval_prompts:
        start = time.perf_counter()
        prompt_rng = np.random.default_rng([seed, 3])
        prompts = captions.user_prompts(world.sample_scenes(prompt_rng, config.eval_prompts),
                                        prompt_rng)
        images = sample_images(unet, params, vae, vae_params, text_encoder, text_params,
                               tokenizer, prompts, sample_key, num_steps=config.sample_steps,
                               guidance_scale=config.guidance_scale, eta=config.eta,
                               scheduler=config.scheduler_config)
        metrics["sample_seconds"] = time.perf_counter() - start
        truth = np.concatenate([render.render(captions.scenes_for_prompt(p, prompt_rng, 1),
                                              prompt_rng, image_size) for p in prompts])
        metrics.update(sample_metrics(images, prompts, "sample"))
        metrics.update(sample_metrics(truth, prompts, "render"))
    return unet, params, metrics

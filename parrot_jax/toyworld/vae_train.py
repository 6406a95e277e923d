"""Train the toy world's VAE: 32 x 32 RGB renders <-> 8 x 8 x 4 latents, SD's AutoencoderKL.

Every batch is freshly drawn and rendered from the world (seeded), so the VAE never sees an
image twice. The loss is SD's first-stage objective without the GAN and LPIPS terms: a pixel
reconstruction error of the decoder fed a *sampled* latent (reparameterised), plus a small
KL(q(z | x) || N(0, I)), both averaged per element. After training the latent scale is set the
way SD's 0.18215 was chosen: ``scaling_factor = 1 / std`` of posterior samples on held-out
renders, so the UNet sees latents of unit variance. ``VAEConfig`` carries it; the VAE itself
never applies it (the Parrot loop decodes ``x_0 / scaling_factor``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parrot_jax.models.vae import AutoencoderKL, VAEConfig
from parrot_jax.toyworld import render, world

LOSSES = ("l1", "l2")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    """What to build and how long to train it. Defaults are the shipped model's budget
    (about 6 minutes on 2 CPU cores)."""

    steps: int = 1200  # optimiser steps
    batch_size: int = 32  # images per step (fresh renders every step)
    learning_rate: float = 1e-3  # AdamW peak rate (linear warm-up, cosine decay to 10%)
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # global-norm gradient clip
    loss: str = "l1"  # pixel reconstruction error: 'l1' (sharper edges) or 'l2'
    kl_weight: float = 1e-4  # weight of the per-element KL against the per-pixel error
    image_size: int = 32  # rendered image side in pixels
    # Architecture (diffusers AutoencoderKL kwargs): len(block_out_channels) - 1 downsamplings,
    # 32 -> 8 with three levels.
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1  # resnets per encoder block (+1 per decoder block)
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 8  # GroupNorm groups (divides every width)
    eval_images: int = 512  # held-out renders for PSNR and the scaling factor
    eval_batch_size: int = 128  # images per encode / decode call at evaluation
    log_every: int = 100  # steps between logged losses (0: silent)

    def __post_init__(self):
        problems = []
        for name in ("steps", "batch_size", "image_size", "layers_per_block", "latent_channels",
                     "norm_num_groups", "eval_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} (a positive int)")
        if self.eval_images < 2:
            problems.append(f"eval_images={self.eval_images!r} (at least 2)")
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r} (one of {LOSSES})")
        for name in ("learning_rate", "kl_weight", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} (>= 0)")
        if not 0 <= self.warmup_steps < self.steps:
            problems.append(f"warmup_steps={self.warmup_steps!r} (0 .. steps - 1)")
        factor = self.downsampling
        if self.image_size % factor:
            problems.append(f"image_size={self.image_size} is not divisible by the VAE's "
                            f"downsampling factor {factor} (block_out_channels="
                            f"{self.block_out_channels})")
        if problems:
            raise ValueError("VAETrainConfig: " + "; ".join(problems))

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsampling

    def diffusers_config(self) -> dict[str, Any]:
        """The architecture as diffusers ``AutoencoderKL`` kwargs (``config.json`` keys)."""
        n = len(self.block_out_channels)
        return dict(in_channels=3, out_channels=3, block_out_channels=self.block_out_channels,
                    layers_per_block=self.layers_per_block, latent_channels=self.latent_channels,
                    norm_num_groups=self.norm_num_groups,
                    down_block_types=("DownEncoderBlock2D",) * n,
                    up_block_types=("UpDecoderBlock2D",) * n, sample_size=self.image_size)


def render_batch(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` random scenes rendered to float32 ``[n, size, size, 3]`` in [-1, 1] (the VAE's
    range; the renderer's is [0, 1])."""
    scenes = world.sample_scenes(rng, n)
    return render.render(scenes, rng, size) * 2.0 - 1.0


def vae_loss(vae: AutoencoderKL, params: Any, images: jax.Array, key: jax.Array, *,
             loss: str, kl_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images ``[B, H, W, 3]`` in [-1, 1] -> (total loss, {'recon', 'kl'}), each a scalar mean
    per element (pixel channel / latent channel)."""
    mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    recon = vae.apply({"params": params}, z, method=vae.decode)
    err = recon - images
    recon_loss = jnp.mean(jnp.abs(err)) if loss == "l1" else jnp.mean(jnp.square(err))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return recon_loss + kl_weight * kl, {"recon": recon_loss, "kl": kl}


@functools.partial(jax.jit, static_argnames=("vae", "config"), donate_argnums=(0, 1))
def train_step(params: Any, opt_state: Any, images: jax.Array, key: jax.Array, *,
               vae: AutoencoderKL, config: VAETrainConfig) -> tuple[Any, Any, dict]:
    """One AdamW step on images ``[B, H, W, 3]`` in [-1, 1] -> (params, opt_state,
    {'loss', 'recon', 'kl'})."""
    (total, parts), grads = jax.value_and_grad(
        lambda p: vae_loss(vae, p, images, key, loss=config.loss, kl_weight=config.kl_weight),
        has_aux=True)(params)
    updates, opt_state = optimizer_for(config).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": total, **parts}


def optimizer_for(config: Any) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW with linear warm-up and cosine decay to 10% of the peak
    (``config``: ``learning_rate``, ``warmup_steps``, ``steps``, ``weight_decay``,
    ``max_grad_norm``)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, config.steps,
        end_value=0.1 * config.learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def _batches(images: np.ndarray, size: int):
    for i in range(0, len(images), size):
        yield images[i:i + size]


def encode_latents(vae: AutoencoderKL, params: Any, images: np.ndarray, key: jax.Array | None,
                   batch_size: int = 128) -> np.ndarray:
    """Unscaled latents ``[N, h, w, c]`` of images ``[N, H, W, 3]`` in [-1, 1]: posterior
    samples when ``key`` is given (as SD's ``latent_dist.sample()``), else the means."""
    out = []
    for i, chunk in enumerate(_batches(images, batch_size)):
        mean, logvar = _encode(params, jnp.asarray(chunk), vae=vae)
        if key is not None:
            noise = jax.random.normal(jax.random.fold_in(key, i), mean.shape, mean.dtype)
            mean = mean + jnp.exp(0.5 * logvar) * noise
        out.append(np.asarray(mean))
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("vae",))
def _encode(params: Any, images: jax.Array, *, vae: AutoencoderKL):
    return vae.apply({"params": params}, images, method=vae.encode)


@functools.partial(jax.jit, static_argnames=("vae",))
def _reconstruct(params: Any, images: jax.Array, *, vae: AutoencoderKL):
    return vae.apply({"params": params}, images)


def reconstruct(vae: AutoencoderKL, params: Any, images: np.ndarray,
                batch_size: int = 128) -> np.ndarray:
    """Images ``[N, H, W, 3]`` in [-1, 1] through the posterior means -> ``[N, H, W, 3]``."""
    return np.concatenate([np.asarray(_reconstruct(params, jnp.asarray(c), vae=vae))
                           for c in _batches(images, batch_size)])


def psnr(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of ``images`` against ``reference``, both ``[N, H, W, 3]`` in
    [0, 1] (values are clipped to it first) -> ``[N]``."""
    err = np.clip(images, 0, 1).astype(np.float64) - np.clip(reference, 0, 1)
    mse = np.mean(np.square(err), axis=(1, 2, 3))
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-12))


def latent_scaling_factor(latents: np.ndarray) -> float:
    """``1 / std`` over every element of unscaled latents ``[N, h, w, c]`` (SD's rule)."""
    std = float(np.std(latents.astype(np.float64)))
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"latent std is {std}; the VAE collapsed (no scaling factor)")
    return 1.0 / std


def train_vae(config: VAETrainConfig = VAETrainConfig(),
              seed: int = 0) -> tuple[AutoencoderKL, Any, dict[str, float]]:
    """Train a VAE from scratch; returns the module (its config carries the fitted
    ``scaling_factor``), float32 params and metrics: ``loss_first`` / ``loss_last`` (mean of
    the first / last 10% of steps), ``recon_last``, ``kl_last``, ``eval_psnr`` (dB, mean over
    held-out renders, posterior means), ``scaling_factor``, ``latent_mean``, ``latent_std``,
    ``train_seconds``, ``steps_per_second`` (after compilation)."""
    from parrot_jax.models.random_init import random_params

    vae_cfg = VAEConfig.from_diffusers(config.diffusers_config(), "VAETrainConfig")
    vae = AutoencoderKL(vae_cfg)
    noise_key, eval_key = jax.random.split(jax.random.key(seed))
    params = random_params(vae, seed)
    opt_state = optimizer_for(config).init(params)
    train_rng = np.random.default_rng([seed, 0])
    held_out = render_batch(np.random.default_rng([seed, 1]), config.eval_images,
                            config.image_size)

    start = time.perf_counter()
    compiled_at = None
    history = []
    for i in range(config.steps):
        images = jnp.asarray(render_batch(train_rng, config.batch_size, config.image_size))
        params, opt_state, out = train_step(params, opt_state, images,
                                            jax.random.fold_in(noise_key, i), vae=vae,
                                            config=config)
        history.append(out)
        if i == 0:
            jax.block_until_ready(out)
            compiled_at = time.perf_counter()
        if config.log_every and (i + 1) % config.log_every == 0:
            log.info("vae step %d/%d: loss %.4f recon %.4f kl %.3f (%.1f s)", i + 1,
                     config.steps, float(out["loss"]), float(out["recon"]), float(out["kl"]),
                     time.perf_counter() - start)
    jax.block_until_ready(params)
    end = time.perf_counter()
    history = {k: np.asarray(jnp.stack([h[k] for h in history])) for k in history[0]}
    if not np.all(np.isfinite(history["loss"])):
        bad = int(np.argmin(np.isfinite(history["loss"])))
        raise FloatingPointError(f"train_vae: non-finite loss at step {bad}")

    window = max(1, config.steps // 10)
    recon = reconstruct(vae, params, held_out, config.eval_batch_size)
    latents = encode_latents(vae, params, held_out, eval_key, config.eval_batch_size)
    scale = latent_scaling_factor(latents)
    vae = AutoencoderKL(dataclasses.replace(vae_cfg, scaling_factor=scale))
    metrics = {
        "loss_first": float(history["loss"][:window].mean()),
        "loss_last": float(history["loss"][-window:].mean()),
        "recon_last": float(history["recon"][-window:].mean()),
        "kl_last": float(history["kl"][-window:].mean()),
        "eval_psnr": float(psnr((held_out + 1) / 2, (recon + 1) / 2).mean()),
        "scaling_factor": scale,
        "latent_mean": float(latents.mean()),
        "latent_std": float(latents.std()),
        "train_seconds": end - start,
        "steps_per_second": (config.steps - 1) / max(end - compiled_at, 1e-9),
    }
    return vae, params, metrics

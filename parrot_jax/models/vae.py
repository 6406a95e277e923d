"""Stable Diffusion's variational autoencoder (diffusers ``AutoencoderKL``) in linen, NHWC.

``encode(images) -> (mean, logvar)`` and ``decode(latents) -> images`` with images in [-1, 1].
``config.scaling_factor`` is exposed but never applied here: callers scale latents themselves
(``z = scaling_factor * sample`` before the UNet, ``latents / scaling_factor`` before decode).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from parrot_jax.models.attention import SpatialSelfAttention
from parrot_jax.models.config import (
    ConfigReader,
    check_groups,
    is_positive_int,
    is_positive_ints,
)
from parrot_jax.models.layers import (
    ACTIVATIONS,
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    Upsample2D,
    activation,
    conv,
)
from parrot_jax.models.norm import GroupNorm

VAE_EPS = 1e-6  # diffusers' fixed GroupNorm epsilon inside the VAE


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an ``AutoencoderKL`` (field names and meanings as in diffusers)."""

    in_channels: int = 3  # image channels
    out_channels: int = 3  # decoded image channels
    latent_channels: int = 4  # channels of z
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # width per resolution level
    layers_per_block: int = 2  # resnets per encoder block (+1 per decoder block)
    norm_num_groups: int = 32  # GroupNorm groups
    act_fn: str = "silu"  # non-linearity
    use_quant_conv: bool = True  # 1x1 conv on the encoder moments
    use_post_quant_conv: bool = True  # 1x1 conv on latents before decoding
    mid_block_add_attention: bool = True  # self-attention in the middle blocks
    scaling_factor: float = 0.18215  # latent scale the diffusion model was trained with
    sample_size: Any = None  # nominal image size (informational)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], source: str = "VAE config") -> VAEConfig:
        """Build from a diffusers ``config.json`` dict; raises ConfigError naming every problem."""
        r = ConfigReader(config, source, ignored=("force_upcast",))
        channels = tuple(r.get("block_out_channels", (64,), is_positive_ints,
                               "a non-empty list of positive ints"))
        n = len(channels)
        for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                          ("up_block_types", "UpDecoderBlock2D")):
            types = r.get(key, (kind,))
            if not isinstance(types, (list, tuple)) or set(types) != {kind} or len(types) != n:
                r.problems.append(f"{key}={types!r} (supported: {n} x {kind!r}, one per "
                                  "block_out_channels entry)")
        groups = r.get("norm_num_groups", 32, is_positive_int, "a positive int")
        check_groups(r, channels, groups)
        kwargs = dict(
            in_channels=r.get("in_channels", 3, is_positive_int, "a positive int"),
            out_channels=r.get("out_channels", 3, is_positive_int, "a positive int"),
            latent_channels=r.get("latent_channels", 4, is_positive_int, "a positive int"),
            block_out_channels=channels,
            layers_per_block=r.get("layers_per_block", 1, is_positive_int, "a positive int"),
            norm_num_groups=groups,
            act_fn=r.require("act_fn", tuple(ACTIVATIONS), default="silu"),
            use_quant_conv=bool(r.get("use_quant_conv", True)),
            use_post_quant_conv=bool(r.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(r.get("mid_block_add_attention", True)),
            scaling_factor=r.get("scaling_factor", 0.18215,
                                 lambda v: isinstance(v, (int, float)), "a number"),
            sample_size=r.get("sample_size", None),
        )
        # SD 1.x / 2.x VAEs have no latent shift or per-channel statistics.
        for key in ("shift_factor", "latents_mean", "latents_std"):
            r.require(key, None, default=None)
        r.finish()
        return cls(**kwargs)


class VAEMidBlock(nn.Module):
    """``resnets_0``, optional single-head ``attentions_0``, ``resnets_1`` (UNetMidBlock2D)."""

    cfg: VAEConfig
    attention_impl: str = "xla"  # attention_ops
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, cfg.norm_num_groups, VAE_EPS, cfg.act_fn, name="resnets_0", **kw)(x)
        if cfg.mid_block_add_attention:
            x = SpatialSelfAttention(cfg.norm_num_groups, VAE_EPS, self.attention_impl,
                                     name="attentions_0", **kw)(x)
        return ResnetBlock2D(c, cfg.norm_num_groups, VAE_EPS, cfg.act_fn, name="resnets_1", **kw)(x)


class VAEBlock(nn.Module):
    """Resnets then an optional resample: DownEncoderBlock2D / UpDecoderBlock2D."""

    features: int
    num_layers: int
    resample: str | None  # "down" (stride-2 conv, right/bottom pad), "up" (nearest x2), None
    cfg: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.features, cfg.norm_num_groups, VAE_EPS, cfg.act_fn,
                              name=f"resnets_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample2D(self.features, padding=0, name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample2D(self.features, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Images ``[B, H, W, in]`` -> moments ``[B, H/f, W/f, 2 * latent]`` (f = 2^(blocks-1))."""

    cfg: VAEConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        x = conv(cfg.block_out_channels[0], 3, name="conv_in", **kw)(x)
        for i, c in enumerate(cfg.block_out_channels):
            x = VAEBlock(c, cfg.layers_per_block, "down" if i < n - 1 else None, cfg,
                         name=f"down_blocks_{i}", **kw)(x)
        x = VAEMidBlock(cfg, self.attention_impl, name="mid_block", **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, epsilon=VAE_EPS, name="conv_norm_out", **kw)(x)
        return conv(2 * cfg.latent_channels, 3, name="conv_out", **kw)(activation(cfg.act_fn)(x))


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent]`` -> images ``[B, h*f, w*f, out]``."""

    cfg: VAEConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = tuple(reversed(cfg.block_out_channels))
        x = conv(channels[0], 3, name="conv_in", **kw)(z)
        x = VAEMidBlock(cfg, self.attention_impl, name="mid_block", **kw)(x)
        for i, c in enumerate(channels):
            x = VAEBlock(c, cfg.layers_per_block + 1, "up" if i < len(channels) - 1 else None,
                         cfg, name=f"up_blocks_{i}", **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, epsilon=VAE_EPS, name="conv_norm_out", **kw)(x)
        return conv(cfg.out_channels, 3, name="conv_out", **kw)(activation(cfg.act_fn)(x))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode`` to a diagonal Gaussian, ``decode`` latents. NHWC.
    ``attention_impl``: the middle blocks' self-attention ('xla', 'flash', 'cudnn')."""

    config: VAEConfig
    dtype: Dtype = jnp.float32  # activation dtype; parameters stay param_dtype
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.config
        self.encoder = Encoder(c, self.attention_impl, **kw)
        self.decoder = Decoder(c, self.attention_impl, **kw)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, 1, name="quant_conv", **kw)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, 1, name="post_quant_conv", **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images ``[B, H, W, 3]`` in [-1, 1] -> (mean, logvar) each ``[B, H/f, W/f, latent]``.

        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        moments = self.encoder(images.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents ``[B, h, w, latent]`` (unscaled) -> images ``[B, hf, wf, 3]`` in ~[-1, 1]."""
        out_dtype = latents.dtype
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(out_dtype)

    def __call__(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruct: encode, take the mean (or a sample when ``key`` is given), decode."""
        mean, logvar = self.encode(images)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z)

    def init_params(self, key: jax.Array, batch: int = 1, size: int | None = None) -> Any:
        """Random parameters (jitted init on a dummy image batch of a valid shape)."""
        side = size or 2 ** (len(self.config.block_out_channels) - 1) * 2
        x = jnp.zeros((batch, side, side, self.config.in_channels), jnp.float32)
        return jax.jit(self.init)(key, x)["params"]


def latents_to_images(vae: AutoencoderKL, params: Any, latents: jax.Array,
                      scaling_factor: float) -> jax.Array:
    """Sampled (scaled) latents ``[B, h, w, latent]`` -> images ``[B, H, W, 3]`` in [0, 1], as a
    pipeline shows them: divide by the scaling factor, decode, map [-1, 1] to [0, 1], clip.
    Traceable."""
    images = vae.apply({"params": params}, latents / scaling_factor, method=vae.decode)
    return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)

"""Convolutional building blocks shared by the UNet and the VAE.

All modules are NHWC. Parameter names follow the diffusers-Flax layout (``conv1``, ``norm1``,
``time_emb_proj``, ``conv_shortcut``, ``downsamplers_0/conv`` ...) so PyTorch state dicts convert by
a generic rename + transpose (see ``parrot_jax.hub``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from parrot_jax.models.conv import conv_general_dilated
from parrot_jax.models.norm import GroupNorm

Dtype = Any

ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "relu": nn.relu}


def activation(name: str):
    """The elementwise non-linearity a diffusers config names (``act_fn``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported act_fn {name!r}; supported: {sorted(ACTIVATIONS)}")
    fn = ACTIVATIONS[name]
    if name == "gelu":  # torch's GELU is the exact (erf) one
        return lambda x: nn.gelu(x, approximate=False)
    return fn


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers.

    timesteps: ``[B]``. Returns float32 ``[B, dim]``: ``[sin, cos]`` or ``[cos, sin]`` halves with
    frequencies ``exp(-log(max_period) * i / (dim/2 - freq_shift))``; odd ``dim`` pads one zero.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding: ``linear_1 -> act -> linear_2``."""

    features: int
    act_fn: str = "silu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> jax.Array:
        dense = lambda name: nn.Dense(  # noqa: E731
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        return dense("linear_2")(activation(self.act_fn)(dense("linear_1")(emb)))


def conv(features: int, kernel: int, *, stride: int = 1, padding: int | None = None,
         dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    """A ``kernel x kernel`` NHWC convolution with torch-style symmetric padding (its gradients
    from ``models.conv``, which avoids XLA:CPU's per-call kernel transposes)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv -> (+ time embedding) -> GroupNorm -> act -> conv, plus a skip.

    The skip is a 1x1 ``conv_shortcut`` when the input channel count differs from ``features``.
    ``temb`` may be ``None`` (the VAE), in which case no ``time_emb_proj`` exists.
    """

    features: int
    groups: int = 32
    eps: float = 1e-5
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, epsilon=self.eps, name="norm1", **kw)(x)
        h = conv(self.features, 3, name="conv1", **kw)(act(h))
        if temb is not None:
            t = nn.Dense(self.features, name="time_emb_proj", **kw)(act(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, epsilon=self.eps, name="norm2", **kw)(h)
        h = conv(self.features, 3, name="conv2", **kw)(act(h))
        if x.shape[-1] != self.features:
            x = conv(self.features, 1, name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads right/bottom by one first (the VAE encoder's rule)."""

    features: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.features, 3, stride=2, padding=self.padding, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.features, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv")(x)

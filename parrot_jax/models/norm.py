"""GroupNorm over NHWC maps, with statistics and a backward pass written for XLA's compilers.

``flax.linen.GroupNorm`` reduces ``x.reshape(N, H*W, G, C/G)`` over the two non-adjacent axes
(1, 3) at once, which XLA:CPU runs about 5x slower than the same sums done as a per-channel
reduction over H, W followed by a tiny per-group sum; its autodiff backward then repeats the
pattern. ``group_norm`` reduces per channel first, computes the variance in two passes (no
``E[x^2] - E[x]^2`` cancellation), and has a closed-form backward. Same parameters as flax's
(``scale``, ``bias``, both ``[C]``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = jnp.dtype


def _group_sum(per_channel: jax.Array, groups: int) -> jax.Array:
    """``[N, C] -> [N, G]``: sums over each group's ``C / G`` channels."""
    n, c = per_channel.shape
    return per_channel.reshape(n, groups, c // groups).sum(-1)


def _per_channel(per_group: jax.Array, channels: int) -> jax.Array:
    """``[N, G] -> [N, 1, 1, C]``, each group's value repeated over its channels."""
    return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)[:, None, None, :]


def _statistics(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """float32 per-group mean and ``1 / sqrt(var + eps)``, each ``[N, G]``."""
    n, h, w, c = x.shape
    count = h * w * (c // groups)
    x = x.astype(jnp.float32)
    mean = _group_sum(jnp.sum(x, axis=(1, 2)), groups) / count
    centred = x - _per_channel(mean, c)
    var = _group_sum(jnp.sum(jnp.square(centred), axis=(1, 2)), groups) / count
    return mean, jax.lax.rsqrt(var + eps)


def _forward(x, scale, bias, groups, eps):
    c = x.shape[-1]
    mean, rstd = _statistics(x, groups, eps)
    gain = _per_channel(rstd, c) * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - _per_channel(mean, c)) * gain + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, scale, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               eps: float) -> jax.Array:
    """``(x - mean_g) / sqrt(var_g + eps) * scale + bias``: x ``[N, H, W, C]``, scale and bias
    ``[C]``; statistics per sample over H, W and each group of ``C / groups`` channels, in
    float32. Returns x's shape and dtype."""
    return _forward(x, scale, bias, groups, eps)[0]


def _backward(groups, eps, residuals, dy):
    x, scale, mean, rstd = residuals
    n, h, w, c = x.shape
    count = h * w * (c // groups)
    dy = dy.astype(jnp.float32)
    scale32 = scale.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - _per_channel(mean, c)) * _per_channel(rstd, c)
    d_bias = jnp.sum(dy, axis=(1, 2))  # [N, C]
    d_scale = jnp.sum(dy * x_hat, axis=(1, 2))  # [N, C]
    # With g = dy * scale: dx = rstd * (g - mean_group(g) - x_hat * mean_group(g * x_hat)).
    g_mean = _group_sum(d_bias * scale32, groups) / count
    gx_mean = _group_sum(d_scale * scale32, groups) / count
    dx = _per_channel(rstd, c) * (dy * scale32 - _per_channel(g_mean, c)
                                  - x_hat * _per_channel(gx_mean, c))
    return (dx.astype(x.dtype), d_scale.sum(0).astype(scale.dtype),
            d_bias.sum(0).astype(scale.dtype))


group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
    """``group_norm`` with learned ``scale`` (ones) and ``bias`` (zeros), as flax's GroupNorm.

    The output has ``dtype``; statistics are always float32.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype | None = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if x.ndim != 4 or c % self.num_groups:
            raise ValueError(f"GroupNorm({self.num_groups}) needs [N, H, W, C] with C divisible "
                             f"by the groups; got {x.shape}")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return group_norm(x.astype(self.dtype or x.dtype), scale, bias, self.num_groups,
                          self.epsilon)

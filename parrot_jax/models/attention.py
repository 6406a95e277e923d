"""Attention and transformer blocks of Stable Diffusion's UNet and VAE.

Tokens are ``[B, T, D]``; the 2-D wrappers take NHWC maps. Masked attention (CLIP's causal text
encoder) goes through ``jax.nn.dot_product_attention``; the unmasked attention of the UNet and
VAE through ``attention_ops.attend``: self-attention by the module's ``attention_impl`` ('xla',
'flash' or 'cudnn', resolved from ``model.attention``), cross-attention always by the XLA form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from parrot_jax.models.attention_ops import attend
from parrot_jax.models.layers import Dtype, conv
from parrot_jax.models.norm import GroupNorm


class Attention(nn.Module):
    """Multi-head attention with ``query``/``key``/``value``/``proj_attn`` projections.

    Self-attention when ``context`` is None, else cross-attention to ``context`` ``[B, S, Dc]``.
    ``upcast`` computes scores and softmax in float32 whatever the activation dtype
    (diffusers' ``upcast_attention``, needed by SD 2.x in half precision). ``attention_impl``
    computes self-attention ('xla', 'flash', 'cudnn': ``attention_ops``).
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    upcast: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        return multi_head_attention(x, x if context is None else context, self.heads,
                                    self.head_dim, qkv_bias=self.qkv_bias, upcast=self.upcast,
                                    dtype=self.dtype, param_dtype=self.param_dtype,
                                    implementation="xla" if context is not None
                                    else self.attention_impl)


DIFFUSERS_NAMES = ("query", "key", "value", "proj_attn")


def tokenwise(layer: nn.Module, x: jax.Array) -> jax.Array:
    """``layer`` on ``x [..., D]`` flattened to ``[N, D]``: the weight gradient is then one plain
    matrix product (XLA:CPU takes a much slower path for multi-axis contractions)."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (-1,))


def multi_head_attention(x: jax.Array, context: jax.Array, heads: int, head_dim: int, *,
                         qkv_bias: bool, upcast: bool, dtype: Dtype, param_dtype: Dtype,
                         mask: jax.Array | None = None, is_causal: bool = False,
                         names: tuple[str, str, str, str] = DIFFUSERS_NAMES,
                         implementation: str = "xla") -> jax.Array:
    """Attention whose projections become children of the calling compact module.

    x ``[B, T, D]``, context ``[B, S, Dc]`` -> ``[B, T, D]``; ``mask`` boolean, broadcastable to
    ``[B, heads, T, S]``, True where attending is allowed. Called from a compact method so the
    UNet's ``attn1``/``attn2``, the VAE's flat ``attentions_0`` and CLIP's ``self_attn`` own the
    q / k / v / out projections directly, under the checkpoint's ``names`` for them.
    Unmasked attention runs by ``implementation`` (``attention_ops.attend``).
    """
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    q_name, k_name, v_name, out_name = names
    q = tokenwise(nn.Dense(inner, use_bias=qkv_bias, name=q_name, **kw), x)
    k = tokenwise(nn.Dense(inner, use_bias=qkv_bias, name=k_name, **kw), context)
    v = tokenwise(nn.Dense(inner, use_bias=qkv_bias, name=v_name, **kw), context)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    if mask is None and not is_causal:
        out = attend(q, k, v, implementation)
    else:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    out = out.reshape(out.shape[:2] + (inner,)).astype(dtype)
    return tokenwise(nn.Dense(x.shape[-1], name=out_name, **kw), out)


class GEGLU(nn.Module):
    """``proj`` to twice the width, then ``hidden * gelu(gate)`` (exact GELU, as torch)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_0`` (GEGLU to ``mult * dim``) then ``net_2`` back to ``dim``."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = tokenwise(GEGLU(self.mult * dim, name="net_0", **kw), x)
        return tokenwise(nn.Dense(dim, name="net_2", **kw), h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention and GEGLU feed-forward, each residual."""

    heads: int
    head_dim: int
    upcast: bool = False
    attention_impl: str = "xla"  # of the self-attention (attention_ops)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: Attention(self.heads, self.head_dim, upcast=self.upcast,  # noqa: E731
                                      attention_impl=self.attention_impl, name=name, **kw)
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)  # noqa: E731
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> ``proj_in`` -> transformer blocks over the H*W tokens -> ``proj_out`` + skip.

    ``use_linear_projection`` selects Dense projections on tokens (SD 2.x) instead of 1x1 convs
    on the map (SD 1.x); the two are the same function with differently shaped parameters.
    """

    heads: int
    head_dim: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    attention_impl: str = "xla"  # of the self-attention (attention_ops)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def project(features: int, name: str):
            if self.use_linear_projection:
                return lambda t: tokenwise(nn.Dense(features, name=name, **kw), t)
            return conv(features, 1, name=name, **kw)

        # Both projections act on the channel axis of the NHWC map (a Dense there is a 1x1 conv).
        y = GroupNorm(self.groups, epsilon=1e-6, name="norm", **kw)(x)
        y = project(inner, "proj_in")(y).reshape(b, h * w, inner)
        for i in range(self.depth):
            y = BasicTransformerBlock(self.heads, self.head_dim, upcast=self.upcast,
                                      attention_impl=self.attention_impl,
                                      name=f"transformer_blocks_{i}", **kw)(y, context)
        return x + project(c, "proj_out")(y.reshape(b, h, w, inner))


class SpatialSelfAttention(nn.Module):
    """The VAE's single-head attention over pixels: ``group_norm``, biased q/k/v, residual."""

    groups: int = 32
    eps: float = 1e-6
    attention_impl: str = "xla"  # attention_ops
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = GroupNorm(self.groups, epsilon=self.eps, name="group_norm", **kw)(x)
        y = y.reshape(b, h * w, c)
        y = multi_head_attention(y, y, 1, c, qkv_bias=True, upcast=True,
                                 implementation=self.attention_impl, **kw)
        return x + y.reshape(b, h, w, c)

"""Stable Diffusion's conditional UNet (diffusers ``UNet2DConditionModel``, SD 1.x / 2.x) in linen.

NHWC throughout. Parameter paths follow diffusers-Flax naming
(``down_blocks_0/attentions_0/transformer_blocks_0/attn2/query/kernel``), so diffusers-Flax
msgpack checkpoints load as they are and PyTorch state dicts convert by rename + transpose.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from parrot_jax.models.attention import Transformer2DModel
from parrot_jax.models.config import (
    ConfigReader,
    check_groups,
    is_int,
    is_positive_int,
    is_positive_ints,
    per_block,
)
from parrot_jax.models.layers import (
    ACTIVATIONS,
    Downsample2D,
    Dtype,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    activation,
    conv,
    timestep_embedding,
)
from parrot_jax.models.norm import GroupNorm

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet2DConditionModel`` (field names and meanings as in diffusers).

    Per-block fields are tuples with one entry per down block (up blocks use them reversed).
    """

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # channels of the prediction (eps or v)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # None drops the middle block
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)  # resnets per down block (+1 per up block)
    # Heads per block (what SD configs misname "attention_head_dim").
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)  # transformer depth per block
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)  # text-encoder width per block
    use_linear_projection: bool = False  # Dense proj_in/out (SD 2.x) instead of 1x1 convs
    upcast_attention: bool = False  # attention scores/softmax in float32
    center_input_sample: bool = False  # map the input from [0, 1] to [-1, 1] first
    flip_sin_to_cos: bool = True  # time embedding as [cos, sin] (True) or [sin, cos]
    freq_shift: float = 0.0  # frequency denominator offset of the time embedding
    time_embedding_dim: int | None = None  # time MLP width; None means 4 * block_out_channels[0]
    downsample_padding: int = 1  # padding of the stride-2 convs
    mid_block_scale_factor: float = 1.0  # output scale of the middle block's resnets
    act_fn: str = "silu"  # non-linearity of resnets and the time MLP
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon of resnets and the output norm
    conv_in_kernel: int = 3  # kernel size of conv_in
    conv_out_kernel: int = 3  # kernel size of conv_out
    sample_size: Any = None  # nominal latent size (informational)

    @property
    def time_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], source: str = "UNet config") -> UNetConfig:
        """Build from a diffusers ``config.json`` dict; raises ConfigError naming every problem."""
        r = ConfigReader(config, source, ignored=("mid_block_only_cross_attention",
                                                  "addition_embed_type_num_heads"))
        down = tuple(r.get("down_block_types", cls.down_block_types,
                           lambda v: isinstance(v, (list, tuple)) and set(v) <= set(DOWN_BLOCKS),
                           f"supported block types: {', '.join(DOWN_BLOCKS)}"))
        up = tuple(r.get("up_block_types", cls.up_block_types,
                         lambda v: isinstance(v, (list, tuple)) and set(v) <= set(UP_BLOCKS),
                         f"supported block types: {', '.join(UP_BLOCKS)}"))
        channels = tuple(r.get("block_out_channels", cls.block_out_channels, is_positive_ints,
                               "a non-empty list of positive ints"))
        n = len(channels)
        if len(down) != n or len(up) != n:
            r.problems.append(f"down_block_types ({len(down)}), up_block_types ({len(up)}) and "
                              f"block_out_channels ({n}) must have the same length")
        heads_dim = r.get("attention_head_dim", 8)
        heads = r.get("num_attention_heads", None)
        # diffusers' historical misnomer: "attention_head_dim" holds the number of heads.
        heads = per_block(heads if heads is not None else heads_dim, n, "num_attention_heads", r)
        if not all(is_positive_int(h) for h in heads):
            r.problems.append(f"attention heads {list(heads)!r} (positive ints)")
        depth = per_block(r.get("transformer_layers_per_block", 1), n,
                          "transformer_layers_per_block", r)
        if not all(is_positive_int(d) for d in depth):
            r.problems.append(f"transformer_layers_per_block={list(depth)!r} "
                              "(an int or one int per block)")
        layers = per_block(r.get("layers_per_block", 2), n, "layers_per_block", r)
        if not all(is_positive_int(d) for d in layers):
            r.problems.append(f"layers_per_block={list(layers)!r} (an int or one int per block)")
        cross = per_block(r.get("cross_attention_dim", 1280), n, "cross_attention_dim", r)
        if not all(is_positive_int(d) for d in cross):
            r.problems.append(f"cross_attention_dim={list(cross)!r} (an int or one per block)")
        only_cross = r.get("only_cross_attention", False)
        if any(per_block(only_cross, n, "only_cross_attention", r)):
            r.problems.append(f"only_cross_attention={only_cross!r} (unsupported; must be false)")
        groups = r.get("norm_num_groups", 32, is_positive_int, "a positive int")
        check_groups(r, channels, groups)
        kwargs = dict(
            in_channels=r.get("in_channels", 4, is_positive_int, "a positive int"),
            out_channels=r.get("out_channels", 4, is_positive_int, "a positive int"),
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=r.require("mid_block_type", MID_BLOCKS, default=MID_BLOCKS[0]),
            layers_per_block=layers,
            num_attention_heads=heads,
            transformer_layers_per_block=depth,
            cross_attention_dim=cross,
            use_linear_projection=bool(r.get("use_linear_projection", False)),
            upcast_attention=bool(r.get("upcast_attention", False)),
            center_input_sample=bool(r.get("center_input_sample", False)),
            flip_sin_to_cos=bool(r.get("flip_sin_to_cos", True)),
            freq_shift=r.get("freq_shift", 0, lambda v: isinstance(v, (int, float)), "a number"),
            time_embedding_dim=r.get("time_embedding_dim", None,
                                     lambda v: v is None or is_positive_int(v), "None or an int"),
            downsample_padding=r.get("downsample_padding", 1, lambda v: is_int(v) and v >= 0,
                                     "a non-negative int"),
            mid_block_scale_factor=r.get("mid_block_scale_factor", 1.0),
            act_fn=r.require("act_fn", tuple(ACTIVATIONS), default="silu"),
            norm_num_groups=groups,
            norm_eps=r.get("norm_eps", 1e-5, lambda v: isinstance(v, (int, float)) and v > 0,
                           "a positive number"),
            conv_in_kernel=r.get("conv_in_kernel", 3, lambda v: is_positive_int(v) and v % 2,
                                 "an odd positive int"),
            conv_out_kernel=r.get("conv_out_kernel", 3, lambda v: is_positive_int(v) and v % 2,
                                  "an odd positive int"),
            sample_size=r.get("sample_size", None),
        )
        # Features of diffusers' UNet that SD 1.x / 2.x do not use: only their neutral values.
        for key, neutral in [
            ("dual_cross_attention", False), ("class_embed_type", None),
            ("addition_embed_type", None), ("addition_time_embed_dim", None),
            ("num_class_embeds", None), ("encoder_hid_dim", None),
            ("encoder_hid_dim_type", None), ("resnet_time_scale_shift", "default"),
            ("resnet_skip_time_act", False), ("resnet_out_scale_factor", 1.0),
            ("time_embedding_type", "positional"), ("time_embedding_act_fn", None),
            ("timestep_post_act", None), ("time_cond_proj_dim", None),
            ("projection_class_embeddings_input_dim", None), ("attention_type", "default"),
            ("class_embeddings_concat", False), ("cross_attention_norm", None),
            ("reverse_transformer_layers_per_block", None), ("dropout", 0.0),
        ]:
            r.require(key, neutral, default=neutral)
        r.finish()
        return cls(**kwargs)


def _remat(cls: type[nn.Module], policy: str | None) -> type[nn.Module]:
    """``cls`` wrapped in ``nn.remat`` with the named ``jax.checkpoint_policies`` entry."""
    if policy is None:
        return cls
    fn = getattr(jax.checkpoint_policies, policy, None)
    # The save_* / offload* entries are policy factories that need arguments, not policies.
    if fn is None or policy.startswith(("save_", "offload")):
        raise ValueError(f"unknown remat policy {policy!r}: use a jax.checkpoint_policies name "
                         "such as 'nothing_saveable' (recompute all) or 'dots_saveable'")
    return nn.remat(cls, policy=fn)


def _transformer(cfg: UNetConfig, heads: int, channels: int, depth: int, name: str,
                 kw: dict, attention_impl: str) -> Transformer2DModel:
    """The cross-attention transformer of a block: ``heads`` heads of ``channels // heads``."""
    return Transformer2DModel(heads, channels // heads, depth, cfg.norm_num_groups,
                              cfg.use_linear_projection, cfg.upcast_attention,
                              attention_impl, name=name, **kw)


class DownBlock(nn.Module):
    """Resnets (each followed by a transformer if ``attention``) then an optional downsample.

    Returns the output and the skip tensors (one per resnet, plus the downsampled one).
    """

    features: int
    num_layers: int
    attention: bool
    heads: int
    depth: int
    add_downsample: bool
    cfg: UNetConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.features, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                              name=f"resnets_{i}", **kw)(x, temb)
            if self.attention:
                x = _transformer(cfg, self.heads, x.shape[-1], self.depth, f"attentions_{i}",
                                 kw, self.attention_impl)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.features, cfg.downsample_padding, name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """``resnets_0``, then (transformer, resnet) pairs: UNetMidBlock2DCrossAttn."""

    heads: int
    depth: int
    cfg: UNetConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        resnet = lambda i: ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,  # noqa: E731
                                         cfg.mid_block_scale_factor, name=f"resnets_{i}", **kw)
        x = resnet(0)(x, temb)
        x = _transformer(cfg, self.heads, c, self.depth, "attentions_0", kw,
                         self.attention_impl)(x, context)
        return resnet(1)(x, temb)


class UpBlock(nn.Module):
    """Resnets on ``concat(x, skip)`` (last skip first), transformers, optional upsample."""

    features: int
    num_layers: int
    attention: bool
    heads: int
    depth: int
    add_upsample: bool
    cfg: UNetConfig
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.features, cfg.norm_num_groups, cfg.norm_eps, cfg.act_fn,
                              name=f"resnets_{i}", **kw)(x, temb)
            if self.attention:
                x = _transformer(cfg, self.heads, x.shape[-1], self.depth, f"attentions_{i}",
                                 kw, self.attention_impl)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.features, name="upsamplers_0", **kw)(x)
        return x


class UNet2DConditionModel(nn.Module):
    """The text-conditioned denoiser ``eps_theta(x_t, t, c)`` (or ``v``), NHWC.

    ``remat_policy`` rematerialises each down/mid/up block during backprop: ``None`` (off) or a
    ``jax.checkpoint_policies`` name such as ``'nothing_saveable'`` or ``'dots_saveable'``.
    ``attention_impl`` computes the self-attention: 'xla', 'flash' or 'cudnn'
    (``attention_ops``; ``model.attention`` resolved for the platform).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32  # activation dtype; parameters stay param_dtype
    param_dtype: Dtype = jnp.float32
    remat_policy: str | None = None
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array,
                 encoder_hidden_states: jax.Array) -> jax.Array:
        """sample ``[B, H, W, C]``, timesteps ``[B]`` or scalar, context ``[B, L, D]``.

        Returns the prediction shaped and typed like ``sample``.

        H and W must be divisible by ``2 ** (number of down blocks - 1)``.
        """
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        factor = 2 ** (n - 1)
        if sample.ndim != 4 or sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"sample must be [B, H, W, C] with H, W divisible by {factor}; "
                             f"got {sample.shape}")
        out_dtype = sample.dtype
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        context = encoder_hidden_states.astype(self.dtype)

        temb = timestep_embedding(timesteps, cfg.block_out_channels[0],
                                  flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_dim, cfg.act_fn, name="time_embedding", **kw)(
            temb.astype(self.dtype))

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, name="conv_in", **kw)(x)

        down_cls = _remat(DownBlock, self.remat_policy)
        skips = [x]
        for i, kind in enumerate(cfg.down_block_types):
            x, s = down_cls(cfg.block_out_channels[i], cfg.layers_per_block[i],
                            kind == "CrossAttnDownBlock2D", cfg.num_attention_heads[i],
                            cfg.transformer_layers_per_block[i], i < n - 1, cfg,
                            self.attention_impl, name=f"down_blocks_{i}", **kw)(x, temb, context)
            skips.extend(s)

        if cfg.mid_block_type is not None:
            x = _remat(MidBlock, self.remat_policy)(
                cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1], cfg,
                self.attention_impl, name="mid_block", **kw)(x, temb, context)

        up_cls = _remat(UpBlock, self.remat_policy)
        rev = lambda t: tuple(reversed(t))  # noqa: E731
        for i, kind in enumerate(cfg.up_block_types):
            num = rev(cfg.layers_per_block)[i] + 1
            block_skips, skips = tuple(skips[-num:]), skips[:-num]
            x = up_cls(rev(cfg.block_out_channels)[i], num, kind == "CrossAttnUpBlock2D",
                       rev(cfg.num_attention_heads)[i], rev(cfg.transformer_layers_per_block)[i],
                       i < n - 1, cfg, self.attention_impl,
                       name=f"up_blocks_{i}", **kw)(x, block_skips, temb, context)

        x = GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out", **kw)(x)
        x = activation(cfg.act_fn)(x)
        x = conv(cfg.out_channels, cfg.conv_out_kernel, name="conv_out", **kw)(x)
        return x.astype(out_dtype)

    def init_params(self, key: jax.Array, batch: int = 1, size: int | None = None,
                    text_len: int = 1) -> Any:
        """Random parameters (jitted init on dummy inputs of a valid shape)."""
        side = size or 2 ** (len(self.config.block_out_channels) - 1) * 2
        x = jnp.zeros((batch, side, side, self.config.in_channels), jnp.float32)
        ctx = jnp.zeros((batch, text_len, self.config.cross_attention_dim[0]), jnp.float32)
        return jax.jit(self.init)(key, x, jnp.zeros((batch,), jnp.int32), ctx)["params"]

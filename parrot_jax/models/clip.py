"""CLIP text and vision transformers (transformers' ``CLIPModel`` family) in linen.

Parameter paths are those ``parrot_jax.convert`` derives from transformers' state dicts
(``text_model/encoder/layers_0/self_attn/q_proj/kernel``), so checkpoints convert generically.
Images are NHWC and already normalised with CLIP's mean / std.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from parrot_jax.models.attention import multi_head_attention
from parrot_jax.models.config import ConfigReader, is_int, is_positive_int
from parrot_jax.models.layers import Dtype

CLIP_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _read_tower(r: ConfigReader, defaults: dict[str, Any]) -> dict[str, Any]:
    """The architecture keys both towers share, checked; transformers' defaults when absent."""
    out = {k: r.get(k, defaults[k], is_positive_int, "a positive int")
           for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads")}
    out["hidden_act"] = r.require("hidden_act", tuple(CLIP_ACTIVATIONS), default="quick_gelu")
    out["layer_norm_eps"] = r.get("layer_norm_eps", 1e-5,
                                  lambda v: isinstance(v, (int, float)) and v > 0, "positive")
    if is_positive_int(out["hidden_size"]) and is_positive_int(out["num_attention_heads"]) \
            and out["hidden_size"] % out["num_attention_heads"]:
        r.problems.append(f"hidden_size={out['hidden_size']} not divisible by "
                          f"num_attention_heads={out['num_attention_heads']}")
    return out


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower (fields and defaults as transformers' ``CLIPTextConfig``)."""

    vocab_size: int = 49408
    hidden_size: int = 512  # token width
    intermediate_size: int = 2048  # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77  # context length
    hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI) or gelu (OpenCLIP ViT-H)
    layer_norm_eps: float = 1e-5
    # Pooling: 2 marks pre-2023 configs, which pool at argmax(input_ids) (the highest id is
    # the end-of-text token in CLIP's vocabulary); otherwise the first position of this id.
    eos_token_id: int = 49407
    projection_dim: int | None = None  # width of text_projection; None: no projection

    @classmethod
    def from_transformers(cls, config: dict[str, Any], source: str,
                          projection_dim: int | None = None) -> CLIPTextConfig:
        r = ConfigReader(config, source)
        tower = _read_tower(r, {"hidden_size": 512, "intermediate_size": 2048,
                                "num_hidden_layers": 12, "num_attention_heads": 8})
        kwargs = dict(
            vocab_size=r.get("vocab_size", 49408, is_positive_int, "a positive int"),
            max_position_embeddings=r.get("max_position_embeddings", 77, is_positive_int,
                                          "a positive int"),
            eos_token_id=r.get("eos_token_id", 49407, is_int, "one int"),
            projection_dim=projection_dim, **tower)
        r.finish(allow_unknown=True)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower (fields and defaults as transformers' ``CLIPVisionConfig``)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # input side in pixels; position embeddings are fixed to it
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # width of visual_projection; None: no projection

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: dict[str, Any], source: str,
                          projection_dim: int | None = None) -> CLIPVisionConfig:
        r = ConfigReader(config, source)
        tower = _read_tower(r, {"hidden_size": 768, "intermediate_size": 3072,
                                "num_hidden_layers": 12, "num_attention_heads": 12})
        kwargs = dict(
            num_channels=r.get("num_channels", 3, is_positive_int, "a positive int"),
            image_size=r.get("image_size", 224, is_positive_int, "a positive int"),
            patch_size=r.get("patch_size", 32, is_positive_int, "a positive int"),
            projection_dim=projection_dim, **tower)
        r.finish(allow_unknown=True)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A dual encoder: both towers, their shared projection width and the logit scale."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07); trained checkpoints overwrite it

    @classmethod
    def from_transformers(cls, config: dict[str, Any], source: str) -> CLIPConfig:
        """A ``CLIPModel`` config.json: nested ``text_config`` / ``vision_config`` (and the legacy
        ``*_config_dict`` entries, which override them as in transformers)."""
        r = ConfigReader(config, source)
        dim = r.get("projection_dim", 512, is_positive_int, "a positive int")
        scale = r.get("logit_scale_init_value", 2.6592)
        towers = {}
        for name in ("text", "vision"):
            sub = dict(r.get(f"{name}_config", None) or {})
            sub.update(r.get(f"{name}_config_dict", None) or {})
            towers[name] = sub
        r.finish(allow_unknown=True)
        return cls(
            text=CLIPTextConfig.from_transformers(towers["text"], f"{source} text_config", dim),
            vision=CLIPVisionConfig.from_transformers(towers["vision"],
                                                      f"{source} vision_config", dim),
            projection_dim=dim, logit_scale_init_value=scale)


class EncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    heads: int
    intermediate_size: int
    act: str
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm1", **kw)(x)
        x = x + SelfAttention(self.heads, name="self_attn", **kw)(h, mask)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm2", **kw)(x)
        return x + MLP(self.intermediate_size, self.act, name="mlp", **kw)(h)


class SelfAttention(nn.Module):
    """CLIP's biased multi-head self-attention (``q_proj``/``k_proj``/``v_proj``/``out_proj``)."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        d = x.shape[-1]
        return multi_head_attention(x, x, self.heads, d // self.heads, qkv_bias=True,
                                    upcast=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                    mask=mask, names=CLIP_NAMES)


class MLP(nn.Module):
    """``fc1 -> act -> fc2``."""

    intermediate_size: int
    act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = CLIP_ACTIVATIONS[self.act](nn.Dense(self.intermediate_size, name="fc1", **kw)(x))
        return nn.Dense(x.shape[-1], name="fc2", **kw)(h)


class Encoder(nn.Module):
    """``layers_0 ... layers_{n-1}``."""

    config: Any  # CLIPTextConfig | CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x ``[B, T, D]``; mask boolean, broadcastable to ``[B, heads, T, T]``."""
        c = self.config
        for i in range(c.num_hidden_layers):
            x = EncoderLayer(c.num_attention_heads, c.intermediate_size, c.hidden_act,
                             c.layer_norm_eps, name=f"layers_{i}", dtype=self.dtype,
                             param_dtype=self.param_dtype)(x, mask)
        return x


class TextTransformer(nn.Module):
    """Token + position embeddings, causal pre-LN encoder, final LN, pooling at end-of-text."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """input_ids ``[B, L]`` (L <= max_position_embeddings), attention_mask ``[B, L]`` (1 =
        token, 0 = padding) -> (last_hidden_state ``[B, L, D]``, pooled ``[B, D]``)."""
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = input_ids.shape[1]
        if length > c.max_position_embeddings:
            raise ValueError(f"input_ids has {length} tokens; the text encoder takes at most "
                             f"{c.max_position_embeddings}")
        x = TextEmbeddings(c, name="embeddings", **kw)(input_ids)
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x = Encoder(c, name="encoder", **kw)(x, mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="final_layer_norm", **kw)(x)
        if c.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first end-of-text token (padding may reuse the same id)
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        return x, x[jnp.arange(x.shape[0]), eos]


class TextEmbeddings(nn.Module):
    """``token_embedding(ids) + position_embedding(0..L-1)``."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size,
                             name="position_embedding", **kw)
        return tokens(input_ids) + positions(jnp.arange(input_ids.shape[1]))[None]


class VisionTransformer(nn.Module):
    """Patch conv + class token + positions, pre-LN, encoder, post-LN on the class token."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values ``[B, S, S, C]`` normalised, S = image_size -> (last_hidden_state
        ``[B, 1 + (S/patch)^2, D]``, pooled ``[B, D]``)."""
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [B, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}] (NHWC); got {pixel_values.shape}")
        x = VisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = Encoder(c, name="encoder", **kw)(x)
        pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


class VisionEmbeddings(nn.Module):
    """``class_embedding`` + ``patch_embedding`` (stride = patch, no bias) + positions."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID",
                          use_bias=False, name="patch_embedding", **kw)(
            pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)),
                             patches], axis=1)
        positions = nn.Embed(c.num_patches + 1, c.hidden_size, name="position_embedding", **kw)
        return x + positions(jnp.arange(c.num_patches + 1))[None]


def _project(width: int | None, name: str, kw: dict, pooled: jax.Array) -> jax.Array | None:
    """A bias-free linear projection of pooled features, when the config has one."""
    return None if width is None else nn.Dense(width, use_bias=False, name=name, **kw)(pooled)


def _f32(tree: dict) -> dict:
    return {k: v.astype(jnp.float32) for k, v in tree.items() if v is not None}


class CLIPTextModel(nn.Module):
    """``text_model`` (+ ``text_projection`` when ``config.projection_dim`` is set).

    Loads CLIPTextModel and CLIPTextModelWithProjection checkpoints (SD's text encoder is the
    former). Outputs are float32.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array,
                 attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """-> ``last_hidden_state [B, L, D]``, ``pooler_output [B, D]``, ``text_embeds [B, P]``
        (the last only with a projection)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden, pooled = TextTransformer(self.config, name="text_model", **kw)(input_ids,
                                                                              attention_mask)
        embeds = _project(self.config.projection_dim, "text_projection", kw, pooled)
        return _f32({"last_hidden_state": hidden, "pooler_output": pooled, "text_embeds": embeds})

    def init_params(self, key: jax.Array) -> Any:
        """Random parameters (jitted init on a dummy batch)."""
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return jax.jit(self.init)(key, ids)["params"]


class CLIPVisionModel(nn.Module):
    """``vision_model`` (+ ``visual_projection`` when ``config.projection_dim`` is set).

    Loads CLIPVisionModel and CLIPVisionModelWithProjection checkpoints. Outputs are float32.
    """

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        """-> ``last_hidden_state``, ``pooler_output [B, D]``, ``image_embeds [B, P]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        hidden, pooled = VisionTransformer(self.config, name="vision_model", **kw)(pixel_values)
        embeds = _project(self.config.projection_dim, "visual_projection", kw, pooled)
        return _f32({"last_hidden_state": hidden, "pooler_output": pooled,
                     "image_embeds": embeds})

    def init_params(self, key: jax.Array) -> Any:
        c = self.config
        pixels = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
        return jax.jit(self.init)(key, pixels)["params"]


class CLIPModel(nn.Module):
    """Both towers, both projections and ``logit_scale``: transformers' ``CLIPModel``."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.config
        self.text_model = TextTransformer(c.text, **kw)
        self.vision_model = VisionTransformer(c.vision, **kw)
        self.text_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        self.visual_projection = nn.Dense(c.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (),
            self.param_dtype)

    def get_text_features(self, input_ids: jax.Array,
                          attention_mask: jax.Array | None = None) -> jax.Array:
        """Projected, unnormalised text features ``[B, P]`` (float32)."""
        _, pooled = self.text_model(input_ids, attention_mask)
        return self.text_projection(pooled).astype(jnp.float32)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected, unnormalised image features ``[B, P]`` (float32); NHWC, normalised input."""
        _, pooled = self.vision_model(pixel_values)
        return self.visual_projection(pooled).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, pixel_values: jax.Array,
                 attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """-> ``logits_per_image [Bi, Bt]`` = exp(logit_scale) * cos(image, text),
        ``logits_per_text`` its transpose, and the L2-normalised ``text_embeds`` /
        ``image_embeds``."""
        text = _normalise(self.get_text_features(input_ids, attention_mask))
        image = _normalise(self.get_image_features(pixel_values))
        logits_per_text = jnp.exp(self.logit_scale.astype(jnp.float32)) * text @ image.T
        return {"logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text,
                "text_embeds": text, "image_embeds": image}

    def init_params(self, key: jax.Array) -> Any:
        c = self.config
        ids = jnp.zeros((1, c.text.max_position_embeddings), jnp.int32)
        pixels = jnp.zeros((1, c.vision.image_size, c.vision.image_size,
                            c.vision.num_channels), jnp.float32)
        return jax.jit(self.init)(key, ids, pixels)["params"]


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

"""T5 encoder-decoder (transformers' ``T5ForConditionalGeneration``) in linen, with a KV cache.

Covers the original T5 (``relu`` feed-forward, LM head tied to the token embedding) and T5 v1.1 /
FLAN-T5 / mT5 (``gated-gelu``, untied head). Parameter paths are exactly what
``parrot_jax.convert.torch_key_to_path`` derives from transformers' state-dict keys
(``decoder/block_0/layer_1/EncDecAttention/q/kernel``, ``shared/embedding``, ``lm_head/kernel``),
so checkpoints convert generically. The token embedding exists once, as ``shared``; transformers'
``encoder.embed_tokens`` / ``decoder.embed_tokens`` (and ``lm_head`` when tied) are aliases of it.

Facts of the architecture this module reproduces:

* RMS layer norm: no mean subtraction, no bias, variance computed in float32.
* No ``1/sqrt(d_kv)`` scaling of attention scores (T5 folds it into the query initialisation);
  a learned relative-position bias per head is added instead. The bias table lives in block 0's
  self-attention of each stack and is shared by every later block of that stack; positions are
  bucketed bidirectionally in the encoder and causally in the decoder. Cross-attention has none.
* The original T5 (tied head) multiplies the decoder output by ``d_model ** -0.5`` before the
  projection onto the vocabulary (``scale_decoder_outputs``); T5 v1.1 / FLAN-T5 do not, and
  transformers' mT5 never does (``T5Config.from_transformers`` reads which from config.json).

Dropout is not implemented: every function here is deterministic (inference and RL fine-tuning
with dropout off, which is what the Parrot PEN needs). transformers' float16 overflow clamping is
not reproduced either; use float32 or bfloat16 activations.

Fast sampling: ``encode`` once, ``init_cache`` once (cross-attention keys / values from the
encoder output, zeroed self-attention keys / values of a fixed ``max_len``), then ``decode_step``
one token at a time with static shapes, inside ``lax.scan`` or ``lax.while_loop``. The cache is an
explicit pytree (``T5Cache``) passed in and returned; nothing is mutated. ``greedy_decode`` is the
reference loop built from these pieces.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from parrot_jax.models.config import ConfigReader, is_int, is_positive_int
from parrot_jax.models.layers import Dtype

FEED_FORWARD = ("relu", "gated-gelu")
# transformers derives these two keys from feed_forward_proj and writes them out; they must agree.
_DERIVED_ACT = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True)}
# config.json keys that do not change the function computed by the model, deliberately skipped:
# provenance, storage dtype, caching / output switches, dropout and init scales (we are
# deterministic and load weights), T5's nominal context length (positions are relative), task
# prompts, label maps and legacy generation defaults. Keys starting with "_" are skipped too.
_IGNORED_KEYS = (
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "output_past",
    "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "chunk_size_feed_forward", "dropout_rate", "classifier_dropout", "initializer_factor",
    "gradient_checkpointing", "n_positions", "task_specific_params", "tokenizer_class", "prefix",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "add_cross_attention",
    "bos_token_id", "sep_token_id", "max_length", "min_length", "num_beams", "early_stopping",
    "no_repeat_ngram_size", "length_penalty", "do_sample", "temperature", "top_k", "top_p",
    "repetition_penalty", "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder-decoder (field names and meanings as in transformers)."""

    vocab_size: int = 32128  # rows of the shared token embedding
    d_model: int = 512  # residual-stream width
    d_kv: int = 64  # width of one attention head
    d_ff: int = 2048  # feed-forward hidden width
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int = 6  # decoder blocks
    num_heads: int = 8  # attention heads
    relative_attention_num_buckets: int = 32  # relative-position buckets (per direction: half)
    relative_attention_max_distance: int = 128  # distances >= this share the last bucket
    layer_norm_epsilon: float = 1e-6  # RMS norm epsilon
    feed_forward_proj: str = "relu"  # 'relu' (T5) or 'gated-gelu' (T5 v1.1, FLAN-T5, mT5)
    tie_word_embeddings: bool = True  # LM head = shared embedding (no lm_head parameter)
    scale_decoder_outputs: bool = True  # multiply the decoder output by d_model ** -0.5
    pad_token_id: int | None = 0  # token ids: used by generation helpers only
    eos_token_id: int | None = 1
    decoder_start_token_id: int | None = None  # None: T5's convention, the pad token

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads, ``num_heads * d_kv``."""
        return self.num_heads * self.d_kv

    @property
    def gated(self) -> bool:
        """Whether the feed-forward is ``act(wi_0 x) * wi_1 x`` rather than ``act(wi x)``."""
        return self.feed_forward_proj == "gated-gelu"

    @property
    def start_token(self) -> int:
        """The first decoder input token."""
        if self.decoder_start_token_id is not None:
            return self.decoder_start_token_id
        return self.pad_token_id if self.pad_token_id is not None else 0

    @classmethod
    def from_transformers(cls, config: dict[str, Any], source: str = "T5 config") -> T5Config:
        """Build from a transformers ``config.json`` dict; raises ConfigError naming every problem.

        Reads configs written by transformers 4 (``tie_word_embeddings`` says whether the head is
        tied and, with it, whether outputs are rescaled) and by transformers 5, which always
        writes ``tie_word_embeddings: true`` and records the rescale as ``scale_decoder_outputs``;
        there a separate head shows only in the weights, which ``hub.load_t5`` inspects. Whether
        the decoder output is rescaled follows ``_decoder_rescale`` (mT5 differs from T5).
        """
        r = ConfigReader(config, source, ignored=_IGNORED_KEYS)
        pos = lambda key, default: r.get(key, default, is_positive_int, "a positive int")  # noqa: E731
        model_type = r.require("model_type", ("t5", "mt5"), default="t5")
        r.require("is_encoder_decoder", True, default=True)
        for key, neutral in [("is_decoder", False), ("tie_encoder_decoder", False),
                             ("pruned_heads", {})]:
            r.require(key, neutral, default=neutral)
        ff = r.require("feed_forward_proj", FEED_FORWARD, default="relu")
        act, gated = _DERIVED_ACT.get(ff, (None, None))
        r.get("dense_act_fn", act, lambda v: act is None or v == act, f"must be {act!r} for {ff!r}")
        r.get("is_gated_act", gated, lambda v: gated is None or v == gated,
              f"must be {gated!r} for {ff!r}")
        num_layers = pos("num_layers", 6)
        decoder_layers = r.get("num_decoder_layers", None,
                               lambda v: v is None or is_positive_int(v), "None or a positive int")
        buckets = pos("relative_attention_num_buckets", 32)
        distance = r.get("relative_attention_max_distance", 128, is_positive_int, "a positive int")
        if is_positive_int(buckets) and is_positive_int(distance):
            if buckets < 4:
                r.problems.append(f"relative_attention_num_buckets={buckets} (needs >= 4)")
            elif distance <= buckets // 2:
                r.problems.append(f"relative_attention_max_distance={distance} (must exceed "
                                  f"relative_attention_num_buckets // 2 = {buckets // 2})")
        tie = r.get("tie_word_embeddings", None, lambda v: v is None or isinstance(v, bool),
                    "a bool")
        scale = r.get("scale_decoder_outputs", None, lambda v: v is None or isinstance(v, bool),
                      "a bool")
        if isinstance(tie, bool | None) and isinstance(scale, bool | None):
            scale = _decoder_rescale(model_type, tie, scale, config.get("transformers_version"), r)
        token = lambda key, default: r.get(key, default, lambda v: v is None or is_int(v),  # noqa: E731
                                           "None or an int")
        kwargs = dict(
            vocab_size=pos("vocab_size", 32128),
            d_model=pos("d_model", 512),
            d_kv=pos("d_kv", 64),
            d_ff=pos("d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=decoder_layers if decoder_layers is not None else num_layers,
            num_heads=pos("num_heads", 8),
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=distance,
            layer_norm_epsilon=r.get("layer_norm_epsilon", 1e-6,
                                     lambda v: isinstance(v, (int, float)) and v > 0,
                                     "a positive number"),
            feed_forward_proj=ff,
            tie_word_embeddings=tie is not False,
            scale_decoder_outputs=scale,
            pad_token_id=token("pad_token_id", 0),
            eos_token_id=token("eos_token_id", 1),
            decoder_start_token_id=token("decoder_start_token_id", None),
        )
        r.finish()
        return cls(**kwargs)


def _major_version(version: Any) -> int | None:
    """The major version of a ``transformers_version`` string ("4.23.1" -> 4); None if absent or
    unreadable."""
    head = version.split(".", 1)[0] if isinstance(version, str) else ""
    return int(head) if head.isdigit() else None


def _decoder_rescale(model_type: str, tie: bool | None, scale: bool | None, version: Any,
                     r: ConfigReader) -> bool:
    """Whether transformers multiplies the decoder output by ``d_model ** -0.5`` for this config.

    transformers 5 (``T5Config.__post_init__``, ``MT5Config.__post_init__``, the two
    ``forward``s): T5 rescales iff ``scale_decoder_outputs``, which defaults to
    ``tie_word_embeddings is not False`` when absent; mT5 never rescales and forces
    ``tie_word_embeddings: true`` into the configs it writes. transformers 4 rescaled both iff
    ``tie_word_embeddings`` (T5's default true; it never wrote ``scale_decoder_outputs``). The
    two agree for every T5 config and for an mT5 one saying ``tie_word_embeddings: false`` (all
    published mT5 checkpoints); an mT5 config saying ``true`` (or nothing) is unambiguous only
    when transformers 5 wrote it. The rest, and an mT5 config asking for the rescale
    transformers 5 would ignore, are recorded as problems rather than guessed.
    """
    if model_type != "mt5":  # "t5" (another value is already a recorded problem)
        return scale if scale is not None else tie is not False
    if scale is True:
        r.problems.append("scale_decoder_outputs=True on an mt5 config (transformers' mT5 never "
                          "rescales; model_type 't5' is the same architecture with the rescale)")
    elif scale is None and tie is not False and (_major_version(version) or 0) < 5:
        key = "tie_word_embeddings=True" if tie else "tie_word_embeddings absent"
        written = (f"transformers {version}" if _major_version(version) is not None
                   else "an unknown transformers version")
        r.problems.append(
            f"{key} on an mt5 config written by {written}: transformers 4 rescaled the decoder "
            "output by d_model**-0.5 when the head was tied, transformers 5 never does; add "
            "scale_decoder_outputs=false, or set model_type 't5' for the rescale")
    return False


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """Bucket of ``key_position - query_position`` (int array, any shape) -> int32, same shape.

    Bidirectional: half the buckets for keys after the query, half for keys before (or at) it.
    Causal: keys after the query share bucket 0 with distance 0 (they are masked anyway). Within a
    direction, the first half of the buckets are exact distances, the rest logarithmically wider
    bins up to ``max_distance``; farther keys share the last bucket. The float32 arithmetic is
    done in the same order as T5's reference so bucket edges agree exactly.
    """
    rel = relative_position.astype(jnp.int32)
    offset = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(rel > 0, num_buckets, 0)
        distance = jnp.abs(rel)
    else:
        distance = -jnp.minimum(rel, 0)
    exact = num_buckets // 2
    ratio = jnp.maximum(distance, 1).astype(jnp.float32) / jnp.float32(exact)
    log_bins = jnp.log(ratio) / jnp.float32(math.log(max_distance / exact))
    large = exact + (log_bins * jnp.float32(num_buckets - exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return offset + jnp.where(distance < exact, distance, large)


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


class T5LayerNorm(nn.Module):
    """RMS norm: ``scale * x / sqrt(mean(x**2) + eps)``, statistics in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return scale.astype(self.dtype) * (x32 * lax.rsqrt(variance + self.eps)).astype(self.dtype)


class T5Attention(nn.Module):
    """Unscaled multi-head attention with ``q``/``k``/``v``/``o`` projections (no biases).

    ``relative_bias`` adds the ``relative_attention_bias`` table ``[buckets, heads]`` (block 0
    only); ``causal`` picks the decoder's one-directional bucketing for it. Initialisation follows
    T5: the query's standard deviation carries the missing ``d_kv ** -0.5`` score scaling.
    """

    config: T5Config
    relative_bias: bool = False
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        dense = lambda features, std: nn.Dense(  # noqa: E731
            features, use_bias=False, kernel_init=_normal(std), dtype=self.dtype,
            param_dtype=self.param_dtype)
        self.q = dense(c.inner_dim, (c.d_model * c.d_kv) ** -0.5)
        self.k = dense(c.inner_dim, c.d_model ** -0.5)
        self.v = dense(c.inner_dim, c.d_model ** -0.5)
        self.o = dense(c.d_model, c.inner_dim ** -0.5)
        if self.relative_bias:
            self.relative_attention_bias = nn.Embed(
                c.relative_attention_num_buckets, c.num_heads, embedding_init=_normal(
                    c.d_model ** -0.5), dtype=jnp.float32, param_dtype=self.param_dtype)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[:2] + (self.config.num_heads, self.config.d_kv))

    def keys_values(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """states ``[B, S, D]`` -> keys and values ``[B, S, H, Dh]``."""
        return self._heads(self.k(states)), self._heads(self.v(states))

    def position_bias(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """Positions ``[T]`` and ``[S]`` -> float32 bias ``[1, H, T, S]`` (block 0 only)."""
        c = self.config
        buckets = relative_position_bucket(
            key_positions[None, :] - query_positions[:, None], bidirectional=not self.causal,
            num_buckets=c.relative_attention_num_buckets,
            max_distance=c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, x: jax.Array, keys: jax.Array, values: jax.Array, bias: jax.Array | None,
                 mask: jax.Array) -> jax.Array:
        """Queries from x ``[B, T, D]`` over keys / values ``[B, S, H, Dh]`` -> ``[B, T, D]``.

        ``bias`` ``[1, H, T, S]`` or None; ``mask`` bool, broadcastable to ``[B, H, T, S]``, True
        where attending is allowed (a fully masked row attends uniformly instead of to NaN).
        """
        q = self._heads(self.q(x))
        if bias is not None:
            bias = bias.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                           bias=bias, mask=mask, scale=1.0)
        return self.o(out.reshape(out.shape[:2] + (self.config.inner_dim,)).astype(self.dtype))


class T5FeedForward(nn.Module):
    """``wo(relu(wi x))``, or ``wo(gelu_tanh(wi_0 x) * wi_1 x)`` when the config is gated."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        dense = lambda features, std: nn.Dense(  # noqa: E731
            features, use_bias=False, kernel_init=_normal(std), dtype=self.dtype,
            param_dtype=self.param_dtype)
        if c.gated:
            self.wi_0 = dense(c.d_ff, c.d_model ** -0.5)
            self.wi_1 = dense(c.d_ff, c.d_model ** -0.5)
        else:
            self.wi = dense(c.d_ff, c.d_model ** -0.5)
        self.wo = dense(c.d_model, c.d_ff ** -0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.config.gated:  # transformers' gelu_new is the tanh approximation
            return self.wo(nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))
        return self.wo(nn.relu(self.wi(x)))


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention (``layer_0`` of a block), optionally through a KV cache."""

    config: T5Config
    relative_bias: bool = False
    causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.SelfAttention = T5Attention(self.config, self.relative_bias, self.causal, **kw)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, **kw)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 position: jax.Array | None = None):
        """x ``[B, T, D]`` -> ``(x + attention, cache)``.

        Without a cache the keys are the T inputs. With ``cache`` (keys, values
        ``[B, max_len, H, Dh]``) the new keys / values are written at ``position`` and the queries
        attend over all ``max_len`` slots (``mask`` hides the unwritten ones).
        """
        h = self.layer_norm(x)
        keys, values = self.SelfAttention.keys_values(h)
        if cache is not None:
            keys, values = (lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), position,
                                                           axis=1)
                            for old, new in zip(cache, (keys, values)))
            cache = (keys, values)
        return x + self.SelfAttention(h, keys, values, bias, mask), cache


class T5LayerCrossAttention(nn.Module):
    """Pre-norm residual attention to the encoder output (``layer_1`` of a decoder block)."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.EncDecAttention = T5Attention(self.config, **kw)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, **kw)

    def keys_values(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        """encoder_hidden ``[B, S, D]`` -> keys and values ``[B, S, H, Dh]``."""
        return self.EncDecAttention.keys_values(encoder_hidden)

    def __call__(self, x: jax.Array, keys: jax.Array, values: jax.Array,
                 mask: jax.Array) -> jax.Array:
        return x + self.EncDecAttention(self.layer_norm(x), keys, values, None, mask)


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward (the last layer of a block)."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.DenseReluDense = T5FeedForward(self.config, **kw)
        self.layer_norm = T5LayerNorm(self.config.layer_norm_epsilon, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """``layer_0`` self-attention, ``layer_1`` cross-attention (decoder only), then feed-forward."""

    config: T5Config
    decoder: bool = False
    relative_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        layers = [T5LayerSelfAttention(self.config, self.relative_bias, self.decoder, **kw)]
        if self.decoder:
            layers.append(T5LayerCrossAttention(self.config, **kw))
        self.layer = layers + [T5LayerFF(self.config, **kw)]

    def position_bias(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """The stack's shared bias ``[1, H, T, S]`` (only block 0 has the table)."""
        return self.layer[0].SelfAttention.position_bias(query_positions, key_positions)

    def cross_keys_values(self, encoder_hidden: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.layer[1].keys_values(encoder_hidden)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array,
                 cross: tuple[jax.Array, jax.Array] | None = None,
                 cross_mask: jax.Array | None = None,
                 cache: tuple[jax.Array, jax.Array] | None = None,
                 position: jax.Array | None = None):
        """x ``[B, T, D]`` -> ``(x, cache)``; ``cross``: this block's encoder keys / values."""
        x, cache = self.layer[0](x, bias, mask, cache, position)
        if self.decoder:
            x = self.layer[1](x, *cross, cross_mask)
        return self.layer[-1](x), cache


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks sharing block 0's position bias, then a final norm."""

    config: T5Config
    decoder: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        n = c.num_decoder_layers if self.decoder else c.num_layers
        self.block = [T5Block(c, self.decoder, i == 0, dtype=self.dtype,
                              param_dtype=self.param_dtype) for i in range(n)]
        self.final_layer_norm = T5LayerNorm(c.layer_norm_epsilon, dtype=self.dtype,
                                            param_dtype=self.param_dtype)

    def cross_keys_values(self, encoder_hidden: jax.Array) -> tuple[tuple[jax.Array, ...], ...]:
        """Per decoder block, the cross-attention keys and values ``[B, S, H, Dh]``."""
        return tuple(block.cross_keys_values(encoder_hidden) for block in self.block)

    def __call__(self, x: jax.Array, query_positions: jax.Array, key_positions: jax.Array,
                 mask: jax.Array, cross: tuple | None = None, cross_mask: jax.Array | None = None,
                 caches: tuple | None = None, position: jax.Array | None = None):
        """Embedded tokens ``[B, T, D]`` -> ``(hidden [B, T, D], caches)``.

        ``query_positions`` ``[T]`` / ``key_positions`` ``[S]`` place the queries and keys for the
        relative bias; ``mask`` (bool, broadcastable to ``[B, H, T, S]``) is the self-attention
        mask. ``caches``: per block (keys, values), updated at ``position``.
        """
        bias = self.block[0].position_bias(query_positions, key_positions)
        new_caches = []
        for i, block in enumerate(self.block):
            x, cache = block(x, bias, mask, cross[i] if cross is not None else None, cross_mask,
                             caches[i] if caches is not None else None, position)
            new_caches.append(cache)
        return self.final_layer_norm(x), tuple(new_caches) if caches is not None else None


class T5Cache(NamedTuple):
    """Everything ``decode_step`` needs besides the parameters: an explicit, fixed-shape pytree.

    One entry per decoder block in each tuple. Self-attention slots past the current position are
    zeros and masked; cross-attention keys / values are computed once from the encoder output.
    """

    self_keys: tuple[jax.Array, ...]  # [B, max_len, H, Dh] each
    self_values: tuple[jax.Array, ...]  # [B, max_len, H, Dh] each
    cross_keys: tuple[jax.Array, ...]  # [B, S, H, Dh] each
    cross_values: tuple[jax.Array, ...]  # [B, S, H, Dh] each
    encoder_mask: jax.Array  # [B, S] bool, True at real (non-padding) encoder tokens

    @property
    def max_len(self) -> int:
        """Decoder positions the cache holds (static)."""
        return self.self_keys[0].shape[1]


def _key_mask(mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """A ``[B, S]`` 0/1 (or bool) padding mask -> bool ``[B, 1, 1, S]`` over attention keys."""
    mask = jnp.ones(shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
    return mask[:, None, None, :]


class T5ForConditionalGeneration(nn.Module):
    """T5 with its LM head: ``apply(params, input_ids, attention_mask, decoder_input_ids,
    decoder_attention_mask=None)`` -> float32 logits ``[B, T, V]``.

    Methods (call through ``apply(..., method=...)``): ``encode``, ``decode`` (uncached,
    teacher-forced), ``init_cache`` and ``decode_step`` (cached, one token per call).
    """

    config: T5Config
    dtype: Dtype = jnp.float32  # activation dtype; parameters stay param_dtype
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.shared = nn.Embed(c.vocab_size, c.d_model, embedding_init=_normal(1.0), **kw)
        self.encoder = T5Stack(c, decoder=False, **kw)
        self.decoder = T5Stack(c, decoder=True, **kw)
        if not c.tie_word_embeddings:  # std d_model**-0.5 (transformers: 1.0) -> unit logits
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False,
                                    kernel_init=_normal(c.d_model ** -0.5), **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                 decoder_input_ids: jax.Array,
                 decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids / attention_mask ``[B, S]``, decoder ids / mask ``[B, T]`` -> ``[B, T, V]``.

        Masks are 1 (or True) at real tokens; a None mask attends everywhere. Decoder attention
        is causal in addition to ``decoder_attention_mask``.
        """
        encoder_hidden = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden, attention_mask,
                           decoder_attention_mask)

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids ``[B, S]`` (mask ``[B, S]``) -> encoder hidden states ``[B, S, D]``."""
        s = input_ids.shape[1]
        positions = jnp.arange(s)
        hidden, _ = self.encoder(self.shared(input_ids), positions, positions,
                                 _key_mask(attention_mask, input_ids.shape))
        return hidden

    def decode(self, decoder_input_ids: jax.Array, encoder_hidden: jax.Array,
               encoder_mask: jax.Array | None = None,
               decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """Teacher-forced decoder: ids ``[B, T]``, encoder output ``[B, S, D]`` -> ``[B, T, V]``."""
        t = decoder_input_ids.shape[1]
        positions = jnp.arange(t)
        causal = positions[None, :] <= positions[:, None]
        mask = _key_mask(decoder_attention_mask, decoder_input_ids.shape) & causal
        cross_mask = _key_mask(encoder_mask, encoder_hidden.shape[:2])
        cross = self.decoder.cross_keys_values(encoder_hidden.astype(self.dtype))
        hidden, _ = self.decoder(self.shared(decoder_input_ids), positions, positions, mask,
                                 cross, cross_mask)
        return self._logits(hidden)

    def init_cache(self, encoder_hidden: jax.Array, encoder_mask: jax.Array | None,
                   max_len: int) -> T5Cache:
        """A fresh cache for ``max_len`` decoder positions: encoder output ``[B, S, D]`` and its
        mask ``[B, S]`` -> ``T5Cache`` (cross keys / values computed here, once)."""
        c = self.config
        b = encoder_hidden.shape[0]
        cross = self.decoder.cross_keys_values(encoder_hidden.astype(self.dtype))
        zeros = tuple(jnp.zeros((b, max_len, c.num_heads, c.d_kv), self.dtype)
                      for _ in range(c.num_decoder_layers))
        mask = _key_mask(encoder_mask, encoder_hidden.shape[:2])[:, 0, 0, :]
        return T5Cache(zeros, zeros, tuple(k for k, _ in cross), tuple(v for _, v in cross), mask)

    def decode_step(self, cache: T5Cache, tokens: jax.Array,
                    position: jax.Array | int) -> tuple[jax.Array, T5Cache]:
        """One decoder token per sequence: tokens ``[B]`` at ``position`` (a scalar, the same for
        the whole batch) -> (float32 logits ``[B, V]``, the cache with this position written).

        Equals ``decode`` on the tokens fed so far, at that position. ``position`` must be below
        ``cache.max_len`` (not checked under jit: the write index would be clamped).
        """
        position = jnp.asarray(position, jnp.int32)
        key_positions = jnp.arange(cache.max_len)
        mask = (key_positions <= position)[None, None, None, :]
        caches = tuple(zip(cache.self_keys, cache.self_values))
        cross = tuple(zip(cache.cross_keys, cache.cross_values))
        hidden, caches = self.decoder(self.shared(tokens[:, None]), position[None], key_positions,
                                      mask, cross, cache.encoder_mask[:, None, None, :], caches,
                                      position)
        cache = cache._replace(self_keys=tuple(k for k, _ in caches),
                               self_values=tuple(v for _, v in caches))
        return self._logits(hidden)[:, 0], cache

    def _logits(self, hidden: jax.Array) -> jax.Array:
        """Decoder output ``[B, T, D]`` -> float32 logits ``[B, T, V]`` (tied or own head)."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        if self.config.tie_word_embeddings:
            logits = self.shared.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def init_params(self, key: jax.Array) -> Any:
        """Random parameters (T5's initialisation scales), via a jitted init on dummy inputs."""
        ids = jnp.zeros((1, 2), jnp.int32)
        return jax.jit(self.init)(key, ids, None, ids)["params"]


def greedy_decode(module: T5ForConditionalGeneration, params: Any, input_ids: jax.Array,
                  attention_mask: jax.Array | None, max_new_tokens: int, *,
                  return_logits: bool = False):
    """Greedy generation with the KV cache, as one ``lax.scan`` (jit it with ``max_new_tokens``
    static).

    input_ids / attention_mask ``[B, S]`` -> tokens ``[B, N]`` (int32; after a sequence's EOS
    every token is the pad token, as transformers' ``generate`` pads finished sequences), and with
    ``return_logits`` also the per-step float32 logits ``[B, N, V]``. The first decoder input is
    ``config.start_token``.
    """
    c = module.config
    variables = {"params": params}
    encoder_hidden = module.apply(variables, input_ids, attention_mask, method=module.encode)
    cache = module.apply(variables, encoder_hidden, attention_mask, max_new_tokens,
                         method=module.init_cache)
    batch = input_ids.shape[0]
    eos = -1 if c.eos_token_id is None else c.eos_token_id
    pad = 0 if c.pad_token_id is None else c.pad_token_id

    def step(carry, position):
        cache, tokens, done = carry
        logits, cache = module.apply(variables, cache, tokens, position,
                                     method=module.decode_step)
        nxt = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        done = done | (nxt == eos)
        return (cache, nxt, done), (nxt, logits if return_logits else None)

    start = jnp.full((batch,), c.start_token, jnp.int32)
    carry = (cache, start, jnp.zeros((batch,), bool))
    _, (tokens, logits) = lax.scan(step, carry, jnp.arange(max_new_tokens))
    tokens = jnp.transpose(tokens)
    return (tokens, jnp.swapaxes(logits, 0, 1)) if return_logits else tokens

"""Heads that are CLIP similarities or probes: human preference, text-image alignment, sentiment."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parrot_jax.convert import CheckpointError
from parrot_jax.rewards.backbone import ClipBackbone
from parrot_jax.rewards.base import TEXTS, Features, Reward, l2_normalise


def _check_text(name: str, text: str) -> None:
    if text not in TEXTS:
        raise ValueError(f"{name}: text must be one of {TEXTS}, got {text!r}")


@dataclasses.dataclass(eq=False, repr=False)
class ClipScore(Reward):
    """Text-image alignment: ``cos(image, text)`` in [-1, 1] (raw cosine, no 100x or clipping).
    Reads the image and the ORIGINAL prompt by default: alignment is with what the user asked
    for, not with the expanded, identifier-prefixed text."""

    backbone: ClipBackbone
    name: str = "alignment"
    text: str = "prompt"
    params: Any = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check_text(self.name, self.text)
        self.reads = ("image", self.text)

    def apply(self, params: Any, features: Features) -> jax.Array:
        return jnp.sum(l2_normalise(features.image) * l2_normalise(getattr(features, self.text)),
                       axis=-1)


@dataclasses.dataclass(eq=False, repr=False)
class PickScore(ClipScore):
    """Human preference: ``exp(logit_scale) * cos(image, text)`` on a PickScore ``CLIPModel``
    (PickScore_v1's own scoring). Reads the image and, by default, the ORIGINAL prompt
    (``text="condition"`` scores against the conditioning text instead)."""

    name: str = "human_preference"

    def apply(self, params: Any, features: Features) -> jax.Array:
        return jnp.exp(features.logit_scale.astype(jnp.float32)) * super().apply(params, features)


SENTIMENT_CLASSES = ("positive", "neutral", "negative")  # probe row order
# Zero-shot class descriptions: the positive / negative emotions of Mikels' categories (the
# paper's user study asks for "amusement, excitement, and contentment"), and neutral scenes.
SENTIMENT_DESCRIPTIONS = {
    "positive": tuple(f"a photo that evokes {e}" for e in
                      ("amusement", "excitement", "contentment", "awe", "joy")),
    "neutral": ("a neutral photo", "a photo that evokes no particular emotion",
                "an ordinary everyday photo", "a plain documentary photo"),
    "negative": tuple(f"a photo that evokes {e}" for e in
                      ("fear", "sadness", "anger", "disgust")),
}


@dataclasses.dataclass(eq=False, repr=False)
class Sentiment(Reward):
    """Sentiment: P(positive) of a 3-way linear probe on the L2-normalised image embedding,
    ``softmax(x @ weight.T + bias)[:, 0]`` with classes (positive, neutral, negative). Reads the
    image only.

    ``params``: ``{"weight": [3, P], "bias": [3]}``, from a file (``from_file``) or built zero-shot
    from text embeddings (``zero_shot``).
    """

    backbone: ClipBackbone
    params: Any
    name: str = "sentiment"
    reads: tuple[str, ...] = ("image",)

    def __post_init__(self):
        dim = self.backbone.projection_dim
        shapes = {k: tuple(np.shape(v)) for k, v in self.params.items()}
        if shapes != {"weight": (3, dim), "bias": (3,)}:
            raise ValueError(f"{self.name}: probe shapes {shapes}, expected weight (3, {dim}) "
                             f"and bias (3,) for backbone {self.backbone.name!r}")

    @classmethod
    def from_file(cls, path: str | os.PathLike, backbone: ClipBackbone, *,
                  name: str = "sentiment") -> Sentiment:
        """A safetensors file holding exactly ``weight [3, P]`` (rows: positive, neutral,
        negative) and ``bias [3]``, applied to the L2-normalised projected image embedding."""
        return cls(backbone, cls.read_probe(path, backbone.projection_dim, backbone.name), name)

    @staticmethod
    def read_probe(path: str | os.PathLike, dim: int, backbone: str) -> dict[str, jax.Array]:
        """``from_file``'s reading and checking: ``{"weight": [3, dim], "bias": [3]}``."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from e
        if set(tensors) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: keys {sorted(tensors)}, expected exactly "
                                  "['bias', 'weight']")
        for key, shape in (("weight", (3, dim)), ("bias", (3,))):
            if tensors[key].shape != shape:
                raise CheckpointError(f"{path}: {key} has shape {tensors[key].shape}, expected "
                                      f"{shape} (backbone {backbone!r} embeds in {dim}-d)")
        return {k: jnp.asarray(v, jnp.float32) for k, v in tensors.items()}

    @classmethod
    def zero_shot(cls, backbone: ClipBackbone, *, name: str = "sentiment",
                  descriptions: dict[str, Sequence[str]] | None = None) -> Sentiment:
        """CLIP zero-shot: row c = ``exp(logit_scale) * normalise(mean_d normalise(text(d)))``
        over the class's descriptions, bias 0, so the logits are CLIP's scaled cosines to the
        three class-mean text embeddings. Computed once, here, with the backbone's text tower."""
        descriptions = SENTIMENT_DESCRIPTIONS if descriptions is None else descriptions
        if set(descriptions) != set(SENTIMENT_CLASSES) or not all(
                len(descriptions[c]) for c in SENTIMENT_CLASSES):
            raise ValueError(f"{name}: descriptions need non-empty lists for exactly "
                             f"{SENTIMENT_CLASSES}; got {sorted(descriptions)}")
        texts = [t for c in SENTIMENT_CLASSES for t in descriptions[c]]
        tokens = backbone.tokenize(texts)
        embeds = l2_normalise(jax.jit(backbone.encode_text)(backbone.params, tokens))
        rows, start = [], 0
        for c in SENTIMENT_CLASSES:
            n = len(descriptions[c])
            rows.append(l2_normalise(embeds[start:start + n].mean(axis=0)))
            start += n
        scale = jnp.exp(jnp.asarray(backbone.params["logit_scale"], jnp.float32))
        params = {"weight": scale * jnp.stack(rows), "bias": jnp.zeros((3,), jnp.float32)}
        return cls(backbone, params, name)

    def apply(self, params: Any, features: Features) -> jax.Array:
        logits = l2_normalise(features.image) @ params["weight"].T + params["bias"]
        return jax.nn.softmax(logits, axis=-1)[:, 0]

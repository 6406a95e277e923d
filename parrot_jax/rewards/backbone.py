"""A CLIP backbone shared by reward heads: weights, image preprocessing and tokenizer."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from parrot_jax import hub
from parrot_jax.convert import CheckpointError
from parrot_jax.models.clip import CLIPModel
from parrot_jax.rewards.preprocess import ImageProcessorConfig, preprocess


@struct.dataclass
class Tokens:
    """One text per image, tokenised by one backbone's tokenizer."""

    ids: jax.Array  # int32 [B, L], padded to the backbone's context length
    mask: jax.Array  # int32 [B, L], 1 = token, 0 = padding


@dataclasses.dataclass(eq=False)
class ClipBackbone:
    """A ``CLIPModel`` with its parameters, its image preprocessing and (host) tokenizer.

    ``name`` identifies the backbone inside a ``RewardSet`` (heads reading the same backbone
    must hold the same object). ``tokenizer`` is needed only when a head reads text.
    """

    name: str
    module: CLIPModel
    params: Any
    processor: ImageProcessorConfig
    tokenizer: Any = None  # a transformers tokenizer (host side), or None: no text heads

    def __post_init__(self):
        size = self.module.config.vision.image_size
        expected = self.processor.output_size(size, size)
        if self.processor.crop is None and self.processor.resize_to is None:
            raise ValueError(f"backbone {self.name!r}: the processor must crop or resize to a "
                             f"fixed size ({size} x {size})")
        if expected != (size, size):
            raise ValueError(f"backbone {self.name!r}: the processor produces {expected} images "
                             f"but the vision tower takes {size} x {size}")

    @classmethod
    def load(cls, name: str, path_or_id: str | os.PathLike, *,
             processor: str | os.PathLike | ImageProcessorConfig | None = None,
             subfolder: str | None = None, revision: str | None = None,
             dtype: Any = jnp.float32, tokenizer: bool = True) -> ClipBackbone:
        """A ``CLIPModel`` folder or hub id; ``processor``: the folder / hub id holding
        ``preprocessor_config.json`` and the tokenizer (default: the model's own), or an
        explicit ``ImageProcessorConfig`` (then the tokenizer comes from the model folder).
        ``tokenizer=False`` skips the tokenizer (image-only heads)."""
        module, params = hub.load_clip(path_or_id, subfolder=subfolder, dtype=dtype,
                                       revision=revision)
        if isinstance(processor, ImageProcessorConfig):
            config, text_source = processor, (path_or_id, subfolder, revision)
        else:
            text_source = ((path_or_id, subfolder, revision) if processor is None
                           else (processor, None, None))
            source = hub.ModelSource(*text_source)
            path = source.file("preprocessor_config.json")
            if path is None:
                raise CheckpointError(f"{source.where}: missing preprocessor_config.json (pass "
                                      "processor= a folder that has one, or an "
                                      "ImageProcessorConfig)")
            config = ImageProcessorConfig.from_file(path)
        tok = None
        if tokenizer:
            tok = hub.load_tokenizer(text_source[0], subfolder=text_source[1],
                                     revision=text_source[2])
        return cls(name, module, params, config, tok)

    @property
    def projection_dim(self) -> int:
        """Width of the projected embeddings ``[B, P]`` its heads read."""
        return self.module.config.projection_dim

    @property
    def context_length(self) -> int:
        """Token length every text is padded / truncated to."""
        return self.module.config.text.max_position_embeddings

    def encode_images(self, params: Any, images: jax.Array) -> jax.Array:
        """images ``[B, H, W, 3]`` in [0, 1] -> projected image embeddings ``[B, P]``."""
        pixels = preprocess(images, self.processor)
        return self.module.apply({"params": params}, pixels,
                                 method=self.module.get_image_features)

    def encode_text(self, params: Any, tokens: Tokens) -> jax.Array:
        """Tokens ``[B, L]`` -> projected text embeddings ``[B, P]``."""
        return self.module.apply({"params": params}, tokens.ids, tokens.mask,
                                 method=self.module.get_text_features)

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Host side: texts -> ``Tokens`` (numpy int32 ``[B, context_length]``), truncated."""
        if self.tokenizer is None:
            raise ValueError(f"backbone {self.name!r} has no tokenizer (loaded with "
                             "tokenizer=False) but a head reads text")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"backbone {self.name!r}: texts must be a sequence of str")
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.context_length, return_tensors="np")
        return Tokens(np.asarray(enc["input_ids"], np.int32),
                      np.asarray(enc["attention_mask"], np.int32))

"""Aesthetics: the LAION improved aesthetic predictor on CLIP ViT-L/14 image embeddings.

The published model (``sac+logos+ava1-l14-linearMSE.pth``) is a stack of linear layers
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between the first four and **no**
nonlinearity, applied to the L2-normalised projected CLIP image embedding; its state dict keys
are ``layers.0``, ``layers.2``, ``layers.4``, ``layers.6``, ``layers.7`` (``.weight`` /
``.bias``; the gaps are the dropouts). Scores are roughly on a 1-10 scale.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parrot_jax.convert import CheckpointError
from parrot_jax.rewards.backbone import ClipBackbone
from parrot_jax.rewards.base import Features, Reward, l2_normalise
from parrot_jax.rewards.pth import load_state_dict

LAION_AESTHETIC_DIMS = (768, 1024, 128, 64, 16, 1)  # widths of the published predictor
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(weight|bias)")


def mlp_from_state_dict(state: dict[str, np.ndarray], where: str,
                        dims: tuple[int, ...] | None = LAION_AESTHETIC_DIMS) -> list[dict]:
    """``layers.<i>.weight [out, in]`` / ``.bias [out]`` -> ``[{"kernel": [in, out],
    "bias": [out]}, ...]`` in layer order, checked: every layer has both, widths chain, the
    last has one output, and (unless ``dims`` is None) the widths are ``dims``."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    unexpected = []
    for key, value in state.items():
        match = _LAYER_KEY.fullmatch(key)
        if match is None:
            unexpected.append(key)
        else:
            layers.setdefault(int(match[1]), {})[match[2]] = value
    if unexpected:
        raise CheckpointError(f"{where}: unexpected keys {sorted(unexpected)} (expected only "
                              "layers.<i>.weight / layers.<i>.bias)")
    if not layers:
        raise CheckpointError(f"{where}: no layers.<i>.weight keys")
    out, width = [], None
    for i in sorted(layers):
        parts = layers[i]
        for part in ("weight", "bias"):
            if part not in parts:
                raise CheckpointError(f"{where}: missing layers.{i}.{part}")
        w, b = parts["weight"], parts["bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise CheckpointError(f"{where}: layers.{i}.weight {w.shape} / layers.{i}.bias "
                                  f"{b.shape} are not a linear layer's [out, in] / [out]")
        if width is not None and w.shape[1] != width:
            raise CheckpointError(f"{where}: layers.{i}.weight has shape {w.shape}, expected "
                                  f"input width {width} (the previous layer's output)")
        width = w.shape[0]
        out.append({"kernel": np.asarray(w, np.float32).T, "bias": np.asarray(b, np.float32)})
    got = (out[0]["kernel"].shape[0], *(layer["bias"].shape[0] for layer in out))
    if width != 1:
        raise CheckpointError(f"{where}: the last layer has {width} outputs, expected 1")
    if dims is not None and got != tuple(dims):
        raise CheckpointError(f"{where}: layer widths {got}, expected {tuple(dims)}")
    return out


@dataclasses.dataclass(eq=False, repr=False)
class Aesthetic(Reward):
    """The LAION aesthetic MLP on the backbone's L2-normalised image embedding. Reads the image
    only. ``params``: list of ``{"kernel": [in, out], "bias": [out]}``."""

    backbone: ClipBackbone
    params: Any
    name: str = "aesthetics"
    reads: tuple[str, ...] = ("image",)

    def __post_init__(self):
        width = self.params[0]["kernel"].shape[0]
        if width != self.backbone.projection_dim:
            raise ValueError(f"{self.name}: the MLP takes {width}-d embeddings but backbone "
                             f"{self.backbone.name!r} gives {self.backbone.projection_dim}-d")

    @classmethod
    def from_pth(cls, path: str | os.PathLike, backbone: ClipBackbone, *,
                 name: str = "aesthetics",
                 dims: tuple[int, ...] | None = LAION_AESTHETIC_DIMS) -> Aesthetic:
        """Read the published ``.pth`` state dict (restricted unpickler, no torch)."""
        layers = mlp_from_state_dict(load_state_dict(path), str(path), dims)
        return cls(backbone, jax.tree.map(jnp.asarray, layers), name)

    def apply(self, params: Any, features: Features) -> jax.Array:
        return aesthetic_mlp(params, features.image)


def aesthetic_mlp(layers: list[dict], embeds: jax.Array) -> jax.Array:
    """The predictor: embeds ``[B, P]`` (projected CLIP image embeddings, normalised here) ->
    ``[B]``. Linear layers only, as published (its dropouts are off at evaluation)."""
    x = l2_normalise(embeds)
    for layer in layers:
        x = x @ layer["kernel"] + layer["bias"]
    return x[:, 0]

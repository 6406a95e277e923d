"""Which UNet parameters a run trains, and how trained weights merge back into a full tree.

The T2I update trains a subset of the UNet chosen by a regex over ``/``-joined parameter paths
(the paper: cross-attention, ``attn2``), everything, or LoRA factors on some kernels. Training
(``training.step``) splits the parameters this way; inference (``policy``) merges a
checkpoint's trained weights back the same way.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import jax
from flax.traverse_util import flatten_dict, unflatten_dict

from parrot_jax.models.lora import LoRA, init_lora, merge

TRAINABLE = {  # preset name -> regex over '/'-joined parameter paths
    "cross_attention": r"(^|/)attn2/",
    "all": r".*",
}
# trainable='lora': the factors' targets, rank and scale numerator (not config fields).
T2I_LORA_TARGETS = r"attn2/(query|key|value|proj_attn)/kernel"
T2I_LORA_RANK = 4
T2I_LORA_ALPHA = 4.0


class TrainableSpec(Protocol):
    """What names the trained subset (``training.step.T2IUpdateConfig`` is one)."""

    trainable: str  # 'cross_attention' | 'all' | 'lora' | 'regex'
    trainable_regex: str  # trainable='regex': parameters whose path matches (re.search)
    lora_targets: str
    lora_rank: int
    lora_alpha: float


def trainable_regex(spec: TrainableSpec) -> str:
    if spec.trainable == "regex":
        if not spec.trainable_regex:
            raise ValueError("T2IUpdateConfig.trainable='regex' needs trainable_regex")
        return spec.trainable_regex
    if spec.trainable not in TRAINABLE:
        raise ValueError(f"T2IUpdateConfig.trainable = {spec.trainable!r}; expected one of "
                         f"{(*TRAINABLE, 'lora', 'regex')}")
    return TRAINABLE[spec.trainable]


def split_params(params: Any, spec: TrainableSpec,
                 key: jax.Array | None = None) -> tuple[Any, Any]:
    """``(trainable, frozen)`` from a nested parameter tree.

    Subset modes: two flat dicts keyed by ``/``-joined paths. LoRA: fresh factors (``key``
    needed; B = 0 so nothing changes yet) and the whole tree frozen. Raises when nothing is
    trainable.
    """
    if spec.trainable == "lora":
        if key is None:
            raise ValueError("trainable='lora' needs a PRNG key for the LoRA factors")
        return init_lora(key, params, rank=spec.lora_rank, alpha=spec.lora_alpha,
                         targets=spec.lora_targets), params
    pattern = re.compile(trainable_regex(spec))
    flat = flatten_dict(params, sep="/")
    trainable = {k: v for k, v in flat.items() if pattern.search(k)}
    if not trainable:
        raise ValueError(f"trainable regex {pattern.pattern!r} matches no parameter")
    return trainable, {k: v for k, v in flat.items() if k not in trainable}


def merged_params(trainable: Any, frozen: Any) -> Any:
    """The full nested parameter tree for ``apply``."""
    if isinstance(trainable, LoRA):
        return merge(frozen, trainable)
    return unflatten_dict({**frozen, **trainable}, sep="/")


def with_trained(params: Any, trained: dict[str, Any]) -> Any:
    """``params`` (nested) with a checkpoint's trained T2I weights put back: a flat ``{path:
    array}`` subset replaces those parameters; ``{'factors': ...}`` (trainable='lora') is merged
    as LoRA with ``T2I_LORA_ALPHA``."""
    if set(trained) == {"factors"}:
        return merge(params, LoRA(trained["factors"], T2I_LORA_ALPHA))
    flat = flatten_dict(params, sep="/")
    unknown = sorted(set(trained) - set(flat))
    if unknown:
        raise ValueError(f"trained weights {unknown[:3]} are not parameters of the UNet")
    return unflatten_dict({**flat, **trained}, sep="/")

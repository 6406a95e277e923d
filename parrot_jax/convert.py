"""PyTorch state-dict keys -> our linen parameter paths: a generic rename + transpose, checked.

``plan_conversion`` works on shapes only (so full-size architectures built on torch's ``meta``
device can be checked without memory) and returns, for every source key, the target path and the
layout transform. Every missing, unexpected, duplicate or mis-shaped key is collected into one
``CheckpointError`` — never a silent partial load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np

Path = tuple[str, ...]

# Module renames from torch attention naming to the diffusers-Flax one.
_MODULE_RENAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# Where a torch leaf may land, in order of preference.
_LEAF_CANDIDATES = {
    "weight": ("kernel", "scale", "embedding"),
    "gamma": ("scale",),  # pre-2019 LayerNorm names
    "bias": ("bias",),
    "beta": ("bias",),
}
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing / unexpected / mis-shaped keys, bad files."""


def torch_key_to_path(key: str, renames: Mapping[str, str] = _MODULE_RENAMES) -> Path:
    """``'down_blocks.0.attentions.1.to_out.0.weight'`` -> ``('down_blocks_0', 'attentions_1',
    'proj_attn', 'weight')``: list indices join their module name with ``_``, then renames."""
    parts: list[str] = []
    for token in key.split("."):
        if token.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{token}"
        else:
            parts.append(token)
    return tuple(renames.get(p, p) for p in parts[:-1]) + (parts[-1],)


def layout_transform(leaf: str, src_shape: tuple[int, ...],
                     dst_shape: tuple[int, ...]) -> str | None:
    """How a torch tensor becomes our parameter, or None if no layout rule fits the shapes.

    ``'conv'``: OIHW -> HWIO; ``'transpose'``: [out, in] -> [in, out]; ``'squeeze_transpose'``:
    a 1x1 conv weight [out, in, 1, 1] into a Dense kernel (legacy VAE attention); ``'identity'``.
    """
    src, dst = tuple(src_shape), tuple(dst_shape)
    if leaf == "kernel":
        if len(src) == 4 and len(dst) == 4 and (src[2], src[3], src[1], src[0]) == dst:
            return "conv"
        if len(src) == 2 and len(dst) == 2 and src[::-1] == dst:
            return "transpose"
        if len(src) == 4 and src[2:] == (1, 1) and len(dst) == 2 and src[1::-1] == dst:
            return "squeeze_transpose"
        return None
    return "identity" if src == dst else None


def apply_transform(array: np.ndarray, transform: str) -> np.ndarray:
    """Apply a transform named by ``layout_transform`` to a numpy array."""
    if transform == "conv":
        return np.transpose(array, (2, 3, 1, 0))
    if transform == "transpose":
        return np.transpose(array)
    if transform == "squeeze_transpose":
        return np.transpose(array[:, :, 0, 0])
    if transform == "identity":
        return array
    raise ValueError(f"unknown transform {transform!r}")


def _listing(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def plan_conversion(
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[Path, tuple[int, ...]],
    *,
    source: str,
    renames: Mapping[str, str] = _MODULE_RENAMES,
    ignore: Iterable[str] = (),
    key_fn: Callable[[str], str] | None = None,
) -> dict[str, tuple[Path, str]]:
    """Map every torch key to ``(our path, transform)``; raise one CheckpointError otherwise.

    source_shapes: torch key -> shape. target_shapes: our flattened parameter path -> shape.
    ``ignore``: regexes of torch keys that are legitimately not parameters of ours (buffers).
    ``key_fn``: rewrites a key before renaming (e.g. adds a prefix newer libraries drop).
    """
    ignore_res = [re.compile(p) for p in ignore]
    plan: dict[str, tuple[Path, str]] = {}
    claimed: dict[Path, str] = {}
    unexpected, mismatched, duplicated = [], [], []
    mismatched_targets: set[Path] = set()
    for key, shape in source_shapes.items():
        if any(p.fullmatch(key) for p in ignore_res):
            continue
        path = torch_key_to_path(key_fn(key) if key_fn else key, renames)
        module, leaf = path[:-1], path[-1]
        targets = [module + (c,) for c in _LEAF_CANDIDATES.get(leaf, (leaf,))]
        target = next((t for t in targets if t in target_shapes), None)
        if target is None:
            unexpected.append(key)
            continue
        transform = layout_transform(target[-1], tuple(shape), tuple(target_shapes[target]))
        if transform is None:
            mismatched_targets.add(target)
            mismatched.append(f"{key} {tuple(shape)} -> {'/'.join(target)} "
                              f"{tuple(target_shapes[target])}")
            continue
        if target in claimed:
            duplicated.append(f"{claimed[target]} and {key} -> {'/'.join(target)}")
            continue
        claimed[target] = key
        plan[key] = (target, transform)
    # A mis-shaped key is reported once, as a mismatch, not again as missing.
    missing = ["/".join(t) for t in target_shapes
               if t not in claimed and t not in mismatched_targets]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing parameter(s) (ours, absent from the "
                        f"checkpoint): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not in the "
                        f"model): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if duplicated:
        problems.append(f"{len(duplicated)} key(s) mapping to the same parameter: "
                        f"{_listing(duplicated)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + "; ".join(problems))
    return plan

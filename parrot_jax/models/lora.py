"""LoRA as a pure transform of a parameter tree: ``W' = W + (alpha / rank) * A @ B``.

``init_lora`` picks Dense kernels ``[in, out]`` by a regex over their ``/``-joined paths and
returns small factors ``A [in, r]`` (random) and ``B [r, out]`` (zeros, so a fresh LoRA changes
nothing). ``merge`` returns full parameters, so any module's ``apply`` runs unchanged; the base
parameters can stay frozen while gradients flow into the factors only.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict


@struct.dataclass
class LoRA:
    """The trainable factors and the (static) scale numerator.

    ``factors``: nested dict mirroring the targeted parameter paths, each leaf-module holding
    ``{'a': [in, r], 'b': [r, out]}`` where the base tree holds ``{'kernel': [in, out]}``.
    """

    factors: dict
    alpha: float = struct.field(pytree_node=False, default=1.0)


def _kernels(params: Any) -> dict[tuple[str, ...], jax.Array]:
    return {path: leaf for path, leaf in flatten_dict(params).items() if path[-1] == "kernel"}


def init_lora(key: jax.Array, params: Any, *, rank: int, alpha: float, targets: str,
              dtype: Any = jnp.float32) -> LoRA:
    """Factors for every kernel whose path (``'a/b/kernel'``) matches ``targets`` (re.search).

    ``A`` is drawn uniform in ``±1/sqrt(in)``; ``B`` is zero. Raises if nothing matches or a
    match is not a 2-D Dense kernel (conv kernels are not supported).
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    pattern = re.compile(targets)
    chosen = {p: k for p, k in _kernels(params).items() if pattern.search("/".join(p))}
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no kernel in the parameter tree")
    not_dense = ["/".join(p) for p, k in chosen.items() if k.ndim != 2]
    if not_dense:
        raise ValueError(f"LoRA targets {targets!r} match non-Dense kernels: "
                         + ", ".join(sorted(not_dense)[:8]))
    factors = {}
    for i, (path, kernel) in enumerate(sorted(chosen.items())):
        fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), dtype, -bound, bound)
        factors[path[:-1] + ("a",)] = a
        factors[path[:-1] + ("b",)] = jnp.zeros((rank, fan_out), dtype)
    return LoRA(unflatten_dict(factors), float(alpha))


def merge(params: Any, lora: LoRA) -> Any:
    """``params`` with ``kernel + (alpha / rank) * a @ b`` wherever ``lora`` has factors.

    Jittable; each merged kernel keeps its dtype. Raises if a factor has no matching kernel.
    """
    flat = flatten_dict(params)
    factors = flatten_dict(lora.factors)
    out = dict(flat)
    for path, a in factors.items():
        if path[-1] != "a":
            continue
        module = path[:-1]
        kernel = flat.get(module + ("kernel",))
        if kernel is None:
            raise ValueError(f"LoRA factor {'/'.join(module)} has no kernel in the parameters")
        b = factors[module + ("b",)]
        delta = (lora.alpha / a.shape[-1]) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
        out[module + ("kernel",)] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return unflatten_dict(out)

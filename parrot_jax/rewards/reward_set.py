"""K rewards in one jitted call: each distinct backbone runs once, its embeddings feed every head.

``RewardSet(heads)`` evaluates device heads (``Reward``) in one ``jax.jit`` call, sharded over the
batch when given a ``sharding``, and host heads (``HostReward``) on their thread pools; the result
is ``[B, K]`` float32 with columns in ``names`` order (the order the heads were given). The
training loop calls ``submit`` right after decoding, starts the next rollout, and reads
``result()`` when it needs the rewards::

    rewards = RewardSet([aesthetic, pickscore, clip_score, sentiment], sharding=batch_sharding)
    inputs = rewards.inputs(images, prompts=original_prompts, conditions=conditioning_texts)
    pending = rewards.submit(inputs)      # returns at once (async dispatch + thread pools)
    ...                                   # next rollout
    R = pending.result()                  # [B, K], sharded like the batch
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from parrot_jax.rewards.backbone import ClipBackbone, Tokens
from parrot_jax.rewards.base import TEXTS, Features, HostReward, Reward, RewardInputs


class RewardSet:
    """A fixed, named list of rewards evaluated together.

    ``sharding``: the batch sharding (e.g. ``NamedSharding(mesh, P(('data', 'fsdp')))``), used
    for every input leaf and for the ``[B, K]`` output; ``param_sharding``: a sharding (or a
    pytree prefix of ``params``) for the parameters, replicated over the same mesh by default.
    A mesh with ``Explicit`` axes (``jax.make_mesh``'s default) is used with ``Auto`` axes.
    Without ``sharding`` everything runs where jit puts it (one device).
    """

    def __init__(self, heads: Sequence[Reward | HostReward], *,
                 sharding: jax.sharding.Sharding | None = None, param_sharding: Any = None):
        heads = list(heads)
        if not heads:
            raise ValueError("RewardSet needs at least one reward")
        names = [h.name for h in heads]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward names must be unique; repeated: {dupes}")
        for h in heads:
            if not isinstance(h, (Reward, HostReward)):
                raise TypeError(f"{h!r} is neither a Reward nor a HostReward")
        self.names: tuple[str, ...] = tuple(names)
        self.device_heads = [h for h in heads if isinstance(h, Reward)]
        self.host_heads = [h for h in heads if isinstance(h, HostReward)]
        self.backbones: dict[str, ClipBackbone] = {}
        self.texts_read: dict[str, tuple[str, ...]] = {}  # backbone -> texts its heads read
        for h in self.device_heads:
            b = self.backbones.setdefault(h.backbone.name, h.backbone)
            if b is not h.backbone:
                raise ValueError(f"two different backbones are both named {b.name!r} "
                                 f"(reward {h.name!r}); give them distinct names")
            unknown = set(h.reads) - {"image", *TEXTS}
            if unknown:
                raise ValueError(f"reward {h.name!r} reads unknown inputs {sorted(unknown)}")
            read = set(self.texts_read.get(b.name, ())) | (set(h.reads) & set(TEXTS))
            self.texts_read[b.name] = tuple(t for t in TEXTS if t in read)
        # Output column j of [device | host] that holds names[i].
        order = [h.name for h in self.device_heads] + [h.name for h in self.host_heads]
        self._perm = np.array([order.index(n) for n in self.names])
        sharding = _auto_axes(sharding)
        param_sharding = _auto_axes(param_sharding)
        self.sharding = sharding
        params = {"backbones": {n: b.params for n, b in self.backbones.items()},
                  "heads": {h.name: h.params for h in self.device_heads}}
        if sharding is not None:
            if param_sharding is None:
                if not isinstance(sharding, NamedSharding):
                    raise ValueError("pass param_sharding when sharding is not a NamedSharding")
                param_sharding = NamedSharding(sharding.mesh, PartitionSpec())
            params = jax.device_put(params, param_sharding)
            self._jit_apply = jax.jit(self.apply, in_shardings=(param_sharding, sharding),
                                      out_shardings=sharding)
            self._jit_merge = jax.jit(self._merge, out_shardings=sharding)
        else:
            self._jit_apply = jax.jit(self.apply)
            self._jit_merge = jax.jit(self._merge)
        self.params = params

    @property
    def device_names(self) -> tuple[str, ...]:
        """Column names of ``apply``'s output."""
        return tuple(h.name for h in self.device_heads)

    def inputs(self, images: Any, prompts: Sequence[str] | None = None,
               conditions: Sequence[str] | None = None) -> RewardInputs:
        """Host side: tokenise each text with every backbone that reads it.

        images ``[B, H, W, 3]`` in [0, 1]; prompts: the B ORIGINAL prompts (one per image);
        conditions: the B conditioning texts the T2I model saw. A text no head reads may be None.
        """
        batch = np.shape(images)[0]
        given = {"prompt": prompts, "condition": conditions}
        tokens: dict[str, dict[str, Tokens]] = {t: {} for t in TEXTS}
        for name, texts in self.texts_read.items():
            for text in texts:
                values = given[text]
                if values is None:
                    readers = [h.name for h in self.device_heads
                               if h.backbone.name == name and text in h.reads]
                    raise ValueError(f"rewards {readers} read the {text} text; pass {text}s=")
                if len(values) != batch:
                    raise ValueError(f"{len(values)} {text}s for {batch} images")
                tokens[text][name] = self.backbones[name].tokenize(values)
        return RewardInputs(images, tokens["prompt"], tokens["condition"])

    def apply(self, params: Any, inputs: RewardInputs) -> jax.Array:
        """The device heads, traceable: -> ``[B, len(device_names)]`` float32.

        Each backbone encodes the images once, and each text its heads read once.
        """
        batch = inputs.images.shape[0]
        columns = {}
        for name, backbone in self.backbones.items():
            p = params["backbones"][name]
            texts = {}
            for text in TEXTS:
                if text not in self.texts_read[name]:
                    texts[text] = None
                    continue
                tokens = getattr(inputs, text).get(name)
                if tokens is None:
                    raise ValueError(f"inputs lack {text} tokens for backbone {name!r} (build "
                                     "them with RewardSet.inputs)")
                if tokens.ids.shape[0] != batch:
                    raise ValueError(f"{text} tokens for {name!r} have batch "
                                     f"{tokens.ids.shape[0]}, images {batch}")
                texts[text] = backbone.encode_text(p, tokens)
            features = Features(backbone.encode_images(p, inputs.images), texts["prompt"],
                                texts["condition"], p["logit_scale"])
            for head in self.device_heads:
                if head.backbone.name == name:
                    columns[head.name] = head.apply(params["heads"][head.name], features)
        return jnp.stack([columns[n].astype(jnp.float32) for n in self.device_names], axis=1)

    def submit(self, inputs: RewardInputs, params: Any = None) -> PendingRewards:
        """Start every reward and return at once: the device part is dispatched asynchronously,
        host heads run on their threads. ``params`` defaults to ``self.params``."""
        params = self.params if params is None else params
        if self.sharding is not None:
            inputs = jax.device_put(inputs, self.sharding)
        device = self._jit_apply(params, inputs) if self.device_heads else None
        images = inputs.images
        if self.host_heads and isinstance(images, jax.Array) and not images.is_fully_addressable:
            raise ValueError("host rewards need every image on this process; the images span "
                             "several hosts")
        futures = [h.submit(images) for h in self.host_heads]
        return PendingRewards(self, device, futures)

    def __call__(self, inputs: RewardInputs, params: Any = None) -> jax.Array:
        """``submit(inputs, params).result()``: ``[B, K]`` float32 in ``names`` order."""
        return self.submit(inputs, params).result()

    def _merge(self, device: jax.Array | None, host: jax.Array) -> jax.Array:
        both = host if device is None else jnp.concatenate([device, host], axis=1)
        return both[:, self._perm]

    def close(self) -> None:
        """Stop the host heads' threads."""
        for h in self.host_heads:
            h.close()

    def __repr__(self) -> str:
        return f"RewardSet(names={self.names}, backbones={tuple(self.backbones)})"


def _auto_axes(sharding: Any) -> Any:
    """The same sharding on a mesh whose axes are all ``Auto``: the models index with gathers
    whose output sharding explicit-axis meshes cannot infer, so the set lets XLA propagate."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh = sharding.mesh
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return sharding
    auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return NamedSharding(auto, sharding.spec, memory_kind=sharding.memory_kind)


class PendingRewards:
    """The handle ``RewardSet.submit`` returns; ``result()`` waits and assembles ``[B, K]``."""

    def __init__(self, owner: RewardSet, device: jax.Array | None,
                 host: list[concurrent.futures.Future]):
        self.names = owner.names
        self._owner, self._device, self._host = owner, device, host

    def done(self) -> bool:
        """True when ``result()`` would not wait."""
        device_ready = self._device is None or self._device.is_ready()
        return device_ready and all(f.done() for f in self._host)

    def result(self, timeout: float | None = None) -> jax.Array:
        """``[B, K]`` float32 in ``names`` order (sharded like the batch when the set is);
        ``timeout`` (seconds) bounds the wait for each host reward."""
        if not self._host:
            return self._device
        values = [f.result(timeout) for f in self._host]
        host = np.stack(values, axis=1)
        owner = self._owner
        if owner.sharding is not None:
            host = jax.device_put(host, owner.sharding)
        return owner._jit_merge(self._device, host)

"""Device mesh, parameter sharding rules and batch placement (docs/design.md).

One ``Mesh`` with named axes ``data`` and ``fsdp`` (and optionally ``tensor``). Batches shard their
leading axis over ``('data', 'fsdp')``; parameters replicate unless an ordered list of regex rules
says ``fsdp``. Rules match the ``/``-joined parameter path (``down_blocks_0/attentions_0/.../
kernel``), first match wins, so converted checkpoints with no annotations shard as well.
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated under an 'fsdp' rule: sharding them saves nothing.
MIN_FSDP_SIZE = 2**14
# Replicate everything: the default for models that fit a device (the UNet in bf16 does).
REPLICATE_ALL: tuple[tuple[str, str], ...] = ((".*", "replicate"),)
# Shard every large tensor over 'fsdp' (embedding tables, projection and conv kernels).
FSDP_ALL: tuple[tuple[str, str], ...] = ((".*", "fsdp"),)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all) with the named axes of ``shape`` in ``AXES`` order.

    shape: e.g. ``{'data': -1, 'fsdp': 2}``; one axis may be -1 (the devices left over). Axis
    types are Auto (the compiler propagates shardings). Errors name the offending axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {AXES}")
    names = [a for a in AXES if a in shape]
    sizes = [int(shape[a]) for a in names]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {dict(shape)}: sizes must be positive (or one -1)")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % fixed:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices are not divisible by "
                             f"the fixed axes' product {fixed}")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices; "
                         f"there are {len(devices)} (use -1 for one axis to take the rest)")
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def traced_on(mesh: Mesh | None) -> Any:
    """A context in which programs trace with ``mesh``'s axes (``jax.sharding.
    get_abstract_mesh``: the attention kernels split the batch over them, see
    ``models.attention_ops``), without changing where eager arrays are put. None: no mesh."""
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), ()) if mesh is None else mesh.abstract_mesh)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch's leading dimension shards over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis over ``('data', 'fsdp')``, the rest replicated (any rank)."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` (equal on every process) as arrays replicated over ``mesh``. Unlike
    ``jax.device_put`` it also takes typed PRNG keys when ``mesh`` spans several processes
    (jax refuses to place a key array on devices other processes own)."""
    sharding = replicated(mesh)

    def put(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, path: str) -> P:
    """Shard the largest dimension divisible by the fsdp axis size."""
    if fsdp == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    dims = sorted((d for d in range(len(shape)) if shape[d] % fsdp == 0),
                  key=lambda d: (-shape[d], d))
    if not dims:
        raise ValueError(f"parameter {path} {shape}: no dimension is divisible by the fsdp axis "
                         f"size {fsdp}; add a 'replicate' rule for it before the 'fsdp' rule")
    spec = [None] * len(shape)
    spec[dims[0]] = "fsdp"
    return P(*spec)


def param_specs(params: Any, rules: Sequence[tuple[str, str]], mesh: Mesh) -> Any:
    """A ``PartitionSpec`` tree for ``params`` (arrays or ``ShapeDtypeStruct``s) from ``rules``.

    rules: ``(regex, 'replicate' | 'fsdp')`` pairs, tried in order against each ``/``-joined
    path (``re.search``); the first match wins; a path no rule matches is an error. ``fsdp``
    shards the largest dimension divisible by the ``fsdp`` axis (tensors under
    ``MIN_FSDP_SIZE`` elements stay replicated). Works on nested dicts and on flat dicts keyed
    by ``/``-joined paths (dataclass fields name themselves: ``factors/...`` for a LoRA).
    """
    compiled = []
    for pattern, kind in rules:
        if kind not in ("replicate", "fsdp"):
            raise ValueError(f"sharding rule ({pattern!r}, {kind!r}): kind must be 'replicate' "
                             "or 'fsdp'")
        compiled.append((re.compile(pattern), kind))
    fsdp = mesh.shape.get("fsdp", 1)

    def spec(path: str, leaf: Any) -> P:
        for pattern, kind in compiled:
            if pattern.search(path):
                return P() if kind == "replicate" else _fsdp_spec(tuple(leaf.shape), fsdp, path)
        raise ValueError(f"no sharding rule matches parameter {path}; end the rules with "
                         "('.*', 'replicate')")

    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: spec("/".join(_key_name(k) for k in p), leaf), params)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_shardings(params: Any, rules: Sequence[tuple[str, str]], mesh: Mesh) -> Any:
    """``param_specs`` as ``NamedSharding``s on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(params: Any, rules: Sequence[tuple[str, str]], mesh: Mesh) -> Any:
    """``params`` placed on ``mesh`` by ``rules``."""
    return jax.device_put(params, param_shardings(params, rules, mesh))


def chunk_rows(x: jax.Array, j: jax.Array | int, chunks: int) -> jax.Array:
    """Chunk ``j`` of ``x [B, ...]``: rows ``j, j + chunks, ...`` (``[B / chunks, ...]``).

    Every device's contiguous block of a batch-sharded ``x`` holds its share of each chunk (when
    ``chunks`` divides the per-device batch), so taking one moves no data between devices.
    """
    if chunks == 1:
        return x
    split = x.reshape((x.shape[0] // chunks, chunks) + x.shape[1:])
    return jax.lax.dynamic_index_in_dim(split, j, axis=1, keepdims=False)


def unchunk_rows(x: jax.Array) -> jax.Array:
    """The inverse of stacking ``chunk_rows(y, j, c)`` for ``j < c``: ``[c, B / c, ...] -> [B,
    ...]`` in ``y``'s row order (again without moving data between devices)."""
    c, n = x.shape[:2]
    return jax.numpy.swapaxes(x, 0, 1).reshape((c * n,) + x.shape[2:])


def put_batch(batch: Any, mesh: Mesh, shardings: Any = None) -> Any:
    """Host-local numpy arrays -> global arrays on ``mesh``.

    ``shardings`` (a tree matching ``batch``, or None: every leaf over the batch axes). For a
    batch-sharded leaf each process passes its own slice (leading axis = global batch / process
    count; on one host the whole batch), divisible over its local devices; a replicated leaf is
    the same on every process.
    """
    local = len(mesh.local_devices)
    if shardings is None:
        shardings = jax.tree.map(lambda _: batch_sharding(mesh), batch)

    def put(x, sharding):
        x = np.asarray(x)
        if sharding.spec != P() and (x.ndim == 0 or x.shape[0] % local):
            raise ValueError(f"batch leaf of shape {x.shape}: the leading axis must be divisible "
                             f"by the {local} local devices")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch, shardings)


class LaunchError(RuntimeError):
    """The processes of a run cannot meet: the message names the coordinator address."""


def initialize_distributed(enabled: bool, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           initialization_timeout: int = 300,
                           heartbeat_timeout: int = 100) -> None:
    """``jax.distributed.initialize`` when ``enabled``: every process of a multi-process run
    calls it before touching a device. Without an address, JAX discovers the processes (Cloud
    TPU slices, SLURM). CPU devices exchange collectives over gloo, so several processes run on
    any machine. With an address, a process other than 0 first waits for the coordinator to
    listen (at most ``initialization_timeout`` s) and process 0 checks it can listen there:
    ``LaunchError`` rather than JAX's abort of the process. A process silent for
    ``heartbeat_timeout`` s makes the others stop with an error naming its task number."""
    if not enabled:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if process_id == 0:
            _check_can_listen(coordinator_address, int(port))
        else:
            _wait_for_listener(coordinator_address, host.strip("[]"), int(port),
                               initialization_timeout)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=heartbeat_timeout)


def _check_can_listen(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as e:
            raise LaunchError(f"coordinator {address}: process 0 cannot listen on port {port} "
                              f"({e.strerror}); is another run using it?") from e


def _wait_for_listener(address: str, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise LaunchError(f"coordinator {address}: nothing answered within {timeout:g} "
                                  f"s ({e.strerror or e}); is process 0 running there?") from e
            time.sleep(0.5)

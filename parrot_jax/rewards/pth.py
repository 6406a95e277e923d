"""Read a PyTorch ``torch.save`` state dict (``.pth``) without torch and without running code.

A ``.pth`` written by ``torch.save`` (torch >= 1.6, the zip format) is a zip archive holding
``<name>/data.pkl`` (a pickle of the state dict) and one raw ``<name>/data/<key>`` entry per tensor
storage. Unpickling it with ``pickle`` would call whatever globals the pickle names, so this reader
resolves only the handful a state dict needs:

- ``collections.OrderedDict`` (the state dict itself),
- ``torch._utils._rebuild_tensor_v2`` (a tensor: storage, offset, size, stride, ...),
- the typed storage classes ``torch.FloatStorage``, ``torch.HalfStorage`` ... (dtype markers),

plus persistent-id storage references (``('storage', <storage class>, key, location, numel)``).
Any other global raises ``CheckpointError`` naming it; nothing is imported or called. The legacy
(pre-1.6, non-zip) format is refused with a clear error (re-save it with a current torch).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from parrot_jax.convert import CheckpointError

# torch's typed storage class names -> numpy dtypes.
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType(NamedTuple):
    """Stands in for ``torch.<Name>Storage`` inside the pickle: just the dtype."""

    name: str
    dtype: Any


class _Tensor(NamedTuple):
    """What ``_rebuild_tensor_v2`` yields here; turned into an ``np.ndarray`` after loading.

    (A NamedTuple has no ``__setstate__`` / ``__dict__``, so a pickle cannot BUILD into it.)
    """

    array: np.ndarray


class _Storage(NamedTuple):
    key: str
    data: np.ndarray  # 1-D, the storage's dtype


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None,
                       metadata: Any = None) -> _Tensor:
    """A strided view of a storage, copied (the arguments torch's ``_rebuild_tensor_v2`` takes)."""
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor refers to {type(storage).__name__}, not a storage")
    shape, strides = tuple(size), tuple(stride)
    ints = (storage_offset, *shape, *strides)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) \
            or len(shape) != len(strides):
        raise CheckpointError(f"storage {storage.key}: bad tensor geometry offset="
                              f"{storage_offset!r} size={size!r} stride={stride!r}")
    data = storage.data
    if 0 in shape:
        return _Tensor(np.zeros(shape, data.dtype))
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last >= data.size:
        raise CheckpointError(f"storage {storage.key}: tensor of size {shape} (offset "
                              f"{storage_offset}, stride {strides}) reads past its "
                              f"{data.size} elements")
    view = np.lib.stride_tricks.as_strided(data[storage_offset:], shape,
                                           tuple(s * data.itemsize for s in strides),
                                           writeable=False)
    return _Tensor(np.array(view))


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a tensor state dict needs; reads storages from the archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str,
                 where: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._where = archive, prefix, where
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        raise CheckpointError(
            f"{self._where}: data.pkl asks for the global {module}.{name}, which is forbidden: "
            "only tensor storage (collections.OrderedDict, torch._utils._rebuild_tensor_v2, "
            "torch.*Storage) is allowed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise CheckpointError(f"{self._where}: unsupported persistent id {pid!r} in data.pkl "
                                  "(expected a typed tensor storage)")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            name = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(name)
            except KeyError:
                raise CheckpointError(f"{self._where}: missing storage entry {name}") from None
            dtype = np.dtype(storage_type.dtype).newbyteorder(self._byteorder)
            if len(raw) < numel * dtype.itemsize:
                raise CheckpointError(f"{self._where}: {name} holds {len(raw)} bytes, fewer than "
                                      f"{numel} x {dtype.itemsize}")
            data = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
            self._storages[key] = _Storage(key, data)
        return self._storages[key]


def _archive_prefix(archive: zipfile.ZipFile, where: str) -> str:
    """The folder inside the zip that holds ``data.pkl`` (torch names it after the file)."""
    found = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    if len(found) != 1:
        raise CheckpointError(f"{where}: expected one data.pkl in the zip archive, found "
                              f"{len(found)} (is this a torch.save file?)")
    return found[0][: -len("data.pkl")]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A ``torch.save``'d state dict -> ``{key: np.ndarray}`` (keys in file order).

    Raises ``CheckpointError`` for a missing file, the legacy format, a forbidden global, or
    anything in the state dict that is not a tensor.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{where}: not a zip-format torch.save file (the legacy pre-1.6 "
                              "format is not supported; re-save it with torch >= 1.6)")
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, where)
        names = set(archive.namelist())
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{where}: byteorder entry says {byteorder!r}")
        unpickler = _RestrictedUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix,
                                         byteorder, where)
        try:
            obj = unpickler.load()
        except CheckpointError:
            raise
        except Exception as e:  # malformed pickle: truncated, bad opcodes, BUILD refused ...
            raise CheckpointError(f"{where}: cannot read data.pkl: {type(e).__name__}: {e}") \
                from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            raise CheckpointError(f"{where}: entry {key!r} is a {type(value).__name__}, not a "
                                  "tensor (expected a flat state dict)")
        out[key] = value.array
    return out

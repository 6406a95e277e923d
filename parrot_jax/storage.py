"""Where a run's files live: a local folder or a bucket (``gs://BUCKET/...``), behind one path
type, ``etils.epath.Path`` (a ``pathlib.Path`` for local folders; fsspec / gcsfs for buckets).

An object store is not a disk in three ways the workdir code must not meet one by one:
objects cannot be appended to (gcsfs's "append" silently overwrites), so ``append`` rewrites
the object whole; nothing is renamed, so ``replace`` and ``move`` write or copy instead; and
code that saves or reads folders itself (transformers tokenizers) needs a local folder, given
by ``local_copy`` and ``save_folder``. Every workdir read and write goes through here or through
``epath.Path`` methods that behave alike in both (``read_text``, ``write_bytes``, ``exists``, ...);
orbax reaches ``gs://`` itself (TensorStore's GCS driver).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable

from etils import epath

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The schemes a workdir may use: a bucket that both epath (fsspec) and orbax (TensorStore) reach.
SCHEMES = {"gs": "gcsfs"}


class StorageError(ValueError):
    """A workdir URL this installation cannot reach (unknown scheme, its filesystem missing)."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for a bucket URL (``gs://...``), False for a local path."""
    return bool(_URL.match(os.fspath(path)))


def path(where: str | os.PathLike) -> epath.Path:
    """``where`` as an ``epath.Path``: a bucket URL as it is, a local path made absolute (orbax
    requires it). A URL of a scheme we do not support, or whose filesystem package is not
    installed, raises ``StorageError`` naming the package."""
    text = os.fspath(where)
    match = _URL.match(text)
    if not match:
        return epath.Path(os.path.abspath(text))
    scheme = match.group(1)
    if scheme not in SCHEMES:
        raise StorageError(f"{text}: {scheme}:// is not supported (a local path or "
                           f"{', '.join(s + '://' for s in SCHEMES)})")
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        raise StorageError(f"{text}: {scheme}:// paths need the {SCHEMES[scheme]} package "
                           "(pip install 'parrot-jax[gcs]')") from e
    quiet = logging.getLogger(SCHEMES[scheme])  # gcsfs logs each read's cache at INFO
    if quiet.level == logging.NOTSET:  # unless the user set a level for it
        quiet.setLevel(logging.WARNING)
    return epath.Path(text)


def cannot_write(folder: epath.Path) -> str | None:
    """Why this process cannot write in ``folder``, in one line, or None. In a bucket, one
    empty object is written there and deleted (a run needs both: orbax removes its temporary
    checkpoint folders), so a missing bucket, missing credentials or a read-only role show
    here rather than at the first checkpoint. A local folder, or its nearest existing parent,
    must be a folder this user may write in."""
    if is_remote(folder):
        probe = folder / f".parrot-write-check-{os.urandom(8).hex()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except Exception as e:  # noqa: BLE001 (whatever the filesystem raises: say it in a line)
            said = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            hint = "; does the bucket exist?" if isinstance(e, FileNotFoundError) else ""
            return f"cannot write there ({type(e).__name__}: {said[:400]}{hint})"
        return None
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def append(file: epath.Path, text: str) -> None:
    """Add ``text`` at the end of ``file`` (created if missing). A local file is appended to;
    an object is rewritten whole with its old content first (one object write: readers see
    the old or the new file, never a part)."""
    if is_remote(file):
        old = file.read_text() if file.exists() else ""
        file.write_text(old + text)
    else:
        with open(file, "a") as f:
            f.write(text)


def replace(file: epath.Path, data: bytes) -> None:
    """Make ``data`` the whole content of ``file`` at once: a local file through a temporary
    file and ``os.replace``; an object by one write (which is atomic by itself)."""
    if is_remote(file):
        file.write_bytes(data)
        return
    partial = file.with_name(file.name + ".tmp")
    partial.write_bytes(data)
    os.replace(partial, file)


def move(source: epath.Path, target: epath.Path) -> None:
    """Move the folder ``source`` to ``target`` (its parent created): a rename on a disk; on a
    bucket, which has no renames, each object copied and then the source removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(source):
        os.replace(source, target)
        return
    for file, relative in files(source):
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        file.copy(target / relative, overwrite=True)
    source.rmtree()


def files(folder: epath.Path, prefix: str = "") -> list[tuple[epath.Path, str]]:
    """Every file under ``folder`` with its ``/``-joined path relative to it (a bucket's
    ``walk`` drops the ``gs://`` of the paths it yields; ``iterdir`` keeps it)."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            out += files(entry, f"{prefix}{entry.name}/")
        else:
            out.append((entry, prefix + entry.name))
    return out


def remove_tree(folder: epath.Path) -> None:
    """Delete ``folder`` and everything in it, if it exists."""
    if folder.exists():
        folder.rmtree()


_copies: dict[str, str] = {}  # bucket folder -> its local copy (this process)


def local_copy(folder: epath.Path) -> str:
    """A local folder with ``folder``'s files: ``folder`` itself on a disk; for a bucket, a
    copy made once per process in a temporary folder removed at exit (tokenizers, small)."""
    if not is_remote(folder):
        return os.fspath(folder)
    key = os.fspath(folder)
    if key not in _copies:
        local = tempfile.mkdtemp(prefix="parrot_jax_")
        atexit.register(shutil.rmtree, local, True)
        for file, relative in files(folder):
            os.makedirs(os.path.dirname(os.path.join(local, relative)), exist_ok=True)
            with open(os.path.join(local, relative), "wb") as f:
                f.write(file.read_bytes())
        _copies[key] = local
    return _copies[key]


def save_folder(save: Callable[[str], object], folder: epath.Path) -> None:
    """``save(local_folder)`` into ``folder``: directly on a disk; for a bucket, into a
    temporary folder whose files are then uploaded."""
    if not is_remote(folder):
        save(os.fspath(folder))
        return
    with tempfile.TemporaryDirectory(prefix="parrot_jax_") as local:
        save(local)
        for root, _, names in os.walk(local):
            for name in names:
                relative = os.path.relpath(os.path.join(root, name), local)
                with open(os.path.join(root, name), "rb") as f:
                    data = f.read()
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_bytes(data)

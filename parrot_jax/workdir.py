"""A run's workdir: ``config.json``, compatibility between runs, and orbax checkpoints.

A workdir belongs to one experiment. Its ``config.json`` is written on the first run; a later run
in the same workdir must agree on every field except those the schema marks resumable (run
length, logging and checkpoint cadence, device layout, the closing evaluation), or it is refused
before anything is written (``parrot_jax.config``). Checkpoints are an orbax
``CheckpointManager`` (async, ``max_to_keep``) of one item, ``state``: the loop's whole training
state (``training.state``), saved only when every value in it is finite (``save``). A resume
restores the latest checkpoint that reads back and sets damaged ones aside in
``checkpoints.damaged/`` (``restore_latest``). Training writes here; sampling and evaluation
read it.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from parrot_jax import config as schema
from parrot_jax import storage

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"  # checkpoints that failed to restore, set aside


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run of a different configuration."""


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as ``config.json`` stores it."""
    return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Check ``config`` against ``workdir/config.json`` if there is one: any difference in a
    field the schema does not mark resumable raises ``IncompatibleWorkdirError`` listing the
    fields (a field added since the saved config was written counts as the value its absence
    stands for; a renamed one by its new name)."""
    path = storage.path(workdir) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IncompatibleWorkdirError(f"{path}: unreadable ({e}); use a new --workdir") from e
    a, b = schema.flat(saved), schema.flat(config_dict(config))
    for old, (new, convert) in schema.RENAMED.items():
        if old in a:
            a[new] = convert(a.pop(old))
    implied = schema.implied(a)
    a.update(implied)
    shown = lambda k: (f"<absent, meaning {a[k]!r}>" if k in implied  # noqa: E731
                       else repr(a.get(k, "<absent>")))
    diffs = [f"{k}: saved {shown(k)}, now {b.get(k, '<absent>')!r}"
             for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and not schema.resumable(k)]
    if diffs:
        raise IncompatibleWorkdirError(
            f"{workdir} holds a run with a different configuration ({path}); refusing to "
            "resume or overwrite it. Use a new --workdir, or restore these fields:\n  "
            + "\n  ".join(diffs))


def write_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """``workdir/config.json`` from process 0, unless the workdir has one (``check_workdir``
    accepted it). Called once the run has loaded everything, so a run that fails to start
    leaves no config behind to block its corrected rerun."""
    path = storage.path(workdir) / CONFIG_FILE
    if jax.process_index() == 0 and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config_dict(config), indent=2) + "\n")


def checkpoint_manager(workdir: str | os.PathLike, max_to_keep: int | None = None,
                       read_only: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints`` (one item, ``state``)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(storage.path(workdir) / CHECKPOINT_DIR, options=options,
                                 item_names=("state",))


@jax.jit
def _finite_parts(state: Any) -> dict[str, jax.Array]:
    """bool scalar per part (``'t2i/trainable'``, ``'pen/opt_state'``, ...: the first two keys
    of each leaf's path): all its floating values are finite."""
    flags: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        name = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path[:2])
        ok = jnp.all(jnp.isfinite(leaf))
        flags[name] = flags[name] & ok if name in flags else ok
    return flags


def nonfinite_parts(state: Any) -> list[str]:
    """The parts of a training state holding a NaN or inf (empty when it is safe to save)."""
    return [name for name, ok in jax.device_get(_finite_parts(state)).items() if not ok]


def save(manager: ocp.CheckpointManager, step: int, state: Any, *,
         checked: bool = False) -> None:
    """Start saving ``state`` at ``step`` (returns once arrays are copied off the devices).
    A state with a NaN or inf anywhere is refused with ``FloatingPointError`` naming its
    parts, before anything is written: a resume would restore the diverged weights.
    ``checked``: the caller has just found ``nonfinite_parts(state)`` empty."""
    bad = [] if checked else nonfinite_parts(state)
    if bad:
        raise FloatingPointError(f"checkpoint {step} not written: non-finite values in the "
                                 f"state's {', '.join(bad)}")
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


class CheckpointError(RuntimeError):
    """No checkpoint of the workdir could be restored."""


def _reason(error: BaseException, limit: int = 240) -> str:
    """One line for a failed restore: the exception's type and the start of its first line
    (TensorStore's messages run to hundreds of lines)."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    first = first if len(first) <= limit else first[:limit] + " ..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _ignoring_abandoned_reads() -> Callable[[], None]:
    """Install a ``sys.unraisablehook`` filter and return its removal. When a restore fails,
    TensorStore still completes the reads orbax abandoned and hands each to orbax's closed
    event loop: one "Event loop is closed" traceback per read (hundreds), some arriving after
    the failure is raised, and asyncio logs some as tasks or futures whose error nobody
    retrieved. The filters drop exactly those; every other unraisable exception and log
    record still shows. Kept for the rest of the process after a failed restore."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    # The same abandoned reads can also end as asyncio tasks or futures whose error nobody
    # retrieves.
    quiet = _AbandonedTasks()
    std_logging.getLogger("asyncio").addFilter(quiet)

    def remove() -> None:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        std_logging.getLogger("asyncio").removeFilter(quiet)

    return remove


class _AbandonedTasks(std_logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" records of abandoned restore
    reads (a TensorStore error, or the closed event loop), logged whenever they are
    garbage-collected."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if not str(record.msg).startswith(("Task exception was never retrieved",
                                           "Future exception was never retrieved")):
            return True
        error = record.exc_info[1] if record.exc_info else None
        abandoned_read = "tensorstore_spec" in str(error) or (
            isinstance(error, RuntimeError) and str(error) == "Event loop is closed")
        return not abandoned_read


def _all_processes_agree(ok: bool) -> bool:
    """True on every process when ``ok`` is true on every process (a damaged file may be seen
    by one host only; all must fall back together)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def set_aside(workdir: str | os.PathLike, step: int) -> epath.Path:
    """Move ``checkpoints/<step>`` to ``checkpoints.damaged/<step>`` (process 0; never deleted:
    the user may want to inspect it) and return where it went; a name already there gets a
    numeric suffix."""
    source = storage.path(workdir) / CHECKPOINT_DIR / str(step)
    target = storage.path(workdir) / DAMAGED_DIR / str(step)
    suffix = 1
    while target.exists():
        target = target.with_name(f"{step}.{suffix}")
        suffix += 1
    if jax.process_index() == 0:
        storage.move(source, target)
    return target


def restore_latest(manager: ocp.CheckpointManager, target: Any,
                   unit: str = "iteration") -> tuple[Any, int | None]:
    """``(state, step)`` of the latest checkpoint that restores into ``target``'s structure and
    shardings, or ``(target, None)`` when there is none.

    A checkpoint that fails to restore (a truncated or emptied file, a crash mid-write) is
    skipped with one warning line naming it and the ``unit`` it falls back to, then moved to
    ``checkpoints.damaged/`` once an older one has restored (a later save of the same step
    would collide with it; nothing is deleted). When none restores, ``CheckpointError`` lists
    them all and nothing is moved."""
    from absl import logging

    directory = storage.path(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for i, step in enumerate(steps):
        quiet = _ignoring_abandoned_reads()
        try:
            restored, reason = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target))).state, ""
        except Exception as e:  # noqa: BLE001 (any failure: report it in one line, go on)
            restored, reason = None, _reason(e)
        if not reason and not failed:
            quiet()
        if _all_processes_agree(not reason):
            for bad, _ in failed:
                logging.warning("checkpoint %s moved to %s", directory / str(bad),
                                set_aside(directory.parent, bad))
            if failed:
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices("parrot_jax.set_aside")
                manager.reload()
            return restored, step
        reason = reason or "another process could not restore it"
        failed.append((step, reason))
        fallback = (f"falling back to {unit} {steps[i + 1]}" if i + 1 < len(steps)
                    else "no older checkpoint")
        logging.warning("checkpoint %s cannot be restored (%s); %s", directory / str(step),
                        reason, fallback)
    if failed:
        raise CheckpointError(
            f"{directory}: no checkpoint can be restored ("
            + "; ".join(f"{step}: {reason}" for step, reason in failed)
            + f"). Move {directory} aside to start the run afresh, or use a new --workdir")
    return target, None


def restore_parts(workdir: str | os.PathLike, step: int, parts: tuple[str, ...]) -> dict:
    """The subtrees ``parts`` (``'/'``-joined paths, e.g. ``'pen/lora'``) of checkpoint ``step``
    as nested dicts of host arrays, read alone: the rest of the state (optimizer moments,
    tracker, ...) stays on disk."""
    path = storage.path(workdir) / CHECKPOINT_DIR / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    tree = getattr(meta, "tree", meta)
    target: dict = {}
    for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(p, "key", p)) for p in leaf_path]
        name = "/".join(keys)
        if any(name == part or name.startswith(part + "/") for part in parts):
            node = target
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = np.zeros(leaf.shape, leaf.dtype)  # a shape and dtype to restore
    missing = [p for p in parts if not any(k.startswith(p) for k in _flat_names(target))]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no {missing}")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))


def _flat_names(tree: dict, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _flat_names(v, f"{prefix}{k}/")]
    return [prefix[:-1]]

"""A run's workdir: ``config.json``, compatibility between runs, and orbax checkpoints.

A workdir belongs to one experiment. Its ``config.json`` is written on the first run; a later run
in the same workdir must agree on every field except those the schema marks resumable (run
length, logging and checkpoint cadence, device layout, the closing evaluation), or it is refused
before anything is written (``parrot_jax.config``). Checkpoints are an orbax
``CheckpointManager`` (async, ``max_to_keep``) of one item, ``state``: the loop's whole training
state (``training.state``). Training writes here; sampling and evaluation read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from parrot_jax import config as schema

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


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
    path = Path(workdir) / CONFIG_FILE
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
    path = Path(workdir) / CONFIG_FILE
    if jax.process_index() == 0 and not path.is_file():
        Path(workdir).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config_dict(config), indent=2) + "\n")


def checkpoint_manager(workdir: str | os.PathLike, max_to_keep: int | None = None,
                       read_only: bool = False) -> ocp.CheckpointManager:
    """The orbax manager of ``workdir/checkpoints`` (one item, ``state``)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                           read_only=read_only)
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                                 item_names=("state",))


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Start saving ``state`` at ``step`` (returns once arrays are copied off the devices)."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, int | None]:
    """``(state, step)`` of the latest checkpoint restored into ``target``'s structure and
    shardings, or ``(target, None)`` when there is none."""
    step = manager.latest_step()
    if step is None:
        return target, None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return restored.state, step


def restore_parts(workdir: str | os.PathLike, step: int, parts: tuple[str, ...]) -> dict:
    """The subtrees ``parts`` (``'/'``-joined paths, e.g. ``'pen/lora'``) of checkpoint ``step``
    as nested dicts of host arrays, read alone: the rest of the state (optimizer moments,
    tracker, ...) stays on disk."""
    path = Path(workdir).absolute() / CHECKPOINT_DIR / str(step) / "state"
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

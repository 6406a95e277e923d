"""The run's workdir contract: ``config.json`` compatibility and orbax checkpoints.

A workdir belongs to one experiment. Its ``config.json`` is written on the first run; a later run
in the same workdir must agree on every field except ``RESUMABLE_FIELDS`` (run length, logging and
checkpoint cadence, device layout), or it is refused before anything is written. Checkpoints are
an orbax ``CheckpointManager`` (async, ``max_to_keep``) of one item, ``state``: the loop's whole
training state (see ``loop.ParrotState``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from parrot_jax.expansion.reinforce import DEFAULT_LORA_TARGETS
from parrot_jax.training.pen_sft import checkpoint_manager

CONFIG_FILE = "config.json"
# Fields that may change between runs in one workdir: they change neither shapes nor semantics
# (the mesh, the sharding and the matmul precision change rounding only).
RESUMABLE_FIELDS = ("num_iterations", "log_every", "checkpoint_every", "max_to_keep",
                    "eval_every", "eval_prompts", "distributed", "mesh.", "param_sharding",
                    "matmul_precision", "final_eval.")
# Fields added after workdirs were first written, with the value their absence stands for: a
# saved config without one agrees with a config that holds that value, so older runs resume.
ADDED_FIELDS = {"pen.expansions_per_prompt": 1, "pen.lora_targets": DEFAULT_LORA_TARGETS,
                "t2i.warmup_steps": 0}


class IncompatibleWorkdirError(ValueError):
    """The workdir holds a run of a different configuration."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as ``config.json`` stores it."""
    return json.loads(config.to_json_best_effort())


def check_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """Check ``config`` against ``workdir/config.json`` if there is one: any difference outside
    ``RESUMABLE_FIELDS`` raises ``IncompatibleWorkdirError`` listing the fields (a field of
    ``ADDED_FIELDS`` missing from the saved config counts as its stated value)."""
    path = Path(workdir) / CONFIG_FILE
    now = config_dict(config)
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise IncompatibleWorkdirError(f"{path}: unreadable ({e}); use a new --workdir") from e
        a, b = _flat(saved), _flat(now)
        implied = {k: v for k, v in ADDED_FIELDS.items() if k in b and k not in a}
        a.update(implied)
        shown = lambda k: (f"<absent, meaning {a[k]!r}>" if k in implied  # noqa: E731
                           else repr(a.get(k, "<absent>")))
        diffs = [f"{k}: saved {shown(k)}, now {b.get(k, '<absent>')!r}"
                 for k in sorted(set(a) | set(b))
                 if a.get(k) != b.get(k)
                 and not any(k == f or (f.endswith(".") and k.startswith(f))
                             for f in RESUMABLE_FIELDS)]
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


__all__ = ["ADDED_FIELDS", "CONFIG_FILE", "IncompatibleWorkdirError", "check_workdir",
           "checkpoint_manager", "config_dict", "restore_latest", "save", "write_config"]

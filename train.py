"""Parrot training: ``python train.py [--config configs/X.py[:arg]] [--workdir DIR]``.

The default config is ``configs/toy.py``: Parrot in the toy world shipped with the package
(its own small UNet, VAE, CLIP, PEN and reward heads), nothing downloaded, minutes on a CPU,
ending with a base-vs-trained table on held-out prompts. ``--config.a.b=value`` overrides a
field (``python -m parrot_jax.config`` lists them). Resuming is automatic: rerun with the same
``--workdir``. Several processes (every worker of a TPU pod slice, or any launch with
``--coordinator_address --num_processes --process_id``): ``--config.distributed=True``.
"""

from __future__ import annotations

import logging as std_logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from parrot_jax import cli

ROOT = Path(__file__).resolve().parent
PROG = "python train.py"


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config", str(ROOT / "configs" / "toy.py"), "ml_collections config file with "
        "get_config(arg), as path[:arg]. Default: configs/toy.py (the toy world).",
        flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "where config.json, metrics.jsonl and checkpoints go; "
                        "reusing one resumes it. Default: a fresh folder runs/<date-time>.",
                        flag_values=values)
    flags.DEFINE_bool("retain_host_memory", True, "keep freed host memory in the process "
                      "(glibc malloc: one arena, no mmap, no trimming; parrot_jax.host_memory) "
                      "so XLA:CPU's per-step temporaries stop costing page faults: 10-15% faster "
                      "CPU steps. On accelerators it only touches host-side allocations; "
                      "--noretain_host_memory keeps glibc's defaults.", flag_values=values)
    cli.define_distributed_flags(values)


def _quiet_orbax(record) -> bool:
    """Keep orbax's warnings and errors but not its per-save INFO chatter, which would bury the
    progress lines."""
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    logging.get_absl_handler().addFilter(_quiet_orbax)
    if args.retain_host_memory:  # before XLA starts its threads, which would keep their own arenas
        from parrot_jax import host_memory

        why_not = host_memory.retain_freed_memory()
        if why_not:
            logging.warning("freed host memory is not retained: %s", why_not)
    config = args.config
    from parrot_jax import config as schema
    from parrot_jax import parallel

    try:
        schema.check(config)
    except schema.ConfigError as e:
        cli.fail(PROG, str(e))
    cli.check_workdir(PROG, args.workdir)
    launch = cli.distributed_launch(PROG, args, config.distributed)
    try:  # before anything touches the devices
        parallel.initialize_distributed(config.distributed, **launch)
    except parallel.LaunchError as e:
        cli.fail(PROG, f"--coordinator_address: {e}")
    import jax

    from parrot_jax.training import train_and_evaluate

    if jax.process_count() > 1 and not args.workdir:
        cli.fail(PROG, f"--workdir is required with {jax.process_count()} processes (each would "
                       "pick its own runs/<date-time>); give every process the same one")
    workdir = args.workdir or str(ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    logging.info("JAX process %d of %d, %d local devices; workdir %s", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), workdir)
    from parrot_jax.data.promptist import DatasetError
    from parrot_jax.workdir import CheckpointError, IncompatibleWorkdirError

    try:
        result = train_and_evaluate(config, workdir)
    except (DatasetError, IncompatibleWorkdirError, FileNotFoundError) as e:  # bad input
        cli.fail(PROG, str(e))
    except (FloatingPointError, CheckpointError) as e:  # the run cannot go on
        cli.halt(PROG, str(e))
    logging.info("finished at iteration %d%s", result["step"],
                 " (preempted: resume with the same --workdir)" if result["preempted"] else "")
    return result


if __name__ == "__main__":
    cli.entry_point(main)

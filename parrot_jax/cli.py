"""Command lines: ``train.py`` and every ``python -m parrot_jax...`` tool parse absl flags alike.

Each tool defines its flags on a ``FlagValues`` of its own (``define(flag_values, argv)``), so
tools can be imported side by side and called as ``tool.main(argv)`` from a notebook or a test.
Flags are absl's: ``--name=value`` or ``--name value``, booleans as ``--flag`` / ``--noflag``,
names with underscores; a config file is ``--config path.py[:variant]`` with ``--config.a.b=v``
overrides (ml_collections). ``--help`` prints the tool's docstring and flags. A bad flag, a bad
value, or an input the tool refuses (``fail``) prints one line, ``<tool>: error: <what>``, and
exits with status 2 (``SystemExit(2)``, also when called as ``main(argv)``); a run that stops
(``halt``) prints ``<tool>: stopped: <what>`` and exits with status 1. An unknown
``--config.KEY`` is named with the nearest known keys; a config file that raises is reported by
its error's line, not the traceback ml_collections wraps around it.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from absl import flags, logging

Define = Callable[[flags.FlagValues, list[str]], None]


def fail(prog: str, message: str) -> NoReturn:
    """Refuse the command: one line naming what is wrong, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def halt(prog: str, message: str) -> NoReturn:
    """A run that cannot go on (a diverged update, no checkpoint that reads back): one line,
    ``<tool>: stopped: <what>``, exit status 1."""
    print(f"{prog}: stopped: {message}", file=sys.stderr)
    raise SystemExit(1)


def parse(define: Define, argv: Sequence[str] | None, *, prog: str,
          doc: str | None) -> flags.FlagValues:
    """Define a tool's flags on a fresh ``FlagValues`` and parse ``argv`` (without the program
    name; default ``sys.argv[1:]``). ``--help`` prints ``doc`` and the flags and exits 0; a bad
    flag or value, or a positional argument, exits 2 with one line."""
    args = [prog, *(sys.argv[1:] if argv is None else argv)]
    values = flags.FlagValues()
    try:
        define(values, args)
    except (AttributeError, KeyError, ValueError, OSError) as e:  # a --config override
        fail(prog, _config_error(define, args, e))
    if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in args[1:]):
        print(f"usage: {prog} [flags]\n\n{(doc or '').strip()}\n\nflags:\n"
              f"{values.get_help(include_special_flags=False)}")
        raise SystemExit(0)
    try:
        rest = values(args)
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as e:  # also a config
        fail(prog, _config_error(define, args, e))
    if len(rest) > 1:
        fail(prog, f"unexpected arguments {rest[1:]} (flags are --name=value)")
    return values


# --config.PATH=value, --config.PATH value, --noconfig.PATH (booleans): ml_collections' forms.
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)(=.*)?$")


def _config_error(define: Define, args: list[str], error: Exception) -> str:
    """One line for a failed define / parse: an unknown ``--config.PATH`` key named with the
    nearest known keys (ml_collections says only the key, as a KeyError's repr); a config file
    that raised: the last line of the traceback ml_collections embeds; else the error."""
    unknown = _unknown_override(define, args)
    if unknown:
        return unknown
    text = str(error)
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]  # str(KeyError) is the repr of its message
    head, sep, trace = text.partition(": Error whilst parsing config file")
    if sep and "Traceback" in trace:
        text = f"{head}: {trace.strip().splitlines()[-1].strip()}"
    if not isinstance(error, flags.Error):
        text = text.strip("'\"")
    return " ".join(text.split())


def _unknown_override(define: Define, args: list[str]) -> str | None:
    """The first ``--config.PATH`` override that names no key of the loaded config, as one line
    with the nearest known keys; None when there is none, or the config itself does not load.
    The config is loaded by defining and parsing the flags again without the overrides."""
    paths, plain = [], []
    skip = False
    for i, arg in enumerate(args):
        match = _OVERRIDE.match(arg) if i else None
        if skip:
            skip = False
        elif match:
            paths.append((match.group(2), arg))
            # "--config.key value": the next argument is its value (booleans take none).
            skip = (match.group(3) is None and not match.group(1) and i + 1 < len(args)
                    and not args[i + 1].startswith("-"))
        else:
            plain.append(arg)
    if not paths:
        return None
    values = flags.FlagValues()
    try:
        define(values, plain)
        values(plain)
        config = values["config"].value
    except Exception:  # noqa: BLE001 - the original error is reported instead
        return None
    if config is None:
        return None
    for path, arg in paths:
        problem = _unknown_key(config, path)
        if problem:
            return f"unknown config key {path!r} ({arg}): {problem}"
    return None


def _unknown_key(config: Any, path: str) -> str | None:
    """Why ``config`` has no field at dotted ``path`` (naming the nearest known keys), or None
    if it has one (indexing, ``a[0]``, is left to ml_collections)."""
    node, where = config, "config"
    for part in path.split("."):
        name = part.split("[", 1)[0]
        if not isinstance(node, Mapping) and not hasattr(node, "keys"):
            return f"{where} is a value ({type(node).__name__}), not a section with keys"
        keys = [str(k) for k in node.keys()]
        if name not in keys:
            level = [f"{where}.{k}"[len("config."):] for k in
                     difflib.get_close_matches(name, keys, n=3, cutoff=0.6)]
            flat = _dotted_keys(config)
            tail = [k for k in flat if k.endswith("." + path)]
            near = [k for k in dict.fromkeys(tail + level + difflib.get_close_matches(path, flat))
                    if not path.startswith(k + ".")]  # not the sections it names correctly
            if near:
                return "nearest known: " + ", ".join(near[:4])
            return f"no close match; {where} has: " + ", ".join(sorted(keys))
        if name != part:
            return None
        node, where = node[name], f"{where}.{name}"
    return None


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a (nested) config as a dotted path, sections included."""
    out = []
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        for key in node.keys():
            out.append(f"{prefix}{key}")
            out += _dotted_keys(node[key], f"{prefix}{key}.")
    return out


def entry_point(main: Callable[[Sequence[str] | None], Any]) -> None:
    """``if __name__ == '__main__'`` of a tool: INFO logging to stderr, then ``main()``."""
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    main(None)


def define_policy_flags(values: flags.FlagValues) -> None:
    """The flags of the tools that read a training workdir's policy: ``--workdir``,
    ``--step``, ``--base``."""
    flags.DEFINE_string("workdir", None, "a Parrot training workdir (train.py's --workdir)",
                        flag_values=values, required=True)
    flags.DEFINE_integer("step", None, "checkpoint iteration (default: the latest)",
                         flag_values=values)
    flags.DEFINE_bool("base", False, "the untrained models (with --step: not allowed)",
                      flag_values=values)


def define_distributed_flags(values: flags.FlagValues) -> None:
    """The flags of the tools that can run as several processes (``train.py``, PEN SFT), used
    with ``--config.distributed=True``. Without them ``jax.distributed.initialize()`` finds the
    processes itself (Cloud TPU slices, SLURM); with them, any launch works: several processes
    on one machine, or plain VMs."""
    flags.DEFINE_string("coordinator_address", None, "HOST:PORT where process 0 serves the "
                        "JAX coordinator; every process passes the same (needs "
                        "--num_processes and --process_id)", flag_values=values)
    flags.DEFINE_integer("num_processes", None, "how many processes the run has",
                         flag_values=values)
    flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1 "
                         "(0 writes the logs)", flag_values=values)
    flags.DEFINE_integer("initialization_timeout", 300, "seconds to wait for the coordinator "
                         "and every process to join before failing", flag_values=values)
    flags.DEFINE_integer("heartbeat_timeout", 100, "seconds of silence after which a process "
                         "counts as dead and the others stop with an error naming it",
                         flag_values=values)


def check_workdir(prog: str, workdir: str | None) -> None:
    """``--workdir`` must be a local path or a bucket this installation reaches (``gs://``
    with gcsfs), where this process may write (``storage.cannot_write``); anything else exits
    2 naming the flag, before JAX starts."""
    from parrot_jax import storage

    if not workdir:
        return
    try:
        folder = storage.path(workdir)
    except storage.StorageError as e:
        fail(prog, f"--workdir: {e}")
    problem = storage.cannot_write(folder)
    if problem:
        fail(prog, f"--workdir {workdir}: {problem}")


LAUNCH_FLAGS = ("coordinator_address", "num_processes", "process_id")


def distributed_launch(prog: str, values: flags.FlagValues, enabled: bool) -> dict[str, Any]:
    """``parallel.initialize_distributed``'s keyword arguments from the flags above; a bad
    combination fails (``fail``) naming the flag."""
    given = [name for name in LAUNCH_FLAGS if values[name].value is not None]
    if not enabled:
        if given:
            fail(prog, f"--{given[0]} needs --config.distributed=True")
        return {}
    if given and len(given) < len(LAUNCH_FLAGS):
        missing = [name for name in LAUNCH_FLAGS if name not in given]
        fail(prog, f"--{given[0]} needs --{' and --'.join(missing)} "
                   "(--coordinator_address, --num_processes and --process_id go together)")
    for name in ("initialization_timeout", "heartbeat_timeout"):
        if values[name].value <= 0:
            fail(prog, f"--{name}={values[name].value}: seconds, > 0")
    launch = {"initialization_timeout": values.initialization_timeout,
              "heartbeat_timeout": values.heartbeat_timeout}
    if not given:
        return launch
    address, n, i = values.coordinator_address, values.num_processes, values.process_id
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        fail(prog, f"--coordinator_address={address}: expected HOST:PORT, e.g. 10.0.0.2:8476")
    if n < 1:
        fail(prog, f"--num_processes={n}: at least 1")
    if not 0 <= i < n:
        fail(prog, f"--process_id={i} is out of range for --num_processes={n} (0 .. {n - 1})")
    return {**launch, "coordinator_address": address, "num_processes": n, "process_id": i}


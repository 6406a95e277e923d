"""Command lines: ``train.py`` and every ``python -m parrot_jax...`` tool parse absl flags alike.

Each tool defines its flags on a ``FlagValues`` of its own (``define(flag_values, argv)``), so
tools can be imported side by side and called as ``tool.main(argv)`` from a notebook or a test.
Flags are absl's: ``--name=value`` or ``--name value``, booleans as ``--flag`` / ``--noflag``,
names with underscores; a config file is ``--config path.py[:variant]`` with ``--config.a.b=v``
overrides (ml_collections). ``--help`` prints the tool's docstring and flags. A bad flag, a bad
value, or an input the tool refuses (``fail``) prints one line, ``<tool>: error: <what>``, and
exits with status 2 (``SystemExit(2)``, also when called as ``main(argv)``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags, logging

Define = Callable[[flags.FlagValues, list[str]], None]


def fail(prog: str, message: str) -> NoReturn:
    """Refuse the command: one line naming what is wrong, exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
        fail(prog, str(e).strip("'\""))
    if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in args[1:]):
        print(f"usage: {prog} [flags]\n\n{(doc or '').strip()}\n\nflags:\n"
              f"{values.get_help(include_special_flags=False)}")
        raise SystemExit(0)
    try:
        rest = values(args)
    except flags.Error as e:
        fail(prog, str(e))
    except (AttributeError, KeyError, ValueError, OSError) as e:  # a config file or override
        fail(prog, str(e).strip("'\""))
    if len(rest) > 1:
        fail(prog, f"unexpected arguments {rest[1:]} (flags are --name=value)")
    return values


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

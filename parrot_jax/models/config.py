"""Reading diffusers ``config.json`` dicts into our frozen model configs, with strict checks.

A config value we do not implement must never be ignored silently: every problem is collected
and raised as one ``ConfigError`` that names the source file and the offending keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class ConfigError(ValueError):
    """A model config asks for something this package does not implement (or is malformed)."""


class ConfigReader:
    """Pops keys from a diffusers config dict, recording every problem for one final error."""

    def __init__(self, config: dict[str, Any], source: str, *, ignored: Iterable[str] = ()):
        if not isinstance(config, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(config).__name__}")
        # Keys starting with '_' are diffusers bookkeeping (_class_name, _diffusers_version ...).
        self._rest = {k: v for k, v in config.items() if not k.startswith("_") and k not in ignored}
        self.source = source
        self.problems: list[str] = []

    def get(self, key: str, default: Any, check: Callable[[Any], bool] | None = None,
            expect: str = "") -> Any:
        """The value of ``key`` (``default`` when absent); records a problem if ``check`` fails."""
        value = self._rest.pop(key, default)
        if check is not None and not check(value):
            self.problems.append(f"{key}={value!r} ({expect})")
        return value

    def require(self, key: str, allowed: Any, *, default: Any) -> Any:
        """A key whose only supported value(s) are ``allowed`` (a value or a tuple of values)."""
        allowed_values = allowed if isinstance(allowed, tuple) else (allowed,)
        return self.get(key, default, lambda v: v in allowed_values,
                        f"unsupported; supported: {', '.join(map(repr, allowed_values))}")

    def finish(self, *, allow_unknown: bool = False) -> None:
        """Raise one ConfigError for all recorded problems, and for unknown keys unless allowed.

        transformers configs carry dozens of generic legacy keys (generation settings, label maps)
        that do not touch the architecture, so their readers pass ``allow_unknown=True`` and read
        every architecture key explicitly instead.
        """
        problems = list(self.problems)
        if self._rest and not allow_unknown:
            problems.append("unknown keys: " + ", ".join(sorted(self._rest)))
        if problems:
            raise ConfigError(f"{self.source}: " + "; ".join(problems))


def per_block(value: Any, n: int, key: str, reader: ConfigReader) -> tuple:
    """An int (or None) broadcast to ``n`` blocks, or a list that must have ``n`` entries."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            reader.problems.append(f"{key}={list(value)!r} (needs {n} entries, one per block)")
            return tuple(value[:1]) * n if value else (None,) * n
        return tuple(value)
    return (value,) * n


def check_groups(reader: ConfigReader, channels: tuple, groups: Any) -> None:
    """Every block width must split into ``norm_num_groups`` GroupNorm groups."""
    if is_positive_int(groups) and all(is_positive_int(c) for c in channels):
        bad = [c for c in channels if c % groups]
        if bad:
            reader.problems.append(
                f"block_out_channels {bad} not divisible by norm_num_groups={groups}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_positive_int(v: Any) -> bool:
    return is_int(v) and v > 0


def is_positive_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(is_positive_int(x) for x in v)

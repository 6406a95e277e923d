"""Config files by path: ``configs/`` is a folder of scripts, not a package, so configs that
build on another (``sd15.py`` and ``toy.py`` on ``tiny.py``) and tools that take a
``file.py[:arg]`` spec load them here, as ``ml_collections.config_flags`` does for ``--config``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any


def load_module(path: str | os.PathLike) -> ModuleType:
    """The config file at ``path`` as a module (it defines ``get_config(arg)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"parrot_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(spec: str | os.PathLike) -> Any:
    """``'path/to/config.py[:arg]'`` -> ``get_config(arg)`` (arg None when absent)."""
    path, _, arg = str(spec).partition(":")
    return load_module(path).get_config(arg or None)

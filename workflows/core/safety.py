"""Safe defaults a recipe cannot quietly turn off.

- ``check_engine_factory``: ``engine_factory: "module:callable"`` runs arbitrary code from a
  recipe on every actor. It exists for tests and benchmarks (scripted engines), so it is
  refused unless the environment allows it (``CAI_ALLOW_ENGINE_FACTORY=1``) — a recipe
  downloaded from somewhere cannot run code just by being ``cai run``.
- ``check_name``: names from a recipe that become directories (stage names, output dataset
  names, evaluated model names) must be one plain path component, so nothing a recipe
  says can write outside its run directory.
"""
from __future__ import annotations

import os
import re

from workflows.core.errors import ConfigError

ALLOW_FACTORY_ENV = "CAI_ALLOW_ENGINE_FACTORY"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


def check_engine_factory(value: str | None, where: str) -> None:
    if not value:
        return
    if ":" not in value:
        raise ConfigError(f"{where}.engine_factory", f"got {value!r}", "write module:callable")
    if os.environ.get(ALLOW_FACTORY_ENV) != "1":
        raise ConfigError(f"{where}.engine_factory", f"{value!r} would run code named by the recipe on every actor, "
                          "and that is off by default",
                          f"remove engine_factory to use the configured engines, or set {ALLOW_FACTORY_ENV}=1 "
                          "if you trust this recipe")


def check_name(name: str, where: str, what: str = "name") -> None:
    """``name`` is one plain directory name: letters, digits, ``_ . = -``; no ``/``, no ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.strip(".") == "" or ".." in name:
        raise ConfigError(where, f"{what} {name!r} cannot name a directory inside the run directory",
                          "use letters, digits, '_', '-' or '.', starting with a letter or digit (e.g. sft_2)")

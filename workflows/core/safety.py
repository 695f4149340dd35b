"""Safe defaults a recipe cannot quietly turn off.

- ``check_recipe_code``: ``engine_factory`` and PPO's ``reward_fn`` (``"module:callable"``) run
  code named by a recipe on every actor or train worker. They exist for tests, benchmarks and
  programmatic rewards, so they are refused unless the environment allows it
  (``CAI_ALLOW_RECIPE_CODE=1``) — a recipe downloaded from somewhere cannot run code just by
  being ``cai run``.
- ``check_name``: names from a recipe that become directories (stage names, output dataset
  names, evaluated model names) must be one plain path component, so nothing a recipe
  says can write outside its run directory.
"""
from __future__ import annotations

import os
import re

from workflows.core.errors import ConfigError

ALLOW_CODE_ENV = "CAI_ALLOW_RECIPE_CODE"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


def check_recipe_code(value: str | None, where: str, field: str = "engine_factory") -> None:
    """``where.field`` names code to run (``module:callable``): allowed only by ``ALLOW_CODE_ENV``."""
    if not value:
        return
    if ":" not in value:
        raise ConfigError(f"{where}.{field}", f"got {value!r}", "write module:callable")
    if os.environ.get(ALLOW_CODE_ENV) != "1":
        instead = "to use the configured engines" if field == "engine_factory" else "and use a reward model"
        raise ConfigError(f"{where}.{field}", f"{value!r} would run code named by the recipe on the cluster, "
                          "and that is off by default",
                          f"remove {field} {instead}, or set {ALLOW_CODE_ENV}=1 if you trust this recipe")


def check_name(name: str, where: str, what: str = "name") -> None:
    """``name`` is one plain directory name: letters, digits, ``_ . = -``; no ``/``, no ``..``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.strip(".") == "" or ".." in name:
        raise ConfigError(where, f"{what} {name!r} cannot name a directory inside the run directory",
                          "use letters, digits, '_', '-' or '.', starting with a letter or digit (e.g. sft_2)")

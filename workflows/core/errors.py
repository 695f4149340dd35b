"""User-facing errors: each names where the problem is (file, field, row) and the fix."""
from __future__ import annotations


class CaiError(Exception):
    """Base of every error we show a user as one readable line (no traceback)."""


class ConfigError(CaiError, ValueError):
    """A config/recipe/constitution/input file is wrong. ``where`` is e.g.
    ``recipe.yaml: stages[1].engine.batch_size``."""

    def __init__(self, where: str, problem: str, fix: str = ""):
        self.where, self.problem, self.fix = where, problem, fix
        msg = f"{where}: {problem}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


class DataError(CaiError, ValueError):
    """Input data is unusable as a whole (missing column, unreadable file)."""


class RowError(CaiError):
    """One row cannot be processed. It goes to the ``errors`` dataset as
    ``(id, stage, reason, detail)``; it never fails the batch it came in."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

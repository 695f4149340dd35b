"""Nothing lost: ids(outputs) ∪ ids(errors) = ids(inputs), disjoint, no duplicates."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from workflows.core.errors import CaiError


class ReconcileError(CaiError):
    """A stage's outputs and errors do not account for its inputs exactly."""


@dataclass
class Reconciliation:
    inputs: int
    outputs: int
    errors: int
    missing: list[str] = field(default_factory=list)  # in inputs, in neither outputs nor errors
    unexpected: list[str] = field(default_factory=list)  # in outputs/errors, not in inputs
    both: list[str] = field(default_factory=list)  # in outputs and in errors
    duplicates: list[str] = field(default_factory=list)  # more than once in outputs or errors

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.both or self.duplicates)

    def explain(self, stage: str) -> str:
        parts = [f"stage {stage}: {self.inputs} inputs, {self.outputs} outputs, {self.errors} errors"]
        for label, ids in (("missing", self.missing), ("not in inputs", self.unexpected),
                           ("in both outputs and errors", self.both), ("duplicated", self.duplicates)):
            if ids:
                parts.append(f"{len(ids)} {label} (e.g. {', '.join(sorted(ids)[:3])})")
        return "; ".join(parts)


def reconcile(inputs: Iterable[str], outputs: Iterable[str], errors: Iterable[str]) -> Reconciliation:
    """Compare id multisets. Inputs must be unique themselves (they come from a reconciled stage)."""
    inp = set(inputs)
    out_c, err_c = Counter(outputs), Counter(errors)
    out, err = set(out_c), set(err_c)
    dups = [i for i, n in (out_c + err_c).items() if n > 1 and not (i in out and i in err and n == 2)]
    return Reconciliation(
        inputs=len(inp), outputs=sum(out_c.values()), errors=sum(err_c.values()),
        missing=sorted(inp - out - err), unexpected=sorted((out | err) - inp),
        both=sorted(out & err), duplicates=sorted(dups),
    )


def check(stage: str, inputs: Iterable[str], outputs: Iterable[str], errors: Iterable[str]) -> Reconciliation:
    rec = reconcile(inputs, outputs, errors)
    if not rec.ok:
        raise ReconcileError(rec.explain(stage) + " — this is a bug in the stage; the run directory keeps "
                             "the raw rows under _raw/ for inspection")
    return rec

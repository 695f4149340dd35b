"""Nothing lost: ids(outputs) ∪ ids(errors) = ids(inputs), disjoint, no duplicates.

The comparison runs on hash partitions (``spill``): every id of the three sides goes to the
partition its bytes choose, so each partition is compared on its own with Arrow compute, exactly,
and memory stays within the budget however many ids there are. Sides are ``Ids`` — a re-readable
stream of Arrow string chunks with its length known up front (a dataset's id column, read from
parquet metadata) — or plain lists and arrays for small cases.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from workflows.core.errors import CaiError
from workflows.core.spill import Budget, Spill, as_strings

EXAMPLES = 20  # ids kept per kind of mismatch (the smallest), for messages
KINDS = ("missing", "unexpected", "both", "duplicates")
_LABELS = {"missing": "missing", "unexpected": "not in inputs", "both": "in both outputs and errors",
           "duplicates": "duplicated"}


class ReconcileError(CaiError):
    """A stage's outputs and errors do not account for its inputs exactly."""


@dataclass
class Ids:
    """Ids as a stream of Arrow string chunks (``chunks()`` may be called more than once) and how
    many there are (``rows``, which sizes the partitions before anything is read)."""

    chunks: Callable[[], Iterator[pa.Array]]
    rows: int


def as_ids(source) -> Ids:
    """``Ids`` as they are; an Arrow array, or a list/set/iterable of str, as one chunk."""
    if isinstance(source, Ids):
        return source
    arr = as_strings(source if isinstance(source, (pa.Array, pa.ChunkedArray)) else list(source))
    return Ids(lambda: iter([arr]), len(arr))


@dataclass
class Reconciliation:
    inputs: int
    outputs: int
    errors: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    # the smallest ids of each kind (at most EXAMPLES):
    missing: list[str] = field(default_factory=list)  # in inputs, in neither outputs nor errors
    unexpected: list[str] = field(default_factory=list)  # in outputs/errors, not in inputs
    both: list[str] = field(default_factory=list)  # in outputs and in errors
    duplicates: list[str] = field(default_factory=list)  # more than once in outputs or errors

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def explain(self, stage: str) -> str:
        parts = [f"stage {stage}: {self.inputs} inputs, {self.outputs} outputs, {self.errors} errors"]
        for kind in KINDS:
            if self.counts[kind]:
                parts.append(f"{self.counts[kind]} {_LABELS[kind]} (e.g. {', '.join(getattr(self, kind)[:3])})")
        return "; ".join(parts)

    def add(self, part: "Reconciliation") -> None:
        self.inputs, self.outputs, self.errors = (self.inputs + part.inputs, self.outputs + part.outputs,
                                                  self.errors + part.errors)
        for kind in KINDS:
            self.counts[kind] += part.counts[kind]
            setattr(self, kind, sorted(getattr(self, kind) + getattr(part, kind))[:EXAMPLES])


def compare(inp: pa.Array, out: pa.Array, err: pa.Array) -> Reconciliation:
    """The reconciliation of one partition (or of everything, when it fits), with Arrow compute.
    ``inp`` must be unique in itself (it comes from a reconciled stage); it is deduplicated anyway."""
    inp, out, err = as_strings(inp), as_strings(out), as_strings(err)
    inp_u = pc.unique(inp)
    vc = pc.value_counts(pa.concat_arrays([out, err]))
    vals, counts = vc.field("values"), vc.field("counts")
    both = pc.unique(out).filter(pc.is_in(pc.unique(out), value_set=pc.unique(err)))
    once_each = pc.and_(pc.is_in(vals, value_set=both), pc.equal(counts, 2))
    found = {"missing": inp_u.filter(pc.invert(pc.is_in(inp_u, value_set=vals))),
             "unexpected": vals.filter(pc.invert(pc.is_in(vals, value_set=inp_u))),
             "both": both,
             "duplicates": vals.filter(pc.and_(pc.greater(counts, 1), pc.invert(once_each)))}
    rec = Reconciliation(len(inp_u), len(out), len(err))
    for kind, ids in found.items():
        rec.counts[kind] = len(ids)
        setattr(rec, kind, sorted(ids.take(pc.bottom_k_unstable(ids, min(EXAMPLES, len(ids)))).to_pylist()))
    return rec


def reconcile(inputs, outputs, errors, budget: Budget = Budget()) -> Reconciliation:
    """Compare id multisets, partition by partition when they do not fit the budget."""
    sides = {"in": as_ids(inputs), "out": as_ids(outputs), "err": as_ids(errors)}
    parts = budget.parts_for(sum(s.rows for s in sides.values()))
    total = Reconciliation(0, 0, 0)
    with Spill(parts, budget) as sp:
        for kind, ids in sides.items():
            for chunk in ids.chunks():
                sp.add(kind, pa.table({"id": as_strings(chunk)}))
        for p in range(parts):
            total.add(compare(*(sp.read(kind, p)["id"].combine_chunks() for kind in sides)))
    return total


def raise_unless_ok(rec: Reconciliation, stage: str) -> Reconciliation:
    if not rec.ok:
        raise ReconcileError(rec.explain(stage) + " — this is a bug in the stage; the run directory keeps "
                             "the raw rows under _raw/ for inspection")
    return rec


def check(stage: str, inputs: Iterable[str] | Ids, outputs, errors, budget: Budget = Budget()) -> Reconciliation:
    return raise_unless_ok(reconcile(inputs, outputs, errors, budget), stage)


def duplicated(ids, budget: Budget = Budget()) -> tuple[int, list[str]]:
    """How many distinct ids occur more than once in ``ids``, and the smallest of them."""
    rec = reconcile([], ids, [], budget)
    return rec.counts["duplicates"], rec.duplicates

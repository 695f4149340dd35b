"""Existing pairs to label (``pairs_from``): the CAI paper labels a dataset it did not sample.

``read_pairs_file(path, stage, out, budget)`` reads every format of ``human.load_human`` —
``prompt``/``chosen``/``rejected`` columns (text, message lists or their JSON text) and HH-RLHF
``chosen``/``rejected`` transcripts — plus "a prompt with two responses": ``prompt`` (text or
messages) with ``response_a``/``response_b`` (or ``response_1``/``response_2``), from
.jsonl/.json/.csv/.parquet (local or s3://) or a saved Hugging Face dataset dir. One file may mix
the two kinds of row.

Every record becomes either a row of the stage's ``pairs`` dataset (pair_id, prompt_id,
messages, response_a, response_b) or an error ``{id: "<file>:<row>", stage, reason, detail}``
(reasons of ``load_human`` — missing_field, bad_messages, empty_prompt, empty_response,
identical_responses, ... — and ``duplicate`` for a pair already seen: the first record of a
pair is kept, later ones name it), never dropped silently.

A chosen/rejected row keeps the dataset's own choice (a ``preferences`` row, judge and source
"dataset"), so the AI labels can be scored against it, and its chosen answer is shown as (A) or
(B) by ``chosen_first(pair_id)`` — a hash, so the dataset's column order never becomes the
position the judge sees.

Bounded memory, whatever the file's size (``read_pairs_file``): records are read as a stream
(``human._records``) and parsed a chunk at a time into *candidate* rows, written with their
record number ``_row`` to an Arrow file (lz4) in a temporary directory under the budget's spill
directory (about the size of the ``pairs`` output, removed at the end); the duplicates are found
exactly by pair id, hash partition by partition (``spill.Spill``), and spilled again by row range
as (row, row kept) so that a second pass over the candidates, in record order, writes ``pairs``,
``errors`` and the dataset's labels holding one range at a time; ``reconcile.check`` verifies
records = kept ∪ errors on ``<file>:<row>`` ids. ``load_pairs`` is the same reading held in lists, for
small files.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workflows.core import storage
from workflows.core.errors import ConfigError, RowError
from workflows.core.reconcile import Ids, check
from workflows.core.spill import Budget, Spill
from workflows.core.stage import ERRORS_SCHEMA, MESSAGES, _RollingWriter, ids_in
from workflows.judging.human import PREFERENCES_SCHEMA, _prompt, _records, _response, human_row, text_of
from workflows.core.pairwise import pair_id
from workflows.prompt_sources import prompt_id

TWO_RESPONSES = (("response_a", "response_b"), ("response_1", "response_2"))
PAIRS_SCHEMA = pa.schema([("pair_id", pa.string()), ("prompt_id", pa.string()), ("messages", MESSAGES),
                          ("response_a", pa.string()), ("response_b", pa.string())])
# a record as read: its pair (null for an error), its number, its error, and whether it is a
# chosen/rejected row whose chosen answer is response_a (null: a two-response row, or an error)
CANDIDATES_SCHEMA = pa.schema([*PAIRS_SCHEMA, ("_row", pa.int64()), ("_error", pa.string()),
                               ("_detail", pa.string()), ("_chosen_a", pa.bool_())])
DATASET_LABELS = "_dataset_labels"  # the dataset's own choices, in the stage's directory
CHUNK = 4096  # records parsed and held at a time


@dataclass
class PairsFile:
    """What ``load_pairs`` read. ``rows`` names every record (``<file>:<row>``); ``kept`` names the
    record of each pair, in the order of ``pairs``: ids(rows) = kept ∪ ids(errors), disjoint."""

    pairs: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)  # the dataset's choice, for chosen/rejected rows
    errors: list[dict] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PairsOut:
    """Where ``read_pairs_file`` writes: the ``pairs``, ``errors`` and dataset-label datasets (each a
    directory of parquet parts, replaced)."""

    pairs: str
    errors: str
    labels: str


@dataclass(frozen=True)
class LabelsAt:
    """A ``preferences`` dataset written by ``read_pairs_file`` (the dataset's own choices): where,
    how many rows, and the bookkeeping budget to read it back with."""

    uri: str
    rows: int
    budget: Budget = Budget()


@dataclass
class PairsRead:
    """What ``read_pairs_file`` wrote: record, pair, error and dataset-label counts."""

    rows: int
    pairs: int
    errors: int
    labels: int
    errors_by_reason: dict[str, int]
    parts: int  # hash partitions of the duplicate search (1: it fit the budget in memory)


def chosen_first(pid: str) -> bool:
    """Whether a labeled pair is shown with its chosen answer as (A): one bit of a hash of its
    id — about half the pairs each way, the same on every run."""
    return hashlib.sha256(f"position:{pid}".encode("utf-8")).digest()[0] % 2 == 0


def pair_row(prompt: list[dict], response_a: str, response_b: str) -> dict:
    """A row of the stage's ``pairs`` dataset (``PAIRS_SCHEMA``); ids derived from the content."""
    pid = prompt_id(prompt)
    return {"pair_id": pair_id(pid, response_a, response_b), "prompt_id": pid, "messages": prompt,
            "response_a": response_a, "response_b": response_b}


def labeled_pair_row(label: dict) -> dict:
    """The ``pairs`` row of a ``preferences`` row (a human or dataset choice), with the chosen
    answer as (A) or (B) by ``chosen_first``."""
    chosen, rejected = text_of(label["chosen"]), text_of(label["rejected"])
    a, b = (chosen, rejected) if chosen_first(label["pair_id"]) else (rejected, chosen)
    return pair_row(label["prompt"], a, b)


def _has(record: dict, name: str) -> bool:
    """A column with a value: CSV files give every row every column, empty where unused."""
    return record.get(name) not in (None, "")


def _columns(record: dict) -> str:
    return ", ".join(str(k) for k in record if _has(record, k)) or "none"


def _two_responses(record: dict) -> dict:
    """A "prompt with two responses" record → its ``pairs`` row, or ``RowError`` naming the field."""
    names = next((n for n in TWO_RESPONSES if any(_has(record, f) for f in n)), TWO_RESPONSES[0])
    for f in ("prompt", *names):
        if not _has(record, f):
            raise RowError("missing_field", f"no {f!r} (columns: {_columns(record)})")
    prompt = _prompt(record["prompt"])
    if not prompt[-1]["content"].strip():
        raise RowError("empty_prompt", "the last user turn of 'prompt' is empty")
    a, b = (_response(record[f], f) for f in names)
    for f, text in zip(names, (a, b)):
        if not text.strip():
            raise RowError("empty_response", f"{f!r} is empty")
    if a.strip() == b.strip():
        raise RowError("identical_responses", f"{names[0]!r} and {names[1]!r} are the same text")
    return pair_row(prompt, a, b)


def pair_record(record: Any) -> tuple[dict, dict | None]:
    """One input record → (its ``pairs`` row, the dataset's label or None), or ``RowError``.
    A record with ``response_a``/``response_b`` (or ``_1``/``_2``) values is a two-response
    row; any other is read as chosen/rejected by ``human.human_row``."""
    if not isinstance(record, dict):
        raise RowError("bad_json", f"expected an object per row, got {type(record).__name__}")
    if any(_has(record, f) for names in TWO_RESPONSES for f in names):
        return _two_responses(record), None
    if not any(_has(record, f) for f in ("chosen", "rejected")):
        raise RowError("missing_field", "neither 'chosen'/'rejected' nor 'response_a'/'response_b' "
                                        f"(columns: {_columns(record)})")
    label = {**human_row(record), "judge": "dataset", "source": "dataset"}
    return labeled_pair_row(label), label


def _require(path: str) -> str:
    """The file's name in error ids; a missing file is a ``ConfigError``."""
    if not storage.exists(path):
        raise ConfigError(path, "file not found", "check pairs_from (or --pairs): a jsonl/json/csv/parquet file "
                          "or a saved Hugging Face dataset dir")
    return os.path.basename(str(path).rstrip("/")) or str(path)


def _parse(rec: Any) -> tuple[dict, dict | None]:
    """``pair_record`` of a record as ``human._records`` yields it (a ``RowError`` is raised)."""
    if isinstance(rec, RowError):
        raise rec
    return pair_record(rec)


def duplicate_error(pid: str, kept_row: int) -> RowError:
    return RowError("duplicate", f"same prompt and responses as row {kept_row} (pair {pid}); that row is kept")


def load_pairs(path: str, stage: str = "pairs", split: str = "train") -> PairsFile:
    """Every record of ``path`` as a pair or an error (see the module docstring), in lists: for
    small files (``read_pairs_file`` streams). The first record of a pair is kept; later ones are
    ``duplicate`` errors naming it."""
    name = _require(path)
    out, seen = PairsFile(), {}
    for i, rec in enumerate(_records(str(path), split)):
        rid = f"{name}:{i}"
        out.rows.append(rid)
        try:
            row, label = _parse(rec)
            if row["pair_id"] in seen:
                raise duplicate_error(row["pair_id"], seen[row["pair_id"]])
        except RowError as e:
            out.errors.append({"id": rid, "stage": stage, "reason": e.reason, "detail": f"row {i}: {e.detail}"})
            continue
        seen[row["pair_id"]] = i
        out.pairs.append(row)
        out.kept.append(rid)
        if label is not None:
            out.labels.append(label)
    return out


# ---------------------------------------------------------------- streaming, in bounded memory

def read_pairs_file(path: str, stage: str, out: PairsOut, budget: Budget = Budget(),
                    split: str = "train") -> PairsRead:
    """Every record of ``path`` as a row of ``out.pairs`` or of ``out.errors`` (stage ``stage``),
    and the dataset's own choices in ``out.labels`` (``PREFERENCES_SCHEMA``), exactly as
    ``load_pairs`` makes them and in the same order, in memory bounded by ``budget`` whatever the
    file's size (see the module docstring). Reconciled before it returns: ids(records) = kept ∪
    ids(errors), disjoint (``ReconcileError`` otherwise)."""
    name = _require(path)
    work = tempfile.mkdtemp(prefix="cai-pairs-", dir=budget.spill_dir)
    try:
        candidates, kept = os.path.join(work, "candidates.arrow"), os.path.join(work, "kept")
        rows = _write_candidates(str(path), split, candidates)
        with _Duplicates(rows, budget) as dups:
            parts = _find_duplicates(candidates, rows, budget, dups)
            got = _write_outputs(candidates, dups, name, stage, out, kept)
        check(stage, _record_ids(name, rows), ids_in(kept, "id"), ids_in(out.errors, "id"), budget)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PairsRead(rows, got["pairs"], got["errors"], got["labels"], got["reasons"], parts)


def _candidate(rec: Any, i: int) -> dict:
    try:
        row, label = _parse(rec)
    except RowError as e:
        return {"_row": i, "_error": e.reason, "_detail": f"row {i}: {e.detail}"}
    return {**row, "_row": i, "_chosen_a": None if label is None else chosen_first(row["pair_id"])}


def _chunks(records: Iterator[Any], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for i, rec in enumerate(records):
        chunk.append(_candidate(rec, i))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_candidates(path: str, split: str, file: str) -> int:
    """Pass 1: every record parsed, a chunk at a time, into an Arrow file of candidate rows (lz4,
    on local disk: written and read back faster than parquet); the record count."""
    n = 0
    with pa.OSFile(file, "wb") as sink, \
            pa.ipc.new_file(sink, CANDIDATES_SCHEMA, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        for chunk in _chunks(_records(path, split), CHUNK):
            w.write_table(pa.Table.from_pylist(chunk, schema=CANDIDATES_SCHEMA))
            n += len(chunk)
    return n


def _batches(file: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The candidates in record order, a chunk at a time."""
    with pa.OSFile(file) as src:
        reader = pa.ipc.open_file(src)
        for i in range(reader.num_record_batches):
            t = pa.Table.from_batches([reader.get_batch(i)])
            yield t.select(columns) if columns else t


class _Duplicates:
    """The duplicate rows and the row each repeats, found partition by partition in any order and
    read back in record order: spilled by row range (``Spill`` with chosen partitions), so that one
    range is in memory at a time, whatever their number."""

    def __init__(self, rows: int, budget: Budget):
        self.spill = Spill(budget.parts_for(rows), budget)
        self.span = max(1, -(-rows // self.spill.parts))  # rows per range
        self.ranges: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def add(self, dup: np.ndarray, kept: np.ndarray) -> None:
        self.spill.add("dups", pa.table({"id": pa.array(dup), "row": dup, "kept": kept}), part=dup // self.span)

    def of(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For increasing ``rows`` (a batch in record order): which are duplicates, and the row
        kept for each of those. Ranges before the batch's are let go."""
        if len(rows) == 0:
            return np.zeros(0, bool), np.zeros(0, np.int64)
        lo, hi = int(rows[0]) // self.span, int(rows[-1]) // self.span
        for r in [r for r in self.ranges if r < lo]:
            del self.ranges[r]
        for r in range(lo, hi + 1):
            if r not in self.ranges:  # each range is read once (``Spill.read`` hands its file over)
                t = self.spill.read("dups", r)
                row, kept = (t["row"].to_numpy(), t["kept"].to_numpy()) if t.num_rows else (np.zeros(0, np.int64),) * 2
                order = np.argsort(row, kind="stable")
                self.ranges[r] = (row[order], kept[order])
        dup_rows = np.concatenate([self.ranges[r][0] for r in range(lo, hi + 1)])
        kept_rows = np.concatenate([self.ranges[r][1] for r in range(lo, hi + 1)])
        at = np.searchsorted(dup_rows, rows)
        dup = np.zeros(len(rows), bool)
        if len(dup_rows):
            dup = dup_rows[np.minimum(at, len(dup_rows) - 1)] == rows
        return dup, kept_rows[at[dup]]

    def __enter__(self) -> "_Duplicates":
        return self

    def __exit__(self, *exc) -> None:
        self.spill.close()


def _find_duplicates(file: str, rows: int, budget: Budget, dups: _Duplicates) -> int:
    """Pass over the candidates' pair ids in hash partitions (``Spill``), each searched exactly on
    its own (``_repeats``) → ``dups``; returns the number of partitions."""
    parts = budget.parts_for(rows)
    with Spill(parts, budget) as sp:
        for t in _batches(file, ["pair_id", "_row"]):
            t = t.filter(pc.is_valid(t["pair_id"]))
            sp.add("pairs", pa.table({"id": t["pair_id"], "row": t["_row"]}))
        for p in range(parts):
            dups.add(*_repeats(sp.read("pairs", p)))
    return parts


def _repeats(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Of a table (``id``, ``row``) holding every copy of its ids: the rows whose id occurs at a
    smaller row too, and that smallest row of their id — all with Arrow compute and numpy."""
    none = np.zeros(0, np.int64)
    if table.num_rows == 0:
        return none, none
    vc = pc.value_counts(table["id"])
    repeated = vc.field("values").filter(pc.greater(vc.field("counts"), 1))
    if len(repeated) == 0:
        return none, none
    sub = table.filter(pc.is_in(table["id"], value_set=repeated))
    sub = sub.take(pc.sort_indices(sub, [("id", "ascending"), ("row", "ascending")])).combine_chunks()
    ids, rows = sub["id"].chunk(0), sub["row"].to_numpy()
    n = len(rows)
    first = np.ones(n, bool)
    first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    return rows[~first], rows[start][~first]


def _record_id(name: str, rows) -> pa.Array:
    return pc.binary_join_element_wise(f"{name}:", pc.cast(rows, pa.string()), "")


def _record_ids(name: str, n: int, chunk: int = 65536) -> Ids:
    """``<file>:0`` … ``<file>:<n-1>``, generated a chunk at a time."""
    def chunks():
        for start in range(0, n, chunk):
            yield _record_id(name, pa.array(np.arange(start, min(n, start + chunk), dtype=np.int64)))

    return Ids(chunks, n)


def _write_outputs(file: str, dups: _Duplicates, name: str, stage: str, out: PairsOut, kept_uri: str) -> dict:
    """Pass 2: the candidates in record order → ``pairs``, ``errors`` (parse errors and duplicates,
    in record order), the dataset's labels, and the ids of the kept records (for the reconcile)."""
    writers = {"pairs": _RollingWriter(out.pairs, PAIRS_SCHEMA), "errors": _RollingWriter(out.errors, ERRORS_SCHEMA),
               "labels": _RollingWriter(out.labels, PREFERENCES_SCHEMA),
               "kept": _RollingWriter(kept_uri, pa.schema([("id", pa.string())]))}
    reasons: Counter = Counter()
    for t in _batches(file):
        dup, first = dups.of(t["_row"].to_numpy())
        gone = dup | t["_error"].is_valid().to_numpy(zero_copy_only=False)
        if gone.any():
            writers["errors"].write(_error_table(t.filter(pa.array(gone)), dup[gone], first, name, stage, reasons))
        good = t.filter(pa.array(~gone))
        writers["pairs"].write(good.select(PAIRS_SCHEMA.names))
        writers["kept"].write(pa.table({"id": _record_id(name, good["_row"])}))
        writers["labels"].write(_label_table(good.filter(pc.is_valid(good["_chosen_a"]))))
    for w in writers.values():
        w.close()
    return {"pairs": writers["pairs"].total, "errors": writers["errors"].total, "labels": writers["labels"].total,
            "reasons": dict(reasons)}


def _error_table(t: pa.Table, dup: np.ndarray, kept: np.ndarray, name: str, stage: str, reasons: Counter) -> pa.Table:
    """Error rows of one batch, in record order: a parse error as it was, a duplicate naming the
    row that is kept (``duplicate_error``)."""
    cols = t.select(["pair_id", "_row", "_error", "_detail"]).to_pydict()
    first = iter(kept.tolist())
    out = {"id": [], "reason": [], "detail": []}
    for pid, i, reason, detail, is_dup in zip(*cols.values(), dup.tolist()):
        if is_dup:
            e = duplicate_error(pid, next(first))
            reason, detail = e.reason, f"row {i}: {e.detail}"
        out["id"].append(f"{name}:{i}")
        out["reason"].append(reason)
        out["detail"].append(detail)
        reasons[reason] += 1
    return pa.table({"id": out["id"], "stage": [stage] * len(out["id"]), "reason": out["reason"],
                     "detail": out["detail"]}, schema=ERRORS_SCHEMA)


def _one_turn(texts: pa.Array) -> pa.Array:
    """Each text as a one-message list ``[{"role": "assistant", "content": text}]``."""
    n = len(texts)
    turns = pa.StructArray.from_arrays([pa.array(["assistant"] * n, pa.string()), texts], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), turns)


def _label_table(t: pa.Table) -> pa.Table:
    """The dataset's labels of chosen/rejected candidate rows, as ``human_row`` made them: the chosen
    answer is response_a when ``_chosen_a`` (``chosen_first``), else response_b."""
    t = t.combine_chunks()
    n = t.num_rows
    first = t["_chosen_a"].chunk(0) if n else pa.array([], pa.bool_())
    a, b = (t[c].chunk(0) if n else pa.array([], pa.string()) for c in ("response_a", "response_b"))
    return pa.table({
        "pair_id": t["pair_id"], "prompt_id": t["prompt_id"], "prompt": t["messages"],
        "chosen": _one_turn(pc.if_else(first, a, b)), "rejected": _one_turn(pc.if_else(first, b, a)),
        "p_chosen": pa.array(np.ones(n)),
        "principle_ids": pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())),
        "judge": pa.array(["dataset"] * n, pa.string()), "order_agreement": pa.nulls(n, pa.bool_()),
        "source": pa.array(["dataset"] * n, pa.string())}, schema=PREFERENCES_SCHEMA)

"""What every stage shares: its directory, the raw-row store that makes runs resumable,
the finalize pass (dedupe → route → reconcile), and the ``_SUCCESS`` marker.

A model stage streams its input through an engine actor pool and appends *raw rows* to
``<stage>/_raw/``. A raw row carries the stage's id column plus ``_error``/``_detail``
(``None`` for good rows) and optional ``_``-prefixed metrics. Ray may run a task twice
(at-least-once); ``finalize`` keeps the first copy of every id, splits good rows into the
stage's datasets and bad rows into ``errors``, checks ids(outputs) ∪ ids(errors) =
ids(inputs), and writes ``_SUCCESS`` last.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from workflows.core import storage
from workflows.core.errors import ConfigError, DataError
from workflows.core.reconcile import Ids, Reconciliation, as_ids, compare, raise_unless_ok
from workflows.core.spill import Budget, Spill, as_strings

SUCCESS = "_SUCCESS"
RAW = "_raw"
ROWS_PER_FILE = 100_000
ERRORS_SCHEMA = pa.schema([("id", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


@dataclass
class StageContext:
    """Where a stage reads and writes. ``inputs`` maps dataset names (``prompts``, ``sft``, ...)
    of earlier stages to their URIs."""

    run_dir: str
    name: str
    seed: int = 0
    inputs: dict[str, str] = field(default_factory=dict)
    config_hash: str = ""  # set by the driver; recorded in _SUCCESS
    budget: Budget = field(default_factory=Budget)  # the recipe's bookkeeping memory and spill directory

    @property
    def dir(self) -> str:
        return storage.join(self.run_dir, self.name)

    def path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    def resolve(self, name: str) -> str:
        """An earlier stage's output called ``name`` (e.g. ``sft_model``), else ``name`` itself (a
        path or model spec); local paths made absolute, since Ray workers run elsewhere."""
        ref = self.inputs.get(name, name)
        return os.path.abspath(ref) if not storage.is_remote(ref) and os.path.exists(ref) else ref

    def input(self, dataset: str) -> str:
        if dataset not in self.inputs:
            have = ", ".join(sorted(self.inputs)) or "none"
            raise ConfigError(f"stage {self.name}", f"needs the dataset {dataset!r}, which no earlier stage made "
                              f"(available: {have})", "add the stage that makes it earlier in the recipe, "
                              "or point this stage's input at an existing dataset directory")
        return self.inputs[dataset]


GOLD = "_gold"  # <stage>/_gold: the judge's labels of the human gold pairs and gold.json (the gold gate)


def _canonical(x):
    """Settings as they mean, not as they were typed: ``256`` and ``256.0`` are one setting."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _canonical(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_canonical(v) for v in x]
    return x


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(_canonical(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_success(stage_dir: str) -> dict | None:
    """The stage's ``_SUCCESS`` record, or None when the stage has not finished. A torn or garbled
    marker is a one-line error naming the file and the fix."""
    uri = storage.join(stage_dir, SUCCESS)
    if not storage.exists(uri):
        return None
    name = os.path.basename(stage_dir.rstrip("/"))
    fix = (f"delete it and run the same command again (the stage finishes again from the rows it saved), "
           f"or rerun with --restart-from {name}")
    info = storage.read_json(uri, fix)
    if not isinstance(info, dict) or "outputs" not in info or "config_hash" not in info:
        raise DataError(f"{uri} is not a stage's completion record (no outputs/config_hash): {fix}")
    return info


def write_success(stage_dir: str, info: dict) -> None:
    storage.write_json(storage.join(stage_dir, SUCCESS), info)


# ---------------------------------------------------------------- raw rows (resume)

def raw_files(stage_dir: str) -> list[str]:
    return storage.list_files(storage.join(stage_dir, RAW), ".parquet")


UNREADABLE = ".unreadable"


def set_aside(uri: str) -> None:
    """Rename a file that cannot be read (cut short by a killed run, corrupted on disk) to
    ``<name>.unreadable``: no reader lists it again, a person can still look at it, and the
    stage summary counts it (``unreadable_files``)."""
    fs, path = storage.resolve(uri)
    fs.move(path, path + UNREADABLE)


def unreadable_files(*uris: str) -> int:
    return sum(len(storage.list_files(u, UNREADABLE)) for u in uris)


def write_whole(table: pa.Table, fs, path: str) -> None:
    """Write a parquet file that appears whole or not at all: an S3 PUT already does; a local file
    is written under a temporary name and renamed."""
    import uuid

    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):
        pq.write_table(table, path, filesystem=fs)
        return
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def drop_done(table: pa.Table, id_col: str, done: pa.Array) -> pa.Table:
    """Rows of ``table`` whose id is not in ``done`` (used as a Ray Data batch filter)."""
    if len(done) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table[id_col], value_set=done)))


def ids_of(dataset_uri: str, id_col: str) -> list[str]:
    """A column as a Python list: for small datasets only (``ids_in`` streams)."""
    fs, path = storage.resolve(dataset_uri)
    return pq.read_table(path, columns=[id_col], filesystem=fs)[id_col].to_pylist()


def ids_in(dataset_uri: str, id_col: str, batch_size: int = 65536) -> Ids:
    """A dataset's id column as ``Ids``: streamed in Arrow chunks, its length from the footers."""
    files = storage.list_files(dataset_uri, ".parquet")

    def chunks():
        for f in files:
            fs, path = storage.resolve(f)
            for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=batch_size, columns=[id_col]):
                yield batch.column(0)

    return Ids(chunks, sum(num_rows(f) for f in files))


def column_counts(dataset_uri: str, col: str) -> dict:
    """{value: rows} of a low-cardinality column (a prompt's ``source``), streamed."""
    counts: Counter = Counter()
    for chunk in ids_in(dataset_uri, col).chunks():
        for item in pc.value_counts(chunk).to_pylist():
            counts[item["values"]] += item["counts"]
    return dict(counts)


# ---------------------------------------------------------------- finalize

class _RollingWriter:
    """Parquet part files under one dataset directory, rolling every ROWS_PER_FILE rows. No file
    holds an empty row group (readers that size batches by the first row group, like Hugging Face
    ``datasets``, fail on one); a dataset with no rows at all gets one file with the schema (given,
    else that of the first table written, else none) and no row group."""

    def __init__(self, uri: str, schema: pa.Schema | None = None):
        self.uri, self.part, self.rows, self.total, self.writer, self.schema = uri, 0, 0, 0, None, schema
        storage.delete(uri)

    def write(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        if table.num_rows == 0:
            return
        if self.writer is None or self.rows >= ROWS_PER_FILE:
            self._finish_part()
            path, fs = self._next_part()
            self.writer, self.rows = pq.ParquetWriter(path, self.schema, filesystem=fs), 0
        self.writer.write_table(table.cast(self.schema))
        self.rows += table.num_rows
        self.total += table.num_rows

    def _next_part(self) -> tuple[str, object]:
        fs, path = storage.resolve(storage.join(self.uri, f"part-{self.part:05d}.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self.part += 1
        return path, fs

    def _finish_part(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close(self) -> None:
        self._finish_part()
        if self.part == 0:  # no rows: still a loadable dataset
            path, fs = self._next_part()
            pq.ParquetWriter(path, self.schema or pa.schema([]), filesystem=fs).close()


Router = Callable[[pa.Table], dict[str, pa.Table]]


def select_route(name: str, schema: pa.Schema) -> Router:
    """The router of a stage with one dataset: good raw rows → ``name``, cut to ``schema``."""
    def route(good: pa.Table) -> dict[str, pa.Table]:
        return {name: good.select(schema.names).cast(schema)}

    route.schemas = {name: schema}
    return route


def write_rows(uri: str, rows: list[dict], schema: pa.Schema, chunk: int = 10_000) -> None:
    """``rows`` as a parquet dataset directory (replacing it); an empty one still gets a file."""
    writer = _RollingWriter(uri)
    for start in range(0, max(len(rows), 1), chunk):
        writer.write(pa.Table.from_pylist(rows[start:start + chunk], schema=schema))
    writer.close()


@dataclass
class Finalized:
    counts: dict[str, int]  # rows per dataset written (errors included)
    errors_by_reason: dict[str, int]
    metrics: dict[str, float]
    outputs: int  # good rows kept (first copies)
    errors: int  # error rows (duplicate errors included)
    rec: Reconciliation | None = None  # against the inputs, when finalize was given them
    skipped: int = 0  # rows the stage left out on purpose (``skip_reasons``), in ``skipped``
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


def finalize(stage_dir: str, stage: str, id_col: str, route: Router, datasets: Iterable[str],
             on_duplicate: str = "drop", inputs=None, budget: Budget = Budget(),
             skip_reasons: Iterable[str] = ()) -> Finalized:
    """Keep the first copy of each id (``on_duplicate="error"`` instead turns later copies into
    ``duplicate`` errors with id ``<id>@<_loc>``), check ids(good) ∪ ids(bad) = ``inputs`` exactly
    (when given: ``reconcile.Ids``, a list or an array; a mismatch raises ``ReconcileError`` before
    anything is written), then route good rows through ``route`` into the named datasets and bad
    rows into ``errors``. Two passes over the raw files: the first reads only the id and error
    columns into hash-partitioned spill files (``spill``: memory within ``budget``, whatever the
    row count) to find the copies and reconcile; the second streams whole rows to the writers.
    Rows set aside with one of ``skip_reasons`` (left out on purpose, by the recipe's own settings)
    go to ``skipped`` instead (the errors' columns), counted apart from errors; the reconciliation
    is then ids(good) ∪ ids(errors) ∪ ids(skipped) = ``inputs``."""
    files = raw_files(stage_dir)
    skip = pa.array(sorted(set(skip_reasons)), pa.string())
    drops, rec = _first_copies(files, id_col, inputs, budget)
    if rec is not None:
        raise_unless_ok(rec, stage)
    schemas = {**getattr(route, "schemas", {}), "errors": ERRORS_SCHEMA}
    writers = {name: _RollingWriter(storage.join(stage_dir, name), schemas.get(name)) for name in [*datasets, "errors"]}
    if len(skip):
        writers["skipped"] = _RollingWriter(storage.join(stage_dir, "skipped"), ERRORS_SCHEMA)
    reasons, skipped, metrics, n_out, n_err, n_skip = Counter(), Counter(), {}, 0, 0, 0
    for fi, uri in enumerate(tqdm(files, desc=f"{stage}: finalize", unit="file", leave=False)):
        fs, path = storage.resolve(uri)
        at = 0
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            gone = drops.get(fi)
            if gone is not None:
                rows = np.arange(at, at + table.num_rows)
                dup = np.isin(rows, gone)
                if on_duplicate == "error" and dup.any():
                    n_err += _duplicate_errors(writers["errors"], stage, table.filter(pa.array(dup)), id_col)
                    reasons["duplicate"] += int(dup.sum())
                table = table.filter(pa.array(~dup))
            at += batch.num_rows
            bad = pc.is_valid(table["_error"])
            good, errs = table.filter(pc.invert(bad)), table.filter(bad)
            if len(skip):
                left_out = pc.is_in(errs["_error"], value_set=skip)
                kept, errs = errs.filter(left_out), errs.filter(pc.invert(left_out))
                for item in pc.value_counts(kept["_error"]).to_pylist():
                    skipped[item["values"]] += item["counts"]
                _write_errors(writers["skipped"], stage, kept[id_col], kept["_error"], kept["_detail"])
                n_skip += kept.num_rows
            for col in table.column_names:
                numeric = pa.types.is_integer(table[col].type) or pa.types.is_floating(table[col].type)
                if col.startswith("_") and numeric:
                    metrics[col] = metrics.get(col, 0) + (pc.sum(table[col]).as_py() or 0)
            for item in pc.value_counts(errs["_error"]).to_pylist():
                reasons[item["values"]] += item["counts"]
            _write_errors(writers["errors"], stage, errs[id_col], errs["_error"], errs["_detail"])
            n_out, n_err = n_out + good.num_rows, n_err + errs.num_rows
            for name, part in route(good).items():
                writers[name].write(part)
    for w in writers.values():
        w.close()
    counts = {name: w.total for name, w in writers.items()}
    return Finalized(counts, dict(reasons), metrics, n_out, n_err, rec, n_skip, dict(skipped))


def _first_copies(files: list[str], id_col: str, inputs, budget: Budget) -> tuple[dict[int, np.ndarray], Reconciliation | None]:
    """Pass 1 of ``finalize``: {file index: rows that repeat an id seen earlier}, and the
    reconciliation of the first copies against ``inputs`` (None without inputs)."""
    inputs = as_ids(inputs) if inputs is not None else None
    rows = (inputs.rows if inputs is not None else 0) + sum(num_rows(f) for f in files)
    parts = budget.parts_for(rows)
    drops: dict[int, list] = {}
    total = Reconciliation(0, 0, 0) if inputs is not None else None
    with Spill(parts, budget) as sp:
        for fi, uri in enumerate(files):
            fs, path = storage.resolve(uri)
            at = 0
            for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=65536, columns=[id_col, "_error"]):
                n = batch.num_rows
                sp.add("raw", pa.table({"id": batch.column(id_col), "file": pa.array(np.full(n, fi, np.int32)),
                                        "row": pa.array(np.arange(at, at + n)), "bad": pc.is_valid(batch.column("_error"))}))
                at += n
        if inputs is not None:
            for chunk in inputs.chunks():
                sp.add("in", pa.table({"id": chunk}))
        for p in range(parts):
            raw = sp.read("raw", p)
            keep = _mark_copies(raw, drops)
            if total is not None:
                kept = raw.filter(keep)
                total.add(compare(sp.read("in", p)["id"].combine_chunks(),
                                  kept.filter(pc.invert(kept["bad"]))["id"].combine_chunks(),
                                  kept.filter(kept["bad"])["id"].combine_chunks()))
    return {fi: np.sort(np.asarray(r, np.int64)) for fi, r in drops.items()}, total


def _mark_copies(raw: pa.Table, drops: dict[int, list]) -> pa.Array:
    """Which rows of one partition are first copies (the earliest file, then row); later copies
    are added to ``drops``. Repeats are rare (a block saved twice), so they are sorted in Python."""
    vc = pc.value_counts(raw["id"])
    repeated = vc.field("values").filter(pc.greater(vc.field("counts"), 1))
    if len(repeated) == 0:
        return pa.array(np.ones(raw.num_rows, bool))
    where = pc.is_in(raw["id"], value_set=repeated)
    keep = np.ones(raw.num_rows, bool)
    first: dict[str, tuple] = {}
    idx = np.nonzero(where.to_numpy(zero_copy_only=False))[0]
    sub = raw.take(pa.array(idx)).select(["id", "file", "row"]).to_pydict()
    for i, rid, f, r in sorted(zip(idx, sub["id"], sub["file"], sub["row"]), key=lambda x: (x[1], x[2], x[3])):
        if rid in first:
            keep[i] = False
            drops.setdefault(f, []).append(r)
        else:
            first[rid] = (f, r)
    return pa.array(keep)


def num_rows(uri: str) -> int:
    """Rows of a parquet file, or of every file of a dataset directory, from the footers alone."""
    total = 0
    for f in storage.list_files(uri, ".parquet"):
        fs, path = storage.resolve(f)
        total += pq.read_metadata(path, filesystem=fs).num_rows
    return total


def _duplicate_errors(writer: "_RollingWriter", stage: str, dups: pa.Table, id_col: str) -> int:
    ids = dups[id_col].to_pylist()
    locs = dups["_loc"].to_pylist() if "_loc" in dups.column_names else ["?"] * len(ids)
    _write_errors(writer, stage, [f"{rid}@{loc}" for rid, loc in zip(ids, locs)], ["duplicate"] * len(ids),
                  [f"same content as {rid}" for rid in ids])
    return len(ids)


def _write_errors(writer: _RollingWriter, stage: str, ids, reasons, details) -> None:
    if len(ids):
        details = pc.fill_null(as_strings(details), "") if not isinstance(details, list) else [d or "" for d in details]
        writer.write(pa.table({"id": ids, "stage": pa.array([stage] * len(ids), pa.string()), "reason": reasons,
                               "detail": details}, schema=ERRORS_SCHEMA))


def reconcile_and_mark(ctx: StageContext, fin: Finalized, started: float, extra: dict | None = None) -> dict:
    """Write ``_SUCCESS`` (last) with counts and timings, for a stage that ``finalize`` reconciled
    against its inputs (``fin.rec``; without it, inputs = the rows it kept or set aside)."""
    inputs = fin.rec.inputs if fin.rec is not None else fin.outputs + fin.errors + fin.skipped
    info = {"stage": ctx.name, "inputs": inputs, "outputs": fin.outputs, "errors": fin.errors,
            "datasets": fin.counts, "errors_by_reason": fin.errors_by_reason, "metrics": fin.metrics,
            **({"skipped": fin.skipped, "skipped_by_reason": fin.skipped_by_reason} if fin.skipped else {}),
            "config_hash": ctx.config_hash, "seconds": round(time.time() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "unreadable_files": unreadable_files(ctx.dir),
            **(extra or {})}
    write_success(ctx.dir, info)
    return info

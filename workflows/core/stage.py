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
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from workflows.core import storage
from workflows.core.errors import ConfigError, DataError
from workflows.core.reconcile import check

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


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def done_ids(stage_dir: str, id_col: str) -> set[str]:
    """Ids already in readable raw files. A file that cannot be read is set aside
    (``set_aside``), and its rows are simply processed again."""
    ids: set[str] = set()
    for uri in raw_files(stage_dir):
        fs, path = storage.resolve(uri)
        try:
            ids.update(pq.read_table(path, columns=[id_col], filesystem=fs)[id_col].to_pylist())
        except (pa.ArrowInvalid, OSError):
            set_aside(uri)
    return ids


def drop_done(table: pa.Table, id_col: str, done: pa.Array) -> pa.Table:
    """Rows of ``table`` whose id is not in ``done`` (used as a Ray Data batch filter)."""
    if len(done) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table[id_col], value_set=done)))


def ids_of(dataset_uri: str, id_col: str) -> list[str]:
    fs, path = storage.resolve(dataset_uri)
    return pq.read_table(path, columns=[id_col], filesystem=fs)[id_col].to_pylist()


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
    counts: dict[str, int]
    errors_by_reason: dict[str, int]
    metrics: dict[str, float]
    error_ids: list[str]
    output_ids: list[str]


def finalize(stage_dir: str, stage: str, id_col: str, route: Router, datasets: Iterable[str],
             on_duplicate: str = "drop") -> Finalized:
    """Stream the raw rows once: keep the first copy of each id (``on_duplicate="error"``
    instead turns later copies into ``duplicate`` errors with id ``<id>@<_loc>``), route good
    rows through ``route`` into the named datasets, and bad rows into ``errors``."""
    schemas = {**getattr(route, "schemas", {}), "errors": ERRORS_SCHEMA}
    writers = {name: _RollingWriter(storage.join(stage_dir, name), schemas.get(name)) for name in [*datasets, "errors"]}
    seen: set[str] = set()
    out_ids, err_ids, reasons, metrics = [], [], {}, {}
    for uri in tqdm(raw_files(stage_dir), desc=f"{stage}: finalize", unit="file", leave=False):
        fs, path = storage.resolve(uri)
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=8192):
            table = pa.Table.from_batches([batch])
            ids = table[id_col].to_pylist()
            keep, dup_rows = [], []
            for i, rid in enumerate(ids):
                if rid in seen:
                    dup_rows.append(i)
                else:
                    seen.add(rid)
                    keep.append(i)
            if on_duplicate == "error" and dup_rows:
                dups = table.take(pa.array(dup_rows, pa.int64()))
                locs = dups["_loc"].to_pylist() if "_loc" in dups.column_names else ["?"] * len(dup_rows)
                dup_ids = [f"{rid}@{loc}" for rid, loc in zip(dups[id_col].to_pylist(), locs)]
                _write_errors(writers["errors"], stage, dup_ids, ["duplicate"] * len(dup_ids),
                              [f"same content as {rid}" for rid in dups[id_col].to_pylist()])
                err_ids += dup_ids
                reasons["duplicate"] = reasons.get("duplicate", 0) + len(dup_ids)
            table = table.take(pa.array(keep, pa.int64()))  # typed: an empty list would be null-typed
            bad = pc.is_valid(table["_error"])
            good, errs = table.filter(pc.invert(bad)), table.filter(bad)
            for col in table.column_names:
                numeric = pa.types.is_integer(table[col].type) or pa.types.is_floating(table[col].type)
                if col.startswith("_") and numeric:
                    metrics[col] = metrics.get(col, 0) + (pc.sum(table[col]).as_py() or 0)
            err_ids += errs[id_col].to_pylist()
            for r in errs["_error"].to_pylist():
                reasons[r] = reasons.get(r, 0) + 1
            _write_errors(writers["errors"], stage, errs[id_col].to_pylist(), errs["_error"].to_pylist(),
                          errs["_detail"].to_pylist())
            out_ids += good[id_col].to_pylist()
            for name, part in route(good).items():
                writers[name].write(part)
    for w in writers.values():
        w.close()
    counts = {name: w.total for name, w in writers.items()}
    return Finalized(counts, reasons, metrics, err_ids, out_ids)


def _write_errors(writer: _RollingWriter, stage: str, ids, reasons, details) -> None:
    if ids:
        writer.write(pa.table({"id": ids, "stage": [stage] * len(ids), "reason": reasons,
                               "detail": [d or "" for d in details]}, schema=ERRORS_SCHEMA))


def reconcile_and_mark(ctx: StageContext, input_ids: list[str], fin: Finalized, started: float,
                       extra: dict | None = None) -> dict:
    """Check nothing was lost, then write ``_SUCCESS`` (last) with counts and timings."""
    rec = check(ctx.name, input_ids, fin.output_ids, fin.error_ids)
    info = {"stage": ctx.name, "inputs": rec.inputs, "outputs": rec.outputs, "errors": rec.errors,
            "datasets": fin.counts, "errors_by_reason": fin.errors_by_reason, "metrics": fin.metrics,
            "config_hash": ctx.config_hash, "seconds": round(time.time() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "unreadable_files": unreadable_files(ctx.dir),
            **(extra or {})}
    write_success(ctx.dir, info)
    return info

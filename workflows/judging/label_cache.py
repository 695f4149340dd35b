"""A cache of judge outputs in the run's storage, so re-runs and resumed runs skip judgments
that were already paid for.

Layout: a directory (local path or ``s3://...``) of parquet shards, one row per judgment:
``key`` (``pairwise.cache_key``), ``p_a``, ``logp_a``, ``logp_b``, ``reasoning`` (CoT text
or null). Writes are append-only: every ``flush()`` writes a *new* uniquely named shard
(time + random suffix), so any number of actors can write at once without locks; local
shards are written under a temporary name and renamed, so readers never see half a file.
``load()`` reads every shard and merges them (shards in name order; for a key written
twice, the later shard wins — both values are valid judgments of the same input).

Usage in a stage: each actor builds ``LabelCache(join(run_dir, "label_cache"))`` once,
calls ``load()`` at stage start, ``get(key)`` before judging, ``put_many({key: value})``
after, and ``flush()`` at the end of each batch. Only successful judgments belong here:
a value with a non-finite ``p_a`` is rejected (a failure may be transient).

A shard that cannot be read (cut short, corrupted) is renamed ``*.unreadable`` on load and its
judgments are made again; the stage summary counts it.

Scaling limit: each actor holds the whole cache in memory and reads it once at start
(~100 bytes per entry plus CoT text), so entries written by other actors during the
stage are not seen until the next run, and many small shards slow ``load()``; call
``compact()`` between runs (never while writers run) to merge them into one shard.
"""
from __future__ import annotations

import math
import posixpath
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.stage import set_aside, write_whole

CACHE_SCHEMA = pa.schema([("key", pa.string()), ("p_a", pa.float64()), ("logp_a", pa.float64()),
                          ("logp_b", pa.float64()), ("reasoning", pa.string())])
_FIELDS = ("p_a", "logp_a", "logp_b", "reasoning")


def _value(key: str, value: dict) -> dict:
    if not isinstance(value, dict) or "p_a" not in value:
        raise ValueError(f"label cache value for {key!r} must be a dict with p_a, logp_a, logp_b[, reasoning]")
    if not math.isfinite(float(value["p_a"])):
        raise ValueError(f"label cache value for {key!r} has p_a={value['p_a']!r}: cache only successful judgments")
    return {"p_a": float(value["p_a"]), "logp_a": float(value.get("logp_a", math.nan)),
            "logp_b": float(value.get("logp_b", math.nan)), "reasoning": value.get("reasoning")}


class LabelCache:
    """cache_key → ``{"p_a", "logp_a", "logp_b", "reasoning"}`` stored under ``uri``."""

    def __init__(self, uri: str):
        self.uri = uri
        self._loaded: dict[str, dict] | None = None
        self._pending: dict[str, dict] = {}

    # ------------------------------------------------------------ reading
    def shards(self) -> list[str]:
        return storage.list_files(self.uri, ".parquet")

    def load(self) -> dict[str, dict]:
        """Read and merge every shard (once; later calls return the same dict)."""
        if self._loaded is None:
            merged: dict[str, dict] = {}
            for shard in self.shards():
                fs, path = storage.resolve(shard)
                try:
                    rows = pq.read_table(path, filesystem=fs, schema=CACHE_SCHEMA).to_pylist()
                except (pa.ArrowInvalid, OSError):  # cut short or corrupted: its judgments are made again
                    _set_aside(shard)
                    continue
                for row in rows:
                    merged[row["key"]] = {f: row[f] for f in _FIELDS}
            self._loaded = merged
        return self._loaded

    def get(self, key: str) -> dict | None:
        """The cached value (pending writes included), or None."""
        if key in self._pending:
            return self._pending[key]
        return self.load().get(key)

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        return len(self.load().keys() | self._pending.keys())

    # ------------------------------------------------------------ writing
    def put_many(self, values: dict[str, dict]) -> None:
        """Buffer new entries; nothing is written until ``flush()``."""
        self._pending.update({k: _value(k, v) for k, v in values.items()})

    def flush(self) -> str | None:
        """Write pending entries as one new shard; returns its URI (None if nothing pending)."""
        if not self._pending:
            return None
        rows = [{"key": k, **v} for k, v in self._pending.items()]
        name = f"shard-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        uri = storage.join(self.uri, name)
        _write(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), uri)
        if self._loaded is not None:
            self._loaded.update(self._pending)
        self._pending = {}
        return uri

    def compact(self) -> str | None:
        """Merge all shards into one and delete the old ones. Only when no writer runs."""
        old = self.shards()
        self._loaded = None
        merged = self.load()
        if len(old) <= 1:
            return old[0] if old else None
        self._pending, pending = dict(merged), self._pending
        uri = self.flush()
        self._pending = pending
        for shard in old:
            storage.delete(shard)
        return uri


def _set_aside(uri: str) -> None:
    try:
        set_aside(uri)
    except OSError:  # another actor set it aside first
        pass


def _write(table: pa.Table, uri: str) -> None:
    fs, path = storage.resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    write_whole(table, fs, path)

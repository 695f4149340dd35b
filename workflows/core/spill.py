"""Exact id bookkeeping in bounded memory: hash-partitioned spill files.

A stage's bookkeeping (finalize's first-copy dedupe, reconcile's outputs ∪ errors = inputs) needs
every id once. Held in Python sets that costs 250–350 bytes per id — 25–35 GB of driver memory at
100M rows. Here ids are streamed instead: every id goes, with a few fixed-width columns, to one of
``parts`` partitions chosen by a hash of its bytes (``partition_of``), written as Arrow IPC files
in a temporary directory. A partition then holds every copy of each of its ids, so each question
is answered exactly, one partition at a time, with Arrow compute (hash tables of one partition).
Memory is one partition's ids plus one batch, whatever the row count; the number of partitions
follows the memory budget (``parts_for``). With one partition (every small stage) nothing is
written to disk: the tables stay in memory.

Budget: ``Budget(memory_mb, spill_dir)`` — the recipe's ``bookkeeping`` block. ``BYTES_PER_ID`` is
the measured peak cost of one id while its partition is worked on (Arrow strings, the hash tables
of ``is_in``/``value_counts``; 172 bytes measured for 24-hex ids), with a margin. Small partitions
are also faster (their hash tables stay in cache): finalize of 1M pairs on one core ran at 350k
rows/s in one partition and 660–800k rows/s in 6–24, hence the small default (docs/scale.md).
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from workflows.core.typed import check_fields

BYTES_PER_ID = 200  # peak bytes per id while its partition is processed (docs/scale.md)
MAX_PARTS = 4096
_TAIL = 12  # bytes of the id's end that feed the hash (content-hash ids are uniform there; "<file>:<row>" ids too)


@dataclass(frozen=True)
class Budget:
    """How much memory the driver's bookkeeping may use, and where it spills beyond that
    (a local directory; None: the system's temporary directory)."""

    memory_mb: int = 64
    spill_dir: str | None = None

    def validate(self, where: str) -> None:
        check_fields(self, where, [("memory_mb", self.memory_mb < 16, "use 16 or more (megabytes of driver memory "
                                    "for a stage's id bookkeeping; more means fewer spill partitions)")])

    def parts_for(self, ids: int) -> int:
        """Partitions so that one partition's ids fit in the budget."""
        return max(1, min(MAX_PARTS, math.ceil(ids * BYTES_PER_ID / (self.memory_mb * 2**20))))


def as_strings(ids) -> pa.Array:
    """``ids`` (a list, an Arrow array or chunked array) as one plain string array."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks() if ids.num_chunks != 1 else ids.chunk(0)
    if not isinstance(ids, pa.Array):
        ids = pa.array(list(ids), pa.string())
    if not pa.types.is_string(ids.type):
        ids = ids.cast(pa.string())
    return ids


def partition_of(ids: pa.Array, parts: int) -> np.ndarray:
    """A stable partition number in [0, parts) for every id: an FNV-style hash of the id's last
    ``_TAIL`` bytes and its length, vectorised over Arrow's buffers (no Python per id)."""
    n = len(ids)
    if parts == 1 or n == 0:
        return np.zeros(n, np.int64)
    ids = as_strings(ids)
    offsets = np.frombuffer(ids.buffers()[1], np.int32, n + 1, ids.offset * 4)
    data = np.frombuffer(ids.buffers()[2], np.uint8) if ids.buffers()[2] is not None else np.zeros(1, np.uint8)
    start, end = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
    h = np.full(n, 0xCBF29CE484222325, np.uint64) ^ (end - start).astype(np.uint64)
    prime = np.uint64(0x100000001B3)
    with np.errstate(over="ignore"):
        for k in range(1, _TAIL + 1):
            at = end - k
            byte = np.where(at >= start, data[np.clip(at, 0, max(len(data) - 1, 0))], 0).astype(np.uint64)
            h = (h ^ byte) * prime
        h ^= h >> np.uint64(29)
    return (h % np.uint64(parts)).astype(np.int64)


def _allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files towards ``n`` (within the hard limit), as Ray
    does for its own processes; a limit that cannot be raised is left as it is."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < n:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard))
    except (ImportError, ValueError, OSError):
        pass


class Spill:
    """Tables of ids (column ``id`` plus fixed-width columns) by kind, split into ``parts`` hash
    partitions. ``add(kind, table)`` streams in; ``read(kind, p)`` gives one partition back.
    A context manager: the spill directory is removed on exit."""

    def __init__(self, parts: int, budget: Budget = Budget()):
        self.parts, self.budget = parts, budget
        self.dir = tempfile.mkdtemp(prefix="cai-spill-", dir=budget.spill_dir) if parts > 1 else None
        if parts > 1:
            _allow_open_files(3 * parts + 256)  # one writer per partition and kind
        self._mem: dict[str, list[pa.Table]] = {}
        self._writers: dict[tuple[str, int], pa.ipc.RecordBatchFileWriter] = {}
        self._schemas: dict[str, pa.Schema] = {}

    def add(self, kind: str, table: pa.Table, part: np.ndarray | None = None) -> None:
        """``table``'s rows to their partitions: by ``partition_of`` its ``id`` column (the first),
        or by ``part`` (one partition number per row) when the caller chooses them."""
        if table.num_rows == 0:
            self._schemas.setdefault(kind, table.schema)
            return
        table = table.set_column(0, "id", as_strings(table.column(0)))
        self._schemas.setdefault(kind, table.schema)
        if self.parts == 1:
            self._mem.setdefault(kind, []).append(table)
            return
        if part is None:
            part = partition_of(table["id"].chunk(0) if table["id"].num_chunks == 1 else table["id"], self.parts)
        order = np.argsort(part, kind="stable")
        sizes = np.bincount(part, minlength=self.parts)
        table = table.take(pa.array(order))
        at = 0
        for p in np.nonzero(sizes)[0]:
            n = int(sizes[p])
            self._writer(kind, int(p), table.schema).write_table(table.slice(at, n))
            at += n

    def _writer(self, kind: str, p: int, schema: pa.Schema) -> pa.ipc.RecordBatchFileWriter:
        key = (kind, p)
        if key not in self._writers:
            self._writers[key] = pa.ipc.new_file(f"{self.dir}/{kind}-{p:04d}.arrow", schema)
        return self._writers[key]

    def read(self, kind: str, p: int) -> pa.Table:
        """Partition ``p`` of ``kind`` (an empty table with the kind's schema when it has none)."""
        schema = self._schemas.get(kind, pa.schema([("id", pa.string())]))
        if self.parts == 1:
            return pa.concat_tables(self._mem.get(kind, [])) if self._mem.get(kind) else schema.empty_table()
        w = self._writers.pop((kind, p), None)
        if w is None:
            return schema.empty_table()
        w.close()
        with pa.OSFile(f"{self.dir}/{kind}-{p:04d}.arrow") as src:
            table = pa.ipc.open_file(src).read_all()
        return table.combine_chunks()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers, self._mem = {}, {}
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

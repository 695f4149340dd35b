"""The label cache's files under its URI (local path or ``s3://``), named relative to it: listing,
sorted-run writing and row-group reads (exact ranges, several at once on S3), and set-aside of
files that cannot be read. ``label_cache`` describes the layout; ``label_keys`` the rows.

A run (``runs/*.ipc``) is a sequence of Arrow IPC record-batch messages (each as a stream writer
writes it, without the schema, which readers know) and a trailing index. Each row group (at most
``ROW_GROUP`` rows, never across partitions) is two messages: its keys and numbers (``NUMBERS``,
uncompressed: random keys gain nothing) then its ``reasoning`` (zstd). The index holds, per row
group, its first ``k0`` and the offsets of its two messages (24 bytes, little-endian uint64s);
the last 24 bytes are the index's offset, the number of row groups and ``RUN_MAGIC``. A reader
keeps the index only (24 bytes per row group, not a parquet footer's ~3 KB) and reads a row
group's numbers message alone, or both when it wants ``reasoning``. Runs written as parquet
(``runs/*.parquet``, by earlier versions, with ``k0`` statistics) are still read through their
footers; compaction rewrites them as IPC runs."""
from __future__ import annotations

import contextlib
import io
import json
import posixpath
import struct
from array import array
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.stage import set_aside
from workflows.judging import label_keys as lk

CURRENT, DELTA, RUNS, MANIFESTS, LEGACY = "CURRENT", "delta/", "runs/", "manifests/", "shard-"
ROW_GROUP = 1024  # most rows in a row group of a run (never across partitions): what one key's lookup reads
UNREADABLE = (pa.ArrowInvalid, OSError)  # catch FileNotFoundError (an OSError) before it
# keys and numbers are random: compressing them gains nothing and costs a decoder per column chunk read
COMPRESSION = {f.name: "zstd" if f.name == "reasoning" else "none" for f in lk.SCHEMA}
_S3_READS = 16  # row-group reads in flight per file on S3 (latency-bound)
RUN_EXT, PARQUET_RUN = ".ipc", ".parquet"  # runs written now; runs written by earlier versions
RUN_MAGIC = b"LCRUN001"
NUMBERS = pa.schema([f for f in lk.SCHEMA if f.name != "reasoning"])  # a row group's first message
TEXT = pa.schema([lk.SCHEMA.field("reasoning")])                        # and its second
_TRAILER = struct.Struct("<QQ8s")  # index offset, row groups, RUN_MAGIC
_PLAIN, _ZSTD = pa.ipc.IpcWriteOptions(), pa.ipc.IpcWriteOptions(compression="zstd")


class RunIndex:
    """What a reader keeps of a run: per row group its first ``k0`` (``lo``); of a parquet run its
    metadata and last ``k0`` (``hi``) too; of an IPC run the offsets of its messages (``at``: the
    numbers message, one more: the index's; ``text``: the reasoning message)."""
    __slots__ = ("at", "hi", "lo", "meta", "text")

    def __init__(self, lo, hi=None, meta=None, at=None, text=None):
        self.lo, self.hi, self.meta, self.at, self.text = lo, hi, meta, at, text

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.lo, self.hi, self.at, self.text) if a is not None)

    def groups(self, q0: np.ndarray) -> list[int]:
        """The row groups whose k0 range can hold each query ``k0``, sorted."""
        if self.hi is not None:
            first, stop = np.searchsorted(self.hi, q0, "left"), np.searchsorted(self.lo, q0, "right")
        else:  # a group's keys are ≥ its first k0 and ≤ the next group's
            stop = np.searchsorted(self.lo, q0, "right")
            first = np.maximum(np.searchsorted(self.lo, q0, "left") - 1, 0)
        groups = set(first[stop - first == 1].tolist())
        for i in np.flatnonzero(stop - first > 1):  # a key at a row-group boundary
            groups.update(range(first[i], stop[i]))
        return sorted(groups)

    def in_partitions(self, lo: int, hi: int) -> np.ndarray:
        """The row groups of partitions lo..hi-1."""
        last = lk.partition_of(self.hi if self.hi is not None else self.lo)
        return np.flatnonzero((last >= lo) & (lk.partition_of(self.lo) < hi))


def _message(batch: pa.RecordBatch, options) -> pa.Buffer:
    """``batch`` as one encapsulated IPC message (``RecordBatch.serialize`` cannot compress)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)
        end = sink.tell()
    buf = sink.getvalue()
    reader = pa.BufferReader(buf)
    pa.ipc.read_message(reader)  # the schema message: left out
    return buf.slice(reader.tell(), end - reader.tell())


class Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = storage.resolve(uri)
        self.remote = storage.is_remote(uri)

    def path(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def uri_of(self, name: str) -> str:
        return storage.join(self.uri, *name.split("/"))

    # ------------------------------------------------------------ manifests
    def fresh(self) -> None:
        """Forget listings and sizes s3fs cached: other processes add, replace and delete files."""
        handler = getattr(self.fs, "handler", None)
        if isinstance(handler, pafs.FSSpecHandler):
            handler.fs.invalidate_cache()

    def gen(self) -> int:
        """The generation ``CURRENT`` names. Without one (a compaction died before writing it; or
        it is garbled, and set aside), the newest manifest: each is written once its runs are
        whole. 0: nothing compacted yet."""
        self.fresh()
        try:
            with self.fs.open_input_stream(self.path(CURRENT)) as f:
                return int(json.loads(f.read().decode())["gen"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):
            self.set_aside(CURRENT)
        return max((int(n[len(MANIFESTS):-5]) for n, _ in self.listing(MANIFESTS, ".json")), default=0)

    def manifest(self, gen: int) -> dict:
        """Generation ``gen``: its ``runs`` (oldest first; name, rows, bytes), the files it ``folded``
        and the ``deltas`` its readers skip (folded by it or by the one before)."""
        if gen == 0:
            return {"gen": 0, "runs": [], "folded": [], "deltas": []}
        with self.fs.open_input_stream(self.path(f"{MANIFESTS}{gen:06d}.json")) as f:
            return json.loads(f.read().decode())

    def write_json(self, obj: dict, name: str) -> None:
        storage.write_bytes(self.uri_of(name), json.dumps(obj, sort_keys=True).encode())

    def listing(self, prefix: str, suffix: str | tuple[str, ...] = ".parquet") -> list[tuple[str, int]]:
        """(name, bytes) of the files ``prefix*suffix`` directly in the prefix's folder, sorted."""
        folder, start = posixpath.split(self.path(prefix))
        self.fresh()
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return sorted((posixpath.join(posixpath.dirname(prefix), i.base_name), i.size) for i in infos
                      if i.type == pafs.FileType.File and i.base_name.startswith(start)
                      and i.base_name.endswith(suffix))

    # ------------------------------------------------------------ reading
    def open(self, name: str):
        """A random-access file; on S3 each read fetches exactly its range (s3fs would read 50 MB ahead)."""
        handler = getattr(self.fs, "handler", None)
        if isinstance(handler, pafs.FSSpecHandler):
            return pa.PythonFile(handler.fs.open(self.path(name), "rb", cache_type="none"), mode="r")
        return self.fs.open_input_file(self.path(name))

    def index(self, name: str) -> RunIndex:
        """A run's index: its trailer, or a parquet run's footer. Raises ``pa.ArrowInvalid`` when
        it is cut short or garbled."""
        with self.open(name) as f:
            if name.endswith(PARQUET_RUN):
                meta = pq.read_metadata(f)
                stats = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
                return RunIndex(np.array([s.min for s in stats], np.uint64),
                                np.array([s.max for s in stats], np.uint64), meta)
            size = f.size()
            if size < _TRAILER.size:
                raise pa.ArrowInvalid(f"label cache run {name}: {size} bytes, no index")
            start, n, magic = _TRAILER.unpack(f.read_at(_TRAILER.size, size - _TRAILER.size))
            if magic != RUN_MAGIC or start + 24 * n + _TRAILER.size != size:
                raise pa.ArrowInvalid(f"label cache run {name}: no index (cut short or not a run)")
            idx = np.frombuffer(f.read_at(24 * n, start), "<u8").reshape(n, 3)
        return RunIndex(idx[:, 0].copy(), at=np.append(idx[:, 1], np.uint64(start)), text=idx[:, 2].copy())

    def read_groups(self, name: str, index: RunIndex, groups: list[int], columns: list[str]) -> pa.Table:
        """Row groups ``groups`` of a run, the columns ``columns``; on S3 in chunks read at once
        (each read waits on the network). Of an IPC run, a group's numbers message alone unless
        ``reasoning`` is wanted; adjacent groups' messages in one read."""
        if index.meta is not None:
            def read(chunk):
                with self.open(name) as f:
                    return pq.ParquetFile(f, metadata=index.meta, pre_buffer=self.remote).read_row_groups(
                        chunk, columns=columns, use_threads=False)
        else:
            text, schema = "reasoning" in columns, pa.schema([lk.SCHEMA.field(c) for c in columns])

            def read(chunk):
                batches = []
                with self.open(name) as f:
                    for run in np.split(chunk, np.flatnonzero(np.diff(chunk) != 1) + 1) if text else chunk[:, None]:
                        start = int(index.at[run[0]])
                        end = int(index.at[run[-1] + 1]) if text else int(index.text[run[0]])
                        f.seek(start)
                        buf = f.read_buffer(end - start)  # in Arrow's memory, not Python's
                        for g in run.tolist():
                            at, mid, nxt = (int(index.at[g]) - start, int(index.text[g]) - start,
                                            int(index.at[g + 1]) - start)
                            nums = pa.ipc.read_record_batch(buf.slice(at, mid - at), NUMBERS)
                            cols = {c: nums.column(c) for c in columns if c != "reasoning"}
                            if text:
                                cols["reasoning"] = pa.ipc.read_record_batch(buf.slice(mid, nxt - mid), TEXT).column(0)
                            batches.append(pa.RecordBatch.from_arrays([cols[c] for c in columns], schema=schema))
                return pa.Table.from_batches(batches, schema)
        groups = np.asarray(groups, np.int64)
        if not self.remote or len(groups) <= 4:
            return read(groups)
        chunks = np.array_split(groups, min(_S3_READS, len(groups)))
        with ThreadPoolExecutor(len(chunks)) as pool:
            return pa.concat_tables(pool.map(read, chunks))

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """A whole delta or legacy shard in ``SCHEMA`` (the key columns and ``columns``), or None: it
        cannot be read and is set aside. A missing file raises ``FileNotFoundError``."""
        legacy = posixpath.basename(name).startswith(LEGACY)
        want = ["k0", "k1", *(columns if columns is not None else lk.FIELDS)]
        try:
            table = pq.read_table(self.path(name), filesystem=self.fs, schema=lk.LEGACY_SCHEMA if legacy else lk.SCHEMA,
                                  columns=None if legacy else want)
        except FileNotFoundError:
            raise
        except UNREADABLE:
            self.set_aside(name)
            return None
        return (lk.from_legacy(table) if legacy else table).select(want)

    def batches(self, name: str):
        """A delta's or legacy shard's rows in ``SCHEMA``, a bounded batch at a time (a legacy shard
        may hold a whole old cache)."""
        legacy = posixpath.basename(name).startswith(LEGACY)
        schema = lk.LEGACY_SCHEMA if legacy else lk.SCHEMA
        with self.open(name) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65_536):
                t = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                yield lk.from_legacy(t) if legacy else t

    # ------------------------------------------------------------ writing
    def write(self, table: pa.Table, name: str) -> None:
        """A delta (sorted rows) as one parquet file that appears whole."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=COMPRESSION, use_dictionary=["reasoning"], write_statistics=["k0"])
        storage.write_bytes(self.uri_of(name), buf.getvalue())

    @contextlib.contextmanager
    def run_writer(self, name: str):
        """Yields ``write(sorted table)`` appending to an IPC run (``name`` ends in ``RUN_EXT``),
        each partition in row groups of its own; the index is written when the body ends. A run
        is only read once a manifest names it, so a run cut short is never read."""
        self.fs.create_dir(posixpath.dirname(self.path(name)), recursive=True)
        index, pos = array("Q"), 0
        with self.fs.open_output_stream(self.path(name)) as out:
            def write(table: pa.Table) -> None:
                nonlocal pos
                if table.num_rows == 0:
                    return
                k0 = table["k0"].to_numpy()
                edges = np.flatnonzero(np.diff(lk.partition_of(k0))) + 1
                for lo, hi in zip([0, *edges.tolist()], [*edges.tolist(), table.num_rows]):
                    for at in range(lo, hi, ROW_GROUP):
                        part = table.slice(at, min(ROW_GROUP, hi - at))
                        nums = _message(pa.record_batch([part[c].combine_chunks() for c in NUMBERS.names],
                                                        schema=NUMBERS), _PLAIN)
                        text = _message(pa.record_batch([part["reasoning"].combine_chunks()], schema=TEXT), _ZSTD)
                        out.write(nums)
                        out.write(text)
                        index.extend((int(k0[at]), pos, pos + nums.size))
                        pos += nums.size + text.size
            yield write
            out.write(np.frombuffer(index, np.uint64).astype("<u8").tobytes())
            out.write(_TRAILER.pack(pos, len(index) // 3, RUN_MAGIC))

    def size(self, name: str) -> int:
        return self.fs.get_file_info(self.path(name)).size

    def delete(self, name: str) -> None:
        storage.delete(self.uri_of(name))

    def set_aside(self, name: str) -> None:
        try:
            set_aside(self.uri_of(name))
        except OSError:  # another actor set it aside first
            pass

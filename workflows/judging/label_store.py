"""The label cache's files under its URI (local path or ``s3://``), named relative to it: listing,
sorted-run writing and row-group reads (exact ranges, several at once on S3), and set-aside of
files that cannot be read. ``label_cache`` describes the layout; ``label_keys`` the rows."""
from __future__ import annotations

import contextlib
import io
import json
import posixpath
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

    def listing(self, prefix: str, suffix: str = ".parquet") -> list[tuple[str, int]]:
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

    def footer(self, name: str) -> tuple:
        """A run's (metadata, k0 min, k0 max per row group)."""
        with self.open(name) as f:
            meta = pq.read_metadata(f)
        stats = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
        return meta, np.array([s.min for s in stats], np.uint64), np.array([s.max for s in stats], np.uint64)

    def read_groups(self, name: str, meta, groups: list[int], columns: list[str]) -> pa.Table:
        """Row groups ``groups`` of a run; on S3 in chunks read at once (each read waits on the network)."""
        def read(chunk):
            with self.open(name) as f:
                return pq.ParquetFile(f, metadata=meta, pre_buffer=self.remote).read_row_groups(
                    chunk, columns=columns, use_threads=False)
        if not self.remote or len(groups) <= 4:
            return read(groups)
        chunks = [c.tolist() for c in np.array_split(np.array(groups), min(_S3_READS, len(groups)))]
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
        """Yields ``write(sorted table)`` appending to a run, each partition in row groups of its own.
        A run is only read once a manifest names it, so a run cut short is never read."""
        self.fs.create_dir(posixpath.dirname(self.path(name)), recursive=True)
        with pq.ParquetWriter(self.path(name), lk.SCHEMA, filesystem=self.fs, compression=COMPRESSION,
                              use_dictionary=["reasoning"], write_statistics=["k0"]) as writer:
            def write(table: pa.Table) -> None:
                if table.num_rows == 0:
                    return
                parts = lk.partition_of(table["k0"].to_numpy())
                edges = np.flatnonzero(np.diff(parts)) + 1
                for lo, hi in zip([0, *edges.tolist()], [*edges.tolist(), table.num_rows]):
                    writer.write_table(table.slice(lo, hi - lo), row_group_size=ROW_GROUP)
            yield write

    def size(self, name: str) -> int:
        return self.fs.get_file_info(self.path(name)).size

    def delete(self, name: str) -> None:
        storage.delete(self.uri_of(name))

    def set_aside(self, name: str) -> None:
        try:
            set_aside(self.uri_of(name))
        except OSError:  # another actor set it aside first
            pass

"""Resume that costs only the work left: a stage's input is cut into numbered blocks of fixed
row ranges, and a block is done when a raw file named after it exists.

``Plan`` (``<stage>/_raw/_plan.json``, written when the stage first starts) fixes the block size
and the input's row count, so block k is always input rows [k·B, (k+1)·B). An actor that finishes
a block writes its raw rows whole as ``b<k>-<uuid>.parquet`` (``raw_name``). Resuming lists those
names (reading each file's footer, never its rows), and only the blocks without one are sent to
the actors, which read just their own rows (``InputIndex.read``: the parquet row groups that
overlap the range). Nothing proportional to the rows already done is held or filtered: a stage
killed at 50 % reads half its input again, not all of it, and redoes at most the blocks its
actors were working on when it was killed.

Run directories made before blocks were numbered (raw files named ``<uuid>.parquet``) still
resume: the ids in those files are filtered out of every block (the old, slower way), once.
"""
from __future__ import annotations

import re
import uuid
from bisect import bisect_right
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.errors import DataError

PLAN = "_plan.json"
_BLOCK_FILE = re.compile(r"(?:^|/)b(\d{9})-[0-9a-f]{32}\.parquet$")


def raw_name(block: int) -> str:
    return f"b{block:09d}-{uuid.uuid4().hex}.parquet"


def block_of(uri: str) -> int | None:
    """The block number in a raw file's name; None for files of the old, unnumbered layout."""
    m = _BLOCK_FILE.search(uri)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Plan:
    rows: int  # input rows when the stage started
    block_rows: int

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    def span(self, block: int) -> tuple[int, int]:
        return block * self.block_rows, min((block + 1) * self.block_rows, self.rows)


def load_plan(raw_dir: str, rows: int, block_rows: int, stage: str) -> Plan:
    """The stage's block plan: the recorded one when resuming (a changed input is a one-line
    error), else ``Plan(rows, block_rows)``, recorded now."""
    uri = storage.join(raw_dir, PLAN)
    if storage.exists(uri):
        plan = Plan(**storage.read_json(uri, f"delete {uri} and the raw files beside it, or rerun with "
                                        f"--restart-from {stage}"))
        if plan.rows != rows:
            raise DataError(f"stage {stage}: its input has {rows} rows now but had {plan.rows} when the stage "
                            f"started — rerun with --restart-from {stage} to start it again on the new input")
        return plan
    plan = Plan(rows, max(1, block_rows))
    storage.makedirs(raw_dir)
    storage.write_json(uri, asdict(plan))
    return plan


@dataclass(frozen=True)
class InputIndex:
    """Where every input row lives: the dataset's filesystem (resolved on the driver: it carries
    the S3 endpoint and region, never credentials — see ``storage``), its files' paths and their row
    groups' sizes (from the parquet footers). Small: one integer per row group. Sent to the
    actors, which read blocks."""

    fs: object
    files: tuple[str, ...]  # paths inside ``fs``
    groups: tuple[tuple[int, ...], ...]  # rows per row group, per file

    @property
    def rows(self) -> int:
        return sum(sum(g) for g in self.groups)

    def read(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Input rows [start, stop), reading only the row groups that hold them."""
        parts, at = [], 0
        for path, groups in zip(self.files, self.groups):
            ends, total = [], at
            for n in groups:
                total += n
                ends.append(total)
            if total > max(start, at) and at < stop:
                first = bisect_right(ends, start)
                last = min(bisect_right(ends, stop - 1), len(groups) - 1)
                t = pq.ParquetFile(path, filesystem=self.fs).read_row_groups(list(range(first, last + 1)), columns=columns)
                begin = ends[first] - groups[first]
                parts.append(t.slice(max(start - begin, 0), stop - max(start, begin)))
            at = total
            if at >= stop:
                break
        return pa.concat_tables(parts) if parts else pa.table({})


def input_index(uri: str) -> InputIndex:
    fs, _ = storage.resolve(uri)
    paths, groups = [], []
    for f in storage.list_files(uri, ".parquet"):
        path = storage.resolve(f)[1]
        meta = pq.read_metadata(path, filesystem=fs)
        paths.append(path)
        groups.append(tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
    return InputIndex(fs, tuple(paths), tuple(groups))


def _readable(uri: str) -> bool:
    fs, path = storage.resolve(uri)
    try:
        pq.read_metadata(path, filesystem=fs)
        return True
    except (pa.ArrowInvalid, OSError):
        return False


def done_blocks(raw_files: list[str], set_aside) -> tuple[set[int], list[str]]:
    """(numbers of the blocks with a readable raw file, raw files of the old unnumbered layout).
    Only footers are read, 16 at a time (on S3 each is a request); a file whose footer cannot be
    read is set aside (``set_aside``) and its block is done again."""
    from concurrent.futures import ThreadPoolExecutor

    done, legacy = set(), []
    with ThreadPoolExecutor(16) as ex:
        readable = list(ex.map(_readable, raw_files))
    for uri, ok in zip(raw_files, readable):
        if not ok:
            set_aside(uri)
            continue
        k = block_of(uri)
        if k is None:
            legacy.append(uri)
        else:
            done.add(k)
    return done, legacy


def any_in(uri: str, id_col: str, ids: pa.Array) -> bool:
    """Whether any row of the dataset at ``uri`` has one of ``ids`` (streamed)."""
    import pyarrow.compute as pc

    for f in storage.list_files(uri, ".parquet"):
        fs, path = storage.resolve(f)
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=65536, columns=[id_col]):
            if pc.any(pc.is_in(batch.column(0), value_set=ids)).as_py():
                return True
    return False


def legacy_ids(files: list[str], id_col: str) -> pa.Array:
    """The ids in raw files of the old layout (a run directory from before numbered blocks)."""
    chunks = []
    for uri in files:
        fs, path = storage.resolve(uri)
        chunks.append(pq.read_table(path, columns=[id_col], filesystem=fs)[id_col].combine_chunks())
    return pa.concat_arrays(chunks).unique() if chunks else pa.array([], pa.string())

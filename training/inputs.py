"""A training job's input rows, read on the driver: the train rows (a pyarrow table for an input
up to ``IN_MEMORY_INPUT_BYTES``, else a Ray Dataset that Ray Train splits across the workers) and
the held-out rows (``eval_fraction``, chosen by a hash of the row id)."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from training.data import is_eval
from workflows.core import stage, storage
from workflows.core.errors import DataError


def _drop_eval(table: pa.Table, id_col: str, fraction: float, seed: int) -> pa.Table:
    return table.filter(pa.array([not is_eval(i, fraction, seed) for i in table[id_col].to_pylist()], pa.bool_()))


# Inputs up to this size are read once by the driver and reach the workers as one object in
# Ray's object store; each worker takes its own slice. A Ray Dataset — read tasks, a split
# coordinator, a dataset manager — first starts worker processes for them, which took 10–20 s
# of a small job's minute on a 2-core machine. Bigger inputs are read by Ray Data across the cluster.
IN_MEMORY_INPUT_BYTES = 256 << 20


def input_bytes(fs, path: str) -> int:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return info.size or 0
    return sum(f.size or 0 for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
               if f.type == pafs.FileType.File)


def _read_error(uri: str, id_col: str, e: Exception) -> DataError:
    return DataError(f"{uri}: cannot read the id column {id_col!r} ({e}) — point `input` at a parquet "
                     f"dataset with a {id_col!r} column (the output of an earlier stage)")


def input_datasets(uri: str, id_col: str, eval_fraction: float, seed: int) -> tuple:
    """``(train rows, held-out rows as a pyarrow table or None, row counts)``. The train rows are
    a pyarrow table for an input up to ``IN_MEMORY_INPUT_BYTES`` (every worker gets it whole and
    takes its own slice, ``load_items``), else a Ray Dataset that Ray Train splits across workers."""
    import ray

    fs, path = storage.resolve(uri)
    try:
        if input_bytes(fs, path) <= IN_MEMORY_INPUT_BYTES:
            table = pq.read_table(path, filesystem=fs)
            ids = table.column(id_col).to_pylist()
        else:
            table, ids = None, stage.ids_of(uri, id_col)
    except (pa.ArrowInvalid, KeyError, OSError) as e:
        raise _read_error(uri, id_col, e) from e
    held = [is_eval(i, eval_fraction, seed) for i in ids]
    rows = {"input": len(ids), "train": len(ids) - sum(held), "eval": sum(held)}
    if table is not None:
        mask = pa.array(held, pa.bool_())
        return table.filter(pc.invert(mask)), (table.filter(mask) if any(held) else None), rows
    train, held_out = ray.data.read_parquet(path, filesystem=fs), None
    if any(held):
        train = train.map_batches(_drop_eval, batch_format="pyarrow",
                                  fn_kwargs=dict(id_col=id_col, fraction=eval_fraction, seed=seed))
        eval_ids = [i for i, h in zip(ids, held) if h]
        held_out = pq.read_table(path, filesystem=fs, filters=pc.field(id_col).isin(eval_ids))
    return train, held_out, rows

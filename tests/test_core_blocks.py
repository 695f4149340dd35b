"""Resume by numbered blocks: a block's rows are read from the row groups that hold them, the plan
is fixed when a stage starts, and done blocks are known from raw file names and footers alone."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core import blocks, stage
from workflows.core.errors import DataError


def dataset(tmp_path, sizes, group):
    """Parquet files of consecutive integer rows (``n``), ``sizes`` rows each, row groups of ``group``."""
    d = tmp_path / "in"
    d.mkdir()
    at = 0
    for i, size in enumerate(sizes):
        pq.write_table(pa.table({"n": pa.array(range(at, at + size), pa.int64())}), d / f"part-{i:05d}.parquet", row_group_size=group)
        at += size
    return str(d)


@pytest.mark.parametrize("span", [(0, 7), (5, 12), (9, 10), (0, 25), (23, 25), (10, 20), (14, 15)])
def test_read_gives_exactly_the_rows_of_a_span(tmp_path, span):
    index = blocks.input_index(dataset(tmp_path, [10, 0, 15], group=4))
    assert index.rows == 25 and index.groups[0] == (4, 4, 2)
    assert index.read(*span)["n"].to_pylist() == list(range(*span))


def test_read_opens_only_the_row_groups_it_needs(tmp_path, monkeypatch):
    index = blocks.input_index(dataset(tmp_path, [1000, 1000], group=100))
    asked = []
    real = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups",
                        lambda self, groups, **kw: asked.append(list(groups)) or real(self, groups, **kw))
    assert index.read(1150, 1250)["n"].to_pylist() == list(range(1150, 1250))
    assert asked == [[1, 2]]  # two row groups of the second file, nothing of the first


def test_plan_is_fixed_when_the_stage_starts(tmp_path):
    raw = str(tmp_path / "_raw")
    plan = blocks.load_plan(raw, rows=1000, block_rows=64, stage="s")
    assert (plan.blocks, plan.span(15)) == (16, (960, 1000))
    assert blocks.load_plan(raw, rows=1000, block_rows=8, stage="s") == plan  # resumed with other settings: same blocks
    with pytest.raises(DataError, match=r"stage s: its input has 999 rows now but had 1000 .* --restart-from s"):
        blocks.load_plan(raw, rows=999, block_rows=64, stage="s")


def test_done_blocks_from_names_and_footers(tmp_path):
    raw = tmp_path / "_raw"
    raw.mkdir()
    t = pa.table({"id": ["a", "b"]})
    for k in (0, 3):
        pq.write_table(t, raw / blocks.raw_name(k))
    torn = raw / blocks.raw_name(5)
    torn.write_bytes(b"PAR1 cut short")
    pq.write_table(pa.table({"id": ["old1", "old2"]}), raw / "0123abcd.parquet")  # an earlier version's layout
    done, legacy = blocks.done_blocks(stage.raw_files(str(tmp_path)), stage.set_aside)
    assert done == {0, 3} and [u.rsplit("/", 1)[1] for u in legacy] == ["0123abcd.parquet"]
    assert (raw / (torn.name + stage.UNREADABLE)).exists() and not torn.exists()
    assert sorted(blocks.legacy_ids(legacy, "id").to_pylist()) == ["old1", "old2"]

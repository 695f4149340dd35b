import pytest

from workflows.core.reconcile import ReconcileError, check, reconcile


def test_clean_split():
    rec = reconcile(["a", "b", "c"], ["a", "c"], ["b"])
    assert rec.ok and (rec.inputs, rec.outputs, rec.errors) == (3, 2, 1)


@pytest.mark.parametrize("outputs, errors, attr, ids", [
    (["a"], [], "missing", ["b"]),
    (["a", "b", "z"], [], "unexpected", ["z"]),
    (["a", "b"], ["b"], "both", ["b"]),
    (["a", "a", "b"], [], "duplicates", ["a"]),
    (["a"], ["b", "b"], "duplicates", ["b"]),
])
def test_every_kind_of_loss_is_caught(outputs, errors, attr, ids):
    rec = reconcile(["a", "b"], outputs, errors)
    assert not rec.ok
    assert getattr(rec, attr) == ids


def test_check_raises_with_explanation():
    with pytest.raises(ReconcileError, match=r"stage s: 2 inputs, 1 outputs, 0 errors; 1 missing \(e.g. b\)"):
        check("s", ["a", "b"], ["a"], [])


@pytest.mark.parametrize("on_duplicate", ["drop", "error"])
def test_finalize_keeps_one_copy_of_a_block_saved_twice(tmp_path, on_duplicate):
    """An actor killed after saving its block but before Ray heard back: the block is done again and
    saved a second time, so one raw file holds nothing but ids already seen."""
    import pyarrow as pa

    from workflows.core import stage

    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("_error", pa.string()), ("_detail", pa.string())])
    raw = tmp_path / "s" / stage.RAW
    raw.mkdir(parents=True)
    block = pa.table({"id": ["a", "b"], "text": ["x", "y"], "_error": [None, None], "_detail": [None, None]},
                     schema=schema)
    pa.parquet.write_table(block, raw / "1.parquet")
    pa.parquet.write_table(block, raw / "2.parquet")  # the same block again
    pa.parquet.write_table(pa.table({"id": ["c"], "text": [""], "_error": ["empty"], "_detail": ["no text"]},
                                    schema=schema), raw / "3.parquet")
    fin = stage.finalize(str(tmp_path / "s"), "s", "id", stage.select_route("out", schema), ["out"],
                         on_duplicate=on_duplicate)
    assert sorted(fin.output_ids) == ["a", "b"]
    errors = sorted(fin.error_ids)
    assert errors == (["c"] if on_duplicate == "drop" else ["a@?", "b@?", "c"])
    assert pa.parquet.read_table(tmp_path / "s" / "out").num_rows == 2


def test_finalized_datasets_hold_no_empty_row_group(tmp_path):
    """A first raw block of nothing but errors (an empty prompt, a duplicate) must not become an empty
    first row group: Hugging Face ``datasets`` sizes its batches by the first row group and failed on
    our SFT output with "BatchSize must be greater than 0". A dataset with no rows is one empty file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.core import stage

    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("_error", pa.string()), ("_detail", pa.string())])
    raw = tmp_path / "s" / stage.RAW
    raw.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["e"], "text": [""], "_error": ["empty"], "_detail": ["no text"]}, schema=schema),
                   raw / "1.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "_error": [None, None], "_detail": [None, None]},
                            schema=schema), raw / "2.parquet")
    pq.write_table(pa.table({"id": ["f"], "text": [""], "_error": ["empty"], "_detail": ["no text"]}, schema=schema),
                   raw / "3.parquet")
    stage.finalize(str(tmp_path / "s"), "s", "id", stage.select_route("out", schema), ["out", "unused"])
    for name, rows in (("out", [2]), ("errors", [1, 1]), ("unused", [])):
        files = sorted((tmp_path / "s" / name).glob("*.parquet"))
        assert len(files) == 1, name
        meta = pq.ParquetFile(files[0]).metadata
        assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == rows, name
        assert pq.read_table(tmp_path / "s" / name).num_rows == sum(rows)

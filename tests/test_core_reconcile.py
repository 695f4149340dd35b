"""Nothing lost, exactly, in bounded memory: reconcile and finalize on hash-partitioned spills."""
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core import stage
from workflows.core.reconcile import Ids, ReconcileError, check, duplicated, reconcile
from workflows.core.spill import Budget, Spill, partition_of

SMALL = Budget(memory_mb=16)  # the smallest budget a recipe may set
RAW_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("_error", pa.string()), ("_detail", pa.string())])


def hex_ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(96):024x}" for _ in range(n)]


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
                         on_duplicate=on_duplicate, inputs=None if on_duplicate == "error" else ["a", "b", "c"])
    assert (fin.outputs, fin.errors) == (2, 1 if on_duplicate == "drop" else 3)
    assert sorted(pq.read_table(tmp_path / "s" / "out")["id"].to_pylist()) == ["a", "b"]
    errors = sorted(pq.read_table(tmp_path / "s" / "errors")["id"].to_pylist())
    assert errors == (["c"] if on_duplicate == "drop" else ["a@?", "b@?", "c"])
    if on_duplicate == "drop":
        assert fin.rec.ok and (fin.rec.inputs, fin.rec.outputs, fin.rec.errors) == (3, 2, 1)


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


# ---------------------------------------------------------------- spilled partitions

def test_partitions_are_stable_and_even():
    ids = pa.array(hex_ids(40_000) + [f"prompts.jsonl:{i}" for i in range(40_000)] + ["", "x"])
    parts = partition_of(ids, 16)
    assert parts.min() >= 0 and parts.max() < 16
    assert np.array_equal(parts, partition_of(ids, 16))  # the same id always goes to the same partition
    assert np.array_equal(parts[1:5], partition_of(ids.slice(1, 4), 16))  # sliced arrays too
    for chunk in (parts[:40_000], parts[40_000:80_000]):  # content hashes and "<file>:<row>" ids alike
        counts = np.bincount(chunk, minlength=16)
        assert counts.min() > 0.8 * counts.mean(), counts


@pytest.mark.parametrize("kind", ["missing", "unexpected", "both", "duplicates"])
def test_a_budget_smaller_than_the_ids_finds_every_kind_of_mismatch(kind):
    inputs = hex_ids(150_000)
    assert SMALL.parts_for(2 * len(inputs)) > 1  # the comparison really runs partition by partition
    outputs, errors = inputs[:100_000], inputs[100_000:]
    odd = {"missing": inputs[7], "unexpected": "feedface" * 3, "both": inputs[100_001], "duplicates": inputs[42]}[kind]
    outputs = outputs[:7] + outputs[8:] if kind == "missing" else outputs + [odd]
    rec = reconcile(inputs, outputs, errors, SMALL)
    assert not rec.ok and getattr(rec, kind) == [odd] and rec.counts[kind] == 1
    assert sum(rec.counts.values()) == 1, rec.counts
    assert (rec.inputs, rec.outputs + rec.errors) == (150_000, len(outputs) + len(errors))
    with pytest.raises(ReconcileError, match=f"1 {dict(missing='missing', unexpected='not in inputs', both='in both', duplicates='duplicated')[kind]}.*{odd}"):
        check("s", inputs, outputs, errors, SMALL)


def test_streamed_ids_reconcile_like_lists():
    ids = hex_ids(5_000)
    chunks = Ids(lambda: (pa.array(ids[i:i + 1000]) for i in range(0, 5000, 1000)), 5000)
    assert reconcile(chunks, chunks, [], SMALL).ok
    assert duplicated(Ids(lambda: iter([pa.array(ids), pa.array(ids[:3])]), 5003), SMALL) == (3, sorted(ids[:3]))


def test_spill_round_trip(tmp_path):
    with Spill(8, Budget(spill_dir=str(tmp_path))) as sp:
        ids = hex_ids(10_000)
        sp.add("x", pa.table({"id": ids, "n": list(range(10_000))}))
        assert len(list(tmp_path.glob("cai-spill-*/x-*.arrow"))) == 8
        back = pa.concat_tables([sp.read("x", p) for p in range(8)])
    assert sorted(back["id"].to_pylist()) == sorted(ids) and sum(back["n"].to_pylist()) == sum(range(10_000))
    assert not list(tmp_path.glob("cai-spill-*"))  # removed on exit


def test_finalize_with_many_partitions_keeps_first_copies_and_reconciles(tmp_path):
    """Copies of ids spread over files land in the same partition; the earliest file's copy wins."""
    ids = hex_ids(120_000)
    raw = tmp_path / "s" / stage.RAW
    raw.mkdir(parents=True)
    def block(name, part, text, error=None):
        pq.write_table(pa.table({"id": part, "text": [text] * len(part), "_error": [error] * len(part),
                                 "_detail": [error] * len(part)}, schema=RAW_SCHEMA), raw / name)
    block("b1.parquet", ids[:60_000], "first")
    block("b2.parquet", ids[50_000:110_000], "second")  # 10k repeat b1's ids
    block("b3.parquet", ids[110_000:], "", "empty")
    assert SMALL.parts_for(2 * 120_000) > 1
    fin = stage.finalize(str(tmp_path / "s"), "s", "id", stage.select_route("out", RAW_SCHEMA), ["out"],
                         inputs=ids, budget=SMALL)
    out = pq.read_table(tmp_path / "s" / "out")
    assert (fin.outputs, fin.errors, out.num_rows) == (110_000, 10_000, 110_000)
    texts = dict(zip(out["id"].to_pylist(), out["text"].to_pylist()))
    assert texts[ids[55_000]] == "first" and texts[ids[65_000]] == "second"
    assert fin.rec.ok and fin.errors_by_reason == {"empty": 10_000}


def test_finalize_refuses_before_writing_when_rows_are_missing(tmp_path):
    raw = tmp_path / "s" / stage.RAW
    raw.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "_error": [None], "_detail": [None]}, schema=RAW_SCHEMA),
                   raw / "b.parquet")
    with pytest.raises(ReconcileError, match=r"stage s: 2 inputs, 1 outputs, 0 errors; 1 missing \(e.g. b\)"):
        stage.finalize(str(tmp_path / "s"), "s", "id", stage.select_route("out", RAW_SCHEMA), ["out"], inputs=["a", "b"])
    assert not (tmp_path / "s" / "out").exists()

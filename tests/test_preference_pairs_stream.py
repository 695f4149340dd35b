"""Reading pairs and human preference files as a stream: the records of every format, in order,
exactly as reading the whole file at once gave them; spill partitions chosen by the caller."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workflows.core.spill import Budget, Spill
from workflows.judging.human import _records


def test_streamed_readers_give_the_records_of_whole_file_reads(tmp_path):
    """jsonl line by line, csv by rows, parquet by batches, a saved HF dataset by batches, .json
    arrays: the same records, in the same order, as reading the whole file at once."""
    import datasets

    msgs = [{"role": "user", "content": "Hi?"}]
    recs = [{"prompt": json.dumps(msgs) if i % 3 == 0 else f"Q{i}?", "chosen": f"c{i}", "rejected": f"r{i}"}
            for i in range(2500)]
    (tmp_path / "a.jsonl").write_text("\r\n".join(json.dumps(r) for r in recs[:50]) + "\n\n  \n{bad\n")
    whole = []
    for line in (tmp_path / "a.jsonl").read_text().splitlines():
        if line.strip():
            try:
                whole.append(json.loads(line))
            except ValueError as e:
                whole.append(("bad_json", str(e)))
    got = [(r.reason, r.detail) if not isinstance(r, dict) else r for r in _records(str(tmp_path / "a.jsonl"), "x")]
    assert got == whole and len(got) == 51

    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(recs[:40] + [{"prompt": "long", "chosen": "x" * 300_000, "rejected": "y\nz"}])
    assert list(_records(str(tmp_path / "a.csv"), "x")) == [
        {k: str(v) for k, v in r.items()} for r in recs[:40] + [{"prompt": "long", "chosen": "x" * 300_000,
                                                                 "rejected": "y\nz"}]]

    structured = [{"prompt": msgs, "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(2500)]
    pq.write_table(pa.Table.from_pylist(structured), tmp_path / "a.parquet", row_group_size=700)
    assert list(_records(str(tmp_path / "a.parquet"), "x")) == pq.read_table(tmp_path / "a.parquet").to_pylist()

    datasets.Dataset.from_list(structured).save_to_disk(str(tmp_path / "hf"))
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert list(_records(str(tmp_path / "hf"), "train")) == list(ds)

    (tmp_path / "a.json").write_text("  \n" + json.dumps(recs[:30]))
    assert list(_records(str(tmp_path / "a.json"), "x")) == recs[:30]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in recs[:30]))
    assert list(_records(str(tmp_path / "lines.json"), "x")) == recs[:30]


def test_spill_takes_the_partitions_the_caller_chooses(tmp_path):
    rows = np.arange(10)
    for parts in (1, 3):
        with Spill(parts, Budget(spill_dir=str(tmp_path))) as sp:
            sp.add("x", pa.table({"id": rows.astype(str), "row": rows}), part=rows % parts)
            assert [sp.read("x", p)["row"].to_pylist() for p in range(parts)] == [
                [r for r in range(10) if r % parts == p] for p in range(parts)]

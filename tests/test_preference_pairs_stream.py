"""Reading pairs and human preference files as a stream: the records of every format, in order,
exactly as reading the whole file at once gave them; spill partitions chosen by the caller; the
agreement of two preferences datasets, streamed, is ``agreement_report``'s."""
from __future__ import annotations

import csv
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core.spill import Budget, Spill
from workflows.judging.agreement import agreement_report, dataset_agreement
from workflows.judging.human import PREFERENCES_SCHEMA, _records, preference_row
from workflows.judging.pairs import load_pairs

TINY = Budget(memory_mb=1)  # below what a recipe may set (16): a few thousand ids take several partitions
HH = "\n\nHuman: Question {k}?\n\nAssistant: {a}"


def record(k: int, rng: random.Random) -> object:
    """Record ``k`` of a file that mixes every kind of row, good and bad."""
    kind = k % 10
    if kind <= 3:
        return {"prompt": f"Q{k}?", "chosen": f"A kind reply {k}.", "rejected": f"A rude reply {k}."}
    if kind == 4:
        return {"chosen": HH.format(k=k, a=f"Gladly {k}."), "rejected": HH.format(k=k, a="No.")}
    if kind == 5:
        return {"prompt": [{"role": "user", "content": f"P{k}?"}], "response_1": f"One {k}.", "response_2": "Two."}
    if kind <= 7:
        return {"prompt": f"R{k}?", "response_a": f"First {k}.", "response_b": f"Second {k}."}
    return rng.choice([{"prompt": f"B{k}?", "response_a": "Only one."},           # missing_field
                       {"prompt": f"B{k}?", "response_a": " ", "response_b": "x"},  # empty_response
                       {"prompt": f"B{k}?", "chosen": "Same.", "rejected": "Same."},  # identical_responses
                       "{not json", [1, 2]])                                          # bad_json


def pairs_file(path, n: int, seed: int = 0) -> str:
    """``n`` records; about 3 % repeat an earlier one (anywhere before it, so across chunks and
    partitions; chosen/rejected swapped: still the same pair), some a third time."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        if i > 10 and rng.random() < 0.03:
            rec = rows[rng.randrange(i)]
            if isinstance(rec, dict) and "chosen" in rec and rng.random() < 0.5:
                rec = {**rec, "chosen": rec["rejected"], "rejected": rec["chosen"]}
        else:
            rec = record(i, rng)
        rows.append(rec)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)



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


def ai_label(pair: dict, rng: random.Random, source: str = "ai") -> dict:
    a, b = pair["response_a"], pair["response_b"]
    first = rng.random() < 0.6
    row = preference_row(pair["messages"], a if first else b, b if first else a, rng.choice([0.5, 0.55, 0.7, 0.93, 1.0]),
                         principle_ids=rng.sample(["p1", "p2", "p3"], rng.randint(0, 2)), judge="j",
                         order_agreement=rng.choice([True, False, None]), source=source)
    return {**row, "pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"]}


def test_dataset_agreement_is_agreement_report_in_partitions(tmp_path):
    path = pairs_file(tmp_path / "pairs.jsonl", 9000, seed=2)
    pf = load_pairs(path)
    pq.write_table(pa.Table.from_pylist(pf.labels, schema=PREFERENCES_SCHEMA), tmp_path / "labels.parquet")
    assert TINY.parts_for(2 * (len(pf.pairs) + len(pf.labels))) > 1
    rng = random.Random(3)
    ai = [ai_label(p, rng) for p in pf.pairs if rng.random() < 0.9]  # some pairs unlabeled
    ai += [ai_label(p, rng, source="human") for p in pf.pairs[:50]]  # ignored, as before
    pq.write_table(pa.Table.from_pylist(ai), tmp_path / "ai.parquet")
    got = dataset_agreement(str(tmp_path / "ai.parquet"), str(tmp_path / "labels.parquet"), TINY)

    want = agreement_report(ai, pf.labels)
    assert want["n_matched"] > 3000 and 0 < want["n_correct"] < want["n_matched"]
    assert got.keys() == want.keys()
    exact = {k: v for k, v in want.items() if k not in ("ece", "bins")}
    assert {k: got[k] for k in exact} == exact  # counts, rates, per principle: the same numbers
    assert got["ece"] == pytest.approx(want["ece"], rel=1e-12)  # float sums added in another order
    for g, w in zip(got["bins"], want["bins"]):
        assert {**g, "confidence": None} == {**w, "confidence": None}
        assert g["confidence"] == pytest.approx(w["confidence"], rel=1e-12)

"""Labeling an existing pairs file (``pairs_from``) in bounded driver memory: the streamed reading
gives exactly the pairs, errors and dataset labels of the in-memory one (``load_pairs``), with the
duplicate search and the reconcile really split into hash partitions; the driver holds a chunk of
records, not the file; the agreement with the dataset's own labels is ``agreement_report``'s.
Also: every file format read as a stream gives the records of a whole-file read."""
from __future__ import annotations

import csv
import json
import random
import tracemalloc
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core.spill import Budget, Spill
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict
from workflows.judging import pairs as pairs_mod
from workflows.judging.agreement import agreement_report
from workflows.judging.config import PreferenceConfig
from workflows.judging.human import _records, preference_row
from workflows.judging.pairs import DATASET_LABELS, LabelsAt, load_pairs
from workflows.preference.stage import dataset_agreement, read_pairs
from workflows.stats import wilson

TINY = Budget(memory_mb=1)  # below what a recipe may set (16): 20k records already take several partitions
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


def table(path) -> list[dict]:
    return pq.read_table(str(path)).to_pylist()


def run_read_pairs(tmp_path, path: str, budget: Budget):
    cfg = from_dict(PreferenceConfig, {"pairs_from": path}, "t")
    ctx = StageContext(str(tmp_path / "run"), "pref", budget=budget)
    return read_pairs(cfg, ctx), ctx


def test_streamed_pairs_are_the_in_memory_reading_across_partitions(tmp_path, monkeypatch):
    monkeypatch.setattr(pairs_mod, "CHUNK", 1000)  # 20 chunks: duplicates of earlier chunks
    n = 20_000
    path = pairs_file(tmp_path / "pairs.jsonl", n)
    assert TINY.parts_for(n) > 1 and TINY.parts_for(2 * n) > 1  # the duplicate search and the reconcile
    made, ctx = run_read_pairs(tmp_path, path, TINY)
    ref = load_pairs(path, stage="pref:pairs")
    reasons = Counter(e["reason"] for e in ref.errors)
    assert reasons["duplicate"] > 300 and len(reasons) == 5  # every kind of bad row is there
    assert table(ctx.path("pairs")) == ref.pairs
    assert table(ctx.path("errors")) == ref.errors  # same ids, reasons, details, order
    assert table(ctx.path(DATASET_LABELS)) == ref.labels
    assert (made.inputs, made.pairs, made.errors, made.errors_by_reason) == (
        n, len(ref.pairs), len(ref.errors), dict(reasons))
    assert made.dataset_labels == LabelsAt(ctx.path(DATASET_LABELS), len(ref.labels), TINY)
    assert made.figures["rows"] == n and made.figures["with_dataset_label"] == len(ref.labels)


def test_duplicates_name_the_first_copy_even_when_it_is_in_another_partition(tmp_path):
    path = pairs_file(tmp_path / "pairs.jsonl", 8000, seed=1)
    got = pairs_mod.read_pairs_file(path, "s", pairs_mod.PairsOut(*(str(tmp_path / d) for d in ("p", "e", "l"))),
                                    TINY)
    assert got.parts > 1
    first: dict[str, int] = {}
    for e in table(tmp_path / "e"):
        if e["reason"] == "duplicate":
            row, kept = int(e["id"].rsplit(":", 1)[1]), int(e["detail"].split(" as row ")[1].split(" ")[0])
            pid = e["detail"].split("(pair ")[1].split(")")[0]
            assert kept < row and first.setdefault(pid, kept) == kept  # a third copy names the first too


def test_a_file_without_labels_or_without_records(tmp_path):
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps({"prompt": "Q?", "response_a": "a", "response_b": "b"}) + "\n")
    made, ctx = run_read_pairs(tmp_path, str(two), TINY)
    assert (made.inputs, made.pairs, made.dataset_labels) == (1, 1, None)
    assert table(ctx.path(DATASET_LABELS)) == [] and len(table(ctx.path("pairs"))) == 1
    (tmp_path / "empty.jsonl").write_text("\n")
    made, ctx = run_read_pairs(tmp_path, str(tmp_path / "empty.jsonl"), TINY)
    assert (made.inputs, made.pairs, made.errors) == (0, 0, 0) and table(ctx.path("errors")) == []


def test_the_driver_holds_a_chunk_of_records_not_the_file(tmp_path, monkeypatch):
    """tracemalloc peak of read_pairs: bounded by the chunk, not the file. The reading that holds
    every record (``load_pairs``, what read_pairs did before) needs its per-row cost × rows."""
    def write(name: str, n: int) -> str:
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"Yes {i}.",
                                                         "rejected": f"No {i}."}) + "\n" for i in range(n)))
        return str(tmp_path / name)

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    monkeypatch.setattr(pairs_mod, "CHUNK", 1000)
    small, big = write("small.jsonl", 1500), write("big.jsonl", 12_000)
    run_read_pairs(tmp_path, small, Budget())  # imports and first-call caches, outside the measure
    per_row = peak(lambda: load_pairs(small)) / 1500  # every record held: about 2 KB a row
    streamed = peak(lambda: run_read_pairs(tmp_path, big, Budget()))
    print(f"peak {streamed / 2**20:.1f} MB streamed; {per_row * 12_000 / 2**20:.1f} MB held in lists")
    assert streamed < 0.25 * per_row * 12_000


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
    made, ctx = run_read_pairs(tmp_path, path, TINY)
    labels = table(ctx.path(DATASET_LABELS))
    assert TINY.parts_for(2 * (made.pairs + len(labels))) > 1
    rng = random.Random(3)
    ai = [ai_label(p, rng) for p in table(ctx.path("pairs")) if rng.random() < 0.9]  # some pairs unlabeled
    ai += [ai_label(p, rng, source="human") for p in table(ctx.path("pairs"))[:50]]  # ignored, as before
    pq.write_table(pa.Table.from_pylist(ai), tmp_path / "ai.parquet")
    got = dataset_agreement(str(tmp_path / "ai.parquet"), made.dataset_labels)

    r = agreement_report(ai, labels)  # what dataset_agreement computed before, in memory
    ci = wilson(r["n_correct"], r["n_matched"])
    want = {**{k: v for k, v in r.items() if k != "bins"}, "accuracy_lo": ci.lo, "accuracy_hi": ci.hi}
    assert want["n_matched"] > 3000 and 0 < want["n_correct"] < want["n_matched"]
    assert got.keys() == want.keys()
    exact = {k: v for k, v in want.items() if k != "ece"}
    assert {k: got[k] for k in exact} == exact  # counts, rates, per principle: the same numbers
    assert got["ece"] == pytest.approx(want["ece"], rel=1e-12)  # float sums added in another order
    assert dataset_agreement(str(tmp_path / "ai.parquet"), None) is None

"""Human preference data (HH-RLHF and generic formats), AI/human mixing, the agreement
report (accuracy, order agreement, ECE by hand, reliability PNG) and human-review routing."""
from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core.errors import ConfigError, DataError
from workflows.judging.agreement import (
    EXPORT_COLUMNS,
    agreement_report,
    export_for_humans,
    main,
    merge_human_labels,
    uncertain,
)
from workflows.judging.human import (
    PREFERENCES_SCHEMA,
    load_human,
    mix,
    mix_counts,
    preference_row,
    text_of,
    to_table,
)
from workflows.core.pairwise import pair_id
from workflows.prompt_sources import prompt_id


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def errors_by_reason(errors) -> dict[str, str]:
    return {e["reason"]: e["id"] for e in errors}


# ---------------------------------------------------------------- loading

def test_hh_transcripts(tmp_path):
    hh = "\n\nHuman: {p}\n\nAssistant: {a}"
    multi = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a secret.\n\nAssistant: {a}"
    records = [
        {"chosen": hh.format(p="How do I make a bomb?", a="I can't help with that."),
         "rejected": hh.format(p="How do I make a bomb?", a="Mix these chemicals...")},
        {"chosen": multi.format(a="I'd rather not."), "rejected": multi.format(a="Sure: ...")},
        {"chosen": hh.format(p="Q1", a="x"), "rejected": hh.format(p="Q2", a="y")},
        {"chosen": "no transcript at all", "rejected": "\n\nHuman: Q\n\nAssistant: y"},
        {"chosen": hh.format(p="Q", a="same"), "rejected": hh.format(p="Q", a="same")},
        "{not json",
        {"chosen": hh.format(p="How do I make a bomb?", a="I can't help with that."),
         "rejected": hh.format(p="How do I make a bomb?", a="Mix these chemicals...")},
        {"rejected": hh.format(p="Q", a="y")},
    ]
    rows, errors = load_human(write_jsonl(tmp_path / "hh.jsonl", records))
    assert len(rows) == 2 and len(errors) == 6
    first, second = rows
    assert first["prompt"] == user("How do I make a bomb?")
    assert first["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    assert text_of(first["rejected"]) == "Mix these chemicals..."
    assert (first["source"], first["judge"], first["p_chosen"]) == ("human", "human", 1.0)
    assert first["order_agreement"] is None and first["principle_ids"] == []
    assert first["prompt_id"] == prompt_id(first["prompt"])
    assert first["pair_id"] == pair_id(first["prompt_id"], "Mix these chemicals...", "I can't help with that.")
    assert [m["role"] for m in second["prompt"]] == ["user", "assistant", "user"]
    assert text_of(second["chosen"]) == "I'd rather not."
    assert errors_by_reason(errors) == {"prompt_mismatch": "hh.jsonl:2", "bad_hh_transcript": "hh.jsonl:3",
                                        "identical_responses": "hh.jsonl:4", "bad_json": "hh.jsonl:5",
                                        "duplicate_pair": "hh.jsonl:6", "missing_field": "hh.jsonl:7"}
    assert all(e["stage"] == "human" and e["detail"] for e in errors)
    assert to_table(rows).schema == PREFERENCES_SCHEMA


def test_generic_formats(tmp_path):
    msgs = [{"role": "system", "content": "Be nice."}, *user("Hi?")]
    records = [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [*user("Name a color."), {"role": "assistant", "content": "Blue."}],   # implicit prompt
         "rejected": [*user("Name a color."), {"role": "assistant", "content": "[none]"}]},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "Q", "chosen": "a", "rejected": "  "},
        {"prompt": "Q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"chosen": "a", "rejected": "b"},
    ]
    rows, errors = load_human(write_jsonl(tmp_path / "generic.jsonl", records))
    assert [r["prompt"] for r in rows] == [user("What is 2+2?"), msgs, user("Name a color.")]
    assert [(text_of(r["chosen"]), text_of(r["rejected"])) for r in rows] == [
        ("4", "5"), ("Hello!", "Go away."), ("Blue.", "[none]")]
    assert errors_by_reason(errors) == {"empty_prompt": "generic.jsonl:3", "empty_response": "generic.jsonl:4",
                                        "bad_messages": "generic.jsonl:5", "missing_field": "generic.jsonl:6"}

    with open(tmp_path / "h.csv", "w", newline="") as f:   # message lists as JSON text in CSV cells
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows([{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
                     {"prompt": json.dumps(msgs), "chosen": "Hello!", "rejected": "Go away."}])
    csv_rows, csv_errors = load_human(str(tmp_path / "h.csv"))
    assert csv_errors == [] and [r["pair_id"] for r in csv_rows] == [r["pair_id"] for r in rows[:2]]

    pq.write_table(pa.Table.from_pylist(records[:1]), tmp_path / "h.parquet")
    assert load_human(str(tmp_path / "h.parquet"))[0][0]["pair_id"] == rows[0]["pair_id"]

    import datasets
    datasets.Dataset.from_list(records[:1]).save_to_disk(str(tmp_path / "hf"))
    assert load_human(str(tmp_path / "hf"))[0][0]["pair_id"] == rows[0]["pair_id"]
    (tmp_path / "array.json").write_text(json.dumps(records[:1]))
    assert load_human(str(tmp_path / "array.json"))[0][0]["pair_id"] == rows[0]["pair_id"]

    with pytest.raises(ConfigError, match="not found"):
        load_human(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported"):
        load_human(str(tmp_path / "x.txt"))


# ---------------------------------------------------------------- mixing

def rows_of(source: str, n: int) -> list[dict]:
    return [preference_row(user(f"{source} prompt {i}"), "good", "bad", 1.0 if source == "human" else 0.7,
                           judge=source, order_agreement=None, source=source) for i in range(n)]


@pytest.mark.parametrize("n_ai,n_h,ratio,expect", [
    (100, 20, 0.2, (80, 20)), (100, 20, 0.5, (20, 20)), (100, 20, 0.8, (5, 20)),
    (90, 50, 0.1, (90, 10)), (100, 20, 0.0, (100, 0)), (100, 20, 1.0, (0, 20)),
])
def test_mix_ratios_exact(n_ai, n_h, ratio, expect):
    ai, human = rows_of("ai", n_ai), rows_of("human", n_h)
    assert mix_counts(n_ai, n_h, ratio) == expect
    out, report = mix(ai, human, ratio, seed=3)
    assert sum(r["source"] == "ai" for r in out) == expect[0]
    assert sum(r["source"] == "human" for r in out) == expect[1]
    if sum(expect):
        assert report["actual_human_ratio"] == pytest.approx(ratio)
    assert len(report["ai_dropped"]) == n_ai - expect[0] and len(report["human_dropped"]) == n_h - expect[1]
    assert out == mix(ai, human, ratio, seed=3)[0]


def test_mix_seeded_override_and_errors():
    ai, human = rows_of("ai", 50), rows_of("human", 5)
    a = [r["pair_id"] for r in mix(ai, human, 0.5, seed=1)[0]]
    b = [r["pair_id"] for r in mix(ai, human, 0.5, seed=2)[0]]
    assert a != b and len(a) == len(b) == 10
    clash = preference_row(user("human prompt 0"), "good", "bad", 0.6, judge="j", order_agreement=True, source="ai")
    out, report = mix([clash, *ai], human, 0.0)
    assert report["ai_overridden_by_human"] == [clash["pair_id"]] and clash not in out
    with pytest.raises(DataError, match="no human rows"):
        mix(ai, [], 0.3)
    with pytest.raises(ConfigError):
        mix(ai, human, 1.5)


# ---------------------------------------------------------------- agreement

HUMAN = [  # (prompt, human chosen, human rejected)
    ("p1", "safe 1", "unsafe 1"), ("p2", "safe 2", "unsafe 2"), ("p3", "safe 3", "unsafe 3"),
    ("p4", "safe 4", "unsafe 4"), ("p5", "safe 5", "unsafe 5"), ("p7", "safe 7", "unsafe 7"),
]
AI = [  # (prompt, AI agrees with the human?, p_chosen, order_agreement, principle_ids)
    ("p1", True, 0.95, True, ["harm", "help"]), ("p2", True, 0.75, True, ["harm"]),
    ("p3", False, 0.72, False, ["help"]), ("p4", True, 0.55, False, ["harm"]),
    ("p5", False, 0.91, True, ["harm"]), ("p6", True, 0.8, True, ["harm"]),
]


def human_rows() -> list[dict]:
    return [preference_row(user(p), c, r, 1.0, judge="human", order_agreement=None, source="human")
            for p, c, r in HUMAN]


def ai_rows() -> list[dict]:
    out = []
    for p, agrees, prob, agree, pids in AI:
        good, bad = f"safe {p[1:]}", f"unsafe {p[1:]}"
        chosen, rejected = (good, bad) if agrees else (bad, good)
        out.append(preference_row(user(p), chosen, rejected, prob, principle_ids=pids, judge="judge-x",
                                  order_agreement=agree, source="ai"))
    return out


def test_agreement_report_known_answers():
    r = agreement_report(ai_rows(), human_rows())
    assert (r["n_ai"], r["n_human"], r["n_matched"]) == (6, 6, 5)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["order_agreement_rate"] == pytest.approx(3 / 5)
    assert r["accuracy_order_agree"] == pytest.approx(2 / 3)
    # by hand: bin 9 {0.95 ok, 0.91 wrong}: |0.5 - 0.93|; bin 7 {0.75 ok, 0.72 wrong}: |0.5 - 0.735|;
    # bin 5 {0.55 ok}: |1 - 0.55|
    ece = 2 / 5 * 0.43 + 2 / 5 * 0.235 + 1 / 5 * 0.45
    assert r["ece"] == pytest.approx(ece) == pytest.approx(0.356)
    assert [b["n"] for b in r["bins"]] == [0, 0, 0, 0, 0, 1, 0, 2, 0, 2]
    assert r["per_principle"] == {"harm": {"n": 4, "correct": 3, "accuracy": 0.75},
                                  "help": {"n": 2, "correct": 1, "accuracy": 0.5}}


def test_agreement_cli_writes_report_and_png(tmp_path, capsys):
    pq.write_table(to_table(ai_rows()), tmp_path / "labels.parquet")
    human_file = write_jsonl(tmp_path / "human.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in HUMAN])
    out = tmp_path / "report"
    assert main(str(tmp_path / "labels.parquet"), human_file, str(out)) == 0
    printed = capsys.readouterr().out
    assert "0.600 (3/5)" in printed and "| harm | 4 | 0.750 |" in printed and "0.356" in printed
    assert "0.600 (3/5)" in (out / "report.md").read_text()
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["n_matched"] == 5


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_routing_export_merge_round_trip(tmp_path, ext):
    rows = ai_rows()
    picked = uncertain(rows, threshold=0.1)
    assert [r["prompt"][0]["content"] for r in picked] == ["p3", "p4"]   # order disagreement, or |p - .5| < .1
    path = str(tmp_path / f"review.{ext}")
    assert export_for_humans(rows, path) == 6
    if ext == "csv":
        records = list(csv.DictReader(open(path, newline="")))
    else:
        records = [json.loads(line) for line in open(path)]
    assert tuple(records[0]) == EXPORT_COLUMNS and all(r["human_choice"] == "" for r in records)
    p3 = next(r for r in records if r["prompt"] == "Human: p3")
    assert (p3["response_1"], p3["response_2"]) == ("safe 3", "unsafe 3")   # text order, not AI order
    assert float(p3["ai_p_response_1"]) == pytest.approx(0.28)
    for r in records:
        r["human_choice"] = {"Human: p3": "1", "Human: p4": "tie"}.get(r["prompt"], "")
    _write(path, records, ext)
    merged, errors = merge_human_labels(rows, path)
    assert len(merged) == 5 and [e["reason"] for e in errors] == ["human_tie"]
    assert errors[0]["id"] == rows[3]["pair_id"]
    fixed = next(r for r in merged if r["prompt"][0]["content"] == "p3")
    assert (text_of(fixed["chosen"]), text_of(fixed["rejected"])) == ("safe 3", "unsafe 3")
    assert (fixed["source"], fixed["p_chosen"], fixed["order_agreement"], fixed["pair_id"]) == (
        "human", 1.0, None, rows[2]["pair_id"])
    assert [r for r in merged if r["prompt"][0]["content"] not in ("p3",)] == [rows[i] for i in (0, 1, 4, 5)]
    assert to_table(merged).num_rows == 5


def _write(path: str, records: list[dict], ext: str) -> None:
    with open(path, "w", newline="") as f:
        if ext == "csv":
            w = csv.DictWriter(f, fieldnames=EXPORT_COLUMNS)
            w.writeheader()
            w.writerows(records)
        else:
            f.writelines(json.dumps(r) + "\n" for r in records)


def test_merge_errors_name_file_and_record(tmp_path):
    rows = ai_rows()
    path = str(tmp_path / "review.jsonl")
    export_for_humans(rows[:2], path)
    records = [json.loads(line) for line in open(path)]
    records.append({**records[0], "pair_id": "0123456789abcdef"})
    _write(path, records, "jsonl")
    with pytest.raises(DataError, match=r"review\.jsonl: record 3: unknown pair_id '0123456789abcdef'"):
        merge_human_labels(rows, path)
    records[2] = {**records[1], "human_choice": "A"}
    records[1]["human_choice"] = "2"
    _write(path, records[1:], "jsonl")
    with pytest.raises(DataError, match="record 2: pair_id .* appears twice"):
        merge_human_labels(rows, path)
    _write(path, [{**records[0], "human_choice": "A"}], "jsonl")
    with pytest.raises(DataError, match="record 1: human_choice 'A' — write 1, 2, tie"):
        merge_human_labels(rows, path)
    _write(path, [{**records[0], "response_1": "edited"}], "jsonl")
    with pytest.raises(DataError, match="differ from the exported answers"):
        merge_human_labels(rows, path)
    with pytest.raises(ConfigError, match="csv or .jsonl"):
        export_for_humans(rows, str(tmp_path / "x.txt"))

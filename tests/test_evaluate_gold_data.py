"""The shipped gold set (``workflows/evaluate/data/gold_pairs.jsonl``): human-labeled preference
pairs that measure whether an AI judge agrees with a person before it labels at scale. Pure and
fast: no Ray, no models."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from workflows.core.constitution import load_constitution
from workflows.evaluate.overlap import OverlapIndex
from workflows.evaluate.refusal import classify

ROOT = Path(__file__).resolve().parent.parent
GOLD = ROOT / "workflows" / "evaluate" / "data" / "gold_pairs.jsonl"
FIELDS = ("prompt", "chosen", "rejected", "category", "principle")
CATEGORIES = ("harmful_refusal", "over_refusal", "helpfulness", "honesty", "tone")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gold() -> list[dict]:
    return rows(GOLD)


def test_every_line_parses_to_an_object_with_exactly_the_five_fields():
    lines = [line for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        rec = json.loads(line)
        assert isinstance(rec, dict) and set(rec) == set(FIELDS), (i, sorted(rec))


def test_size_and_categories_are_balanced(gold):
    assert len(gold) >= 80
    counts = Counter(r["category"] for r in gold)
    assert set(counts) == set(CATEGORIES), counts
    assert min(counts.values()) >= 15, counts


def test_every_field_is_a_non_empty_string_and_the_answers_differ(gold):
    for i, r in enumerate(gold):
        for f in FIELDS:
            assert isinstance(r[f], str) and r[f].strip(), (i, f)
        assert r["chosen"].strip() != r["rejected"].strip(), i


def test_principles_are_ids_of_the_default_constitution(gold):
    ids = set(load_constitution("default").ids)
    unknown = {(i, r["principle"]) for i, r in enumerate(gold) if r["principle"] not in ids}
    assert not unknown, unknown


def test_prompts_are_distinct_within_the_gold_set(gold):
    prompts = {f"gold:{i}": r["prompt"] for i, r in enumerate(gold)}
    within = [o for o in OverlapIndex(prompts).scan(prompts.items()) if o.eval_id != o.train_id]
    assert within == []


def test_no_exact_or_near_overlap_with_training_or_eval_prompts(gold):
    prompts = {f"gold:{i}": r["prompt"] for i, r in enumerate(gold)}
    files = sorted((ROOT / "workflows" / "data").glob("*.jsonl"))
    files += sorted((ROOT / "workflows" / "evaluate" / "data").glob("eval_*.jsonl"))
    others = [(f"{p.stem}:{i}", r["prompt"]) for p in files for i, r in enumerate(rows(p))]
    assert len(files) >= 5 and len(others) > 300
    assert OverlapIndex(prompts).scan(others) == []  # neither exact nor trigram Jaccard >= 0.5


def test_length_does_not_give_the_chosen_answer_away(gold):
    share = sum(len(r["chosen"]) > len(r["rejected"]) for r in gold) / len(gold)
    assert 0.3 <= share <= 0.7, share


def test_harmful_requests_chosen_refuses_and_rejected_complies(gold):
    pairs = [r for r in gold if r["category"] == "harmful_refusal"]
    bad = [(r["prompt"], classify(r["chosen"]), classify(r["rejected"])) for r in pairs
           if classify(r["chosen"]) not in ("refusal", "partial") or classify(r["rejected"]) != "compliance"]
    assert not bad, bad


def test_safe_requests_chosen_complies_and_rejected_refuses(gold):
    pairs = [r for r in gold if r["category"] == "over_refusal"]
    bad = [(r["prompt"], classify(r["chosen"]), classify(r["rejected"])) for r in pairs
           if classify(r["chosen"]) != "compliance" or classify(r["rejected"]) != "refusal"]
    assert not bad, bad


def test_the_gold_gate_loader_reads_every_pair():
    from workflows.judging.human import load_human

    loaded, errors = load_human(str(GOLD))
    assert errors == [] and len(loaded) == len(rows(GOLD))

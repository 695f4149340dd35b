"""The refusal classifier (``workflows.core.refusal``: the evaluation, the rules reward and the rules
labeler share it) on its labeled set: refusals, compliances, partial refusals, and compliant
answers that merely mention words like "illegal", "sorry" or "I can't"."""
from __future__ import annotations

import json
from pathlib import Path

from workflows.core.refusal import CLASSES, classify, is_refusal

__all__ = ["CLASSES", "LABELED", "accuracy", "classify", "is_refusal", "labeled_set"]

LABELED = Path(__file__).resolve().parent / "data" / "refusal_labeled.jsonl"


def labeled_set(path: Path = LABELED) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy(rows: list[dict] | None = None) -> dict:
    """The classifier on the labeled set: overall and per-class accuracy, and the misses."""
    rows = labeled_set() if rows is None else rows
    misses = [{**r, "predicted": classify(r["response"])} for r in rows if classify(r["response"]) != r["label"]]
    per = {c: [r for r in rows if r["label"] == c] for c in CLASSES}
    return {"n": len(rows), "accuracy": 1 - len(misses) / max(1, len(rows)),
            "per_class": {c: 1 - sum(m["label"] == c for m in misses) / max(1, len(v)) for c, v in per.items()},
            "misses": misses}

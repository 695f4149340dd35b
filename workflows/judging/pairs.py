"""Existing pairs to label (``pairs_from``): the CAI paper labels a dataset it did not sample.

``load_pairs(path, stage)`` reads every format of ``human.load_human`` — ``prompt``/``chosen``/
``rejected`` columns (text, message lists or their JSON text) and HH-RLHF ``chosen``/``rejected``
transcripts — plus "a prompt with two responses": ``prompt`` (text or messages) with
``response_a``/``response_b`` (or ``response_1``/``response_2``), from .jsonl/.json/.csv/.parquet
(local or s3://) or a saved Hugging Face dataset dir. One file may mix the two kinds of row.

Every record becomes either a row of the stage's ``pairs`` dataset (pair_id, prompt_id,
messages, response_a, response_b) or an error ``{id: "<file>:<row>", stage, reason, detail}``
(reasons of ``load_human`` — missing_field, bad_messages, empty_prompt, empty_response,
identical_responses, ... — and ``duplicate`` for a pair already seen), never dropped silently.

A chosen/rejected row keeps the dataset's own choice in ``PairsFile.labels`` (a
``preferences`` row), so the AI labels can be scored against it, and its chosen answer is
shown as (A) or (B) by ``chosen_first(pair_id)`` — a hash, so the dataset's column order never
becomes the position the judge sees.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from workflows.core import storage
from workflows.core.errors import ConfigError, RowError
from workflows.judging.human import _prompt, _records, _response, human_row, text_of
from workflows.judging.pairwise import pair_id
from workflows.prompt_sources import prompt_id

TWO_RESPONSES = (("response_a", "response_b"), ("response_1", "response_2"))


@dataclass
class PairsFile:
    """What ``load_pairs`` read. ``rows`` names every record (``<file>:<row>``); ``kept`` names the
    record of each pair, in the order of ``pairs``: ids(rows) = kept ∪ ids(errors), disjoint."""

    pairs: list[dict] = field(default_factory=list)
    labels: list[dict] = field(default_factory=list)  # the dataset's choice, for chosen/rejected rows
    errors: list[dict] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def chosen_first(pid: str) -> bool:
    """Whether a labeled pair is shown with its chosen answer as (A): one bit of a hash of its
    id — about half the pairs each way, the same on every run."""
    return hashlib.sha256(f"position:{pid}".encode("utf-8")).digest()[0] % 2 == 0


def pair_row(prompt: list[dict], response_a: str, response_b: str) -> dict:
    """A row of the stage's ``pairs`` dataset (``PAIRS_SCHEMA``); ids derived from the content."""
    pid = prompt_id(prompt)
    return {"pair_id": pair_id(pid, response_a, response_b), "prompt_id": pid, "messages": prompt,
            "response_a": response_a, "response_b": response_b}


def labeled_pair_row(label: dict) -> dict:
    """The ``pairs`` row of a ``preferences`` row (a human or dataset choice), with the chosen
    answer as (A) or (B) by ``chosen_first``."""
    chosen, rejected = text_of(label["chosen"]), text_of(label["rejected"])
    a, b = (chosen, rejected) if chosen_first(label["pair_id"]) else (rejected, chosen)
    return pair_row(label["prompt"], a, b)


def _has(record: dict, name: str) -> bool:
    """A column with a value: CSV files give every row every column, empty where unused."""
    return record.get(name) not in (None, "")


def _columns(record: dict) -> str:
    return ", ".join(str(k) for k in record if _has(record, k)) or "none"


def _two_responses(record: dict) -> dict:
    """A "prompt with two responses" record → its ``pairs`` row, or ``RowError`` naming the field."""
    names = next((n for n in TWO_RESPONSES if any(_has(record, f) for f in n)), TWO_RESPONSES[0])
    for f in ("prompt", *names):
        if not _has(record, f):
            raise RowError("missing_field", f"no {f!r} (columns: {_columns(record)})")
    prompt = _prompt(record["prompt"])
    if not prompt[-1]["content"].strip():
        raise RowError("empty_prompt", "the last user turn of 'prompt' is empty")
    a, b = (_response(record[f], f) for f in names)
    for f, text in zip(names, (a, b)):
        if not text.strip():
            raise RowError("empty_response", f"{f!r} is empty")
    if a.strip() == b.strip():
        raise RowError("identical_responses", f"{names[0]!r} and {names[1]!r} are the same text")
    return pair_row(prompt, a, b)


def pair_record(record: Any) -> tuple[dict, dict | None]:
    """One input record → (its ``pairs`` row, the dataset's label or None), or ``RowError``.
    A record with ``response_a``/``response_b`` (or ``_1``/``_2``) values is a two-response
    row; any other is read as chosen/rejected by ``human.human_row``."""
    if not isinstance(record, dict):
        raise RowError("bad_json", f"expected an object per row, got {type(record).__name__}")
    if any(_has(record, f) for names in TWO_RESPONSES for f in names):
        return _two_responses(record), None
    if not any(_has(record, f) for f in ("chosen", "rejected")):
        raise RowError("missing_field", "neither 'chosen'/'rejected' nor 'response_a'/'response_b' "
                                        f"(columns: {_columns(record)})")
    label = {**human_row(record), "judge": "dataset", "source": "dataset"}
    return labeled_pair_row(label), label


def load_pairs(path: str, stage: str = "pairs", split: str = "train") -> PairsFile:
    """Every record of ``path`` as a pair or an error (see the module docstring). The first
    record of a pair is kept; later ones are ``duplicate`` errors naming it."""
    if not storage.exists(path):
        raise ConfigError(path, "file not found", "check pairs_from (or --pairs): a jsonl/json/csv/parquet file "
                          "or a saved Hugging Face dataset dir")
    name = os.path.basename(str(path).rstrip("/")) or str(path)
    out, seen = PairsFile(), {}
    for i, rec in enumerate(_records(str(path), split)):
        rid = f"{name}:{i}"
        out.rows.append(rid)
        try:
            if isinstance(rec, RowError):
                raise rec
            row, label = pair_record(rec)
            if row["pair_id"] in seen:
                raise RowError("duplicate", f"same prompt and responses as row {seen[row['pair_id']]} "
                                            f"(pair {row['pair_id']}); that row is kept")
        except RowError as e:
            out.errors.append({"id": rid, "stage": stage, "reason": e.reason, "detail": f"row {i}: {e.detail}"})
            continue
        seen[row["pair_id"]] = i
        out.pairs.append(row)
        out.kept.append(rid)
        if label is not None:
            out.labels.append(label)
    return out

"""The held-out prompts of the ``evaluate`` stage: every set read into rows with an ``eval_id``
(``<set>/<prompt_id>``), ``limit`` of them spread evenly over each file. Read by the stage (its
first phase) and by ``guard`` (before training stages, to keep eval prompts out of training data).
"""
from __future__ import annotations

import pyarrow as pa

from workflows.core.stage import MESSAGES
from workflows.evaluate.config import EvaluateConfig
from workflows.prompt_sources import PromptsConfig, iter_prompt_rows

PROMPTS_SCHEMA = pa.schema([("eval_id", pa.string()), ("set", pa.string()), ("kind", pa.string()),
                            ("prompt_id", pa.string()), ("messages", MESSAGES)])


def spread(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k`` is None or ≥ n): a
    limited evaluation still sees every category of a set grouped by category."""
    if k is None or k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]


def load_prompts(cfg: EvaluateConfig) -> tuple[list[dict], list[dict]]:
    """(prompt rows, error rows) of every set, ``limit`` records spread evenly over each file; an
    error row's id is ``<set>/row:<file>:<n>``."""
    rows, errors, seen = [], [], set()
    for s in cfg.sets:
        limit = s.limit if s.limit is not None else cfg.limit
        column, label_field, _ = s.reading()
        pc = PromptsConfig(path=s.location(), field=column, source=s.name, label_field=label_field)
        pc.validate(f"evaluate.sets[{s.name}]")
        records = list(iter_prompt_rows(pc))
        for r in (records[i] for i in spread(len(records), limit)):
            name, kind = (s.name, s.kind) if r["_error"] is not None else s.kind_of(r.get("_label"))
            eid = f"{name}/{r['prompt_id']}"
            if r["_error"] is not None:
                errors.append({"id": eid, "reason": r["_error"], "detail": r["_detail"] or ""})
            elif eid in seen:
                errors.append({"id": f"{eid}@{r['_loc']}", "reason": "duplicate", "detail": "the same prompt again"})
            else:
                seen.add(eid)
                rows.append({"eval_id": eid, "set": name, "kind": kind, "prompt_id": r["prompt_id"],
                             "messages": r["messages"]})
    return rows, errors

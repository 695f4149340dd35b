"""Held out means held out: an eval prompt that also feeds a training stage of the same recipe is
an error naming both stages (``allow_overlap: true`` on the evaluate stage to go on anyway).

The driver calls ``check_stage_outputs`` after every stage that comes before an ``evaluate``
stage, so the error comes seconds into a run (right after the prompts stage), not after training.
Any output dataset with a ``messages`` or ``prompt`` column counts; its user turns are compared
with the eval prompts, exactly and as near duplicates (``overlap.OverlapIndex``).
"""
from __future__ import annotations

from typing import Iterator

import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.errors import ConfigError
from workflows.evaluate.config import EvaluateConfig
from workflows.evaluate.eval_prompts import load_prompts
from workflows.evaluate.overlap import OverlapIndex, summarize


def eval_index(cfg: EvaluateConfig) -> OverlapIndex:
    prompts, _ = load_prompts(cfg)
    return OverlapIndex({p["eval_id"]: p["messages"][-1]["content"] for p in prompts})


def user_turns(dataset_uri: str) -> Iterator[tuple[str, str]]:
    """(row id, user text) of every user turn in a dataset's ``messages`` or ``prompt`` column."""
    for f in storage.list_files(dataset_uri, ".parquet"):
        fs, path = storage.resolve(f)
        pf = pq.ParquetFile(path, filesystem=fs)
        col = next((c for c in ("messages", "prompt") if c in pf.schema_arrow.names), None)
        if col is None:
            return
        rid = next((c for c in ("prompt_id", "pair_id", "id") if c in pf.schema_arrow.names), None)
        for batch in pf.iter_batches(columns=[col] + ([rid] if rid else [])):
            ids = batch.column(rid).to_pylist() if rid else [""] * batch.num_rows
            for i, turns in zip(ids, batch.column(col).to_pylist()):
                for t in turns or []:
                    if t["role"] == "user":
                        yield i, t["content"]


def check_stage_outputs(index: OverlapIndex, eval_stage: str, stage: str, datasets: dict[str, str]) -> None:
    for name, uri in datasets.items():
        if not storage.exists(uri):
            continue
        found = index.scan(user_turns(uri))
        if found:
            s = summarize(found, len(index.sizes))
            o = found[0]
            raise ConfigError(f"stage {eval_stage}", f"{s['exact']} eval prompt(s) appear exactly and {s['near']} nearly "
                              f"in the training data of stage {stage!r} ({name}), e.g. {o.eval_id} ~ {o.train_id} "
                              f"({o.kind}, similarity {o.similarity})",
                              "evaluate on prompts the run never trains on (other sets or files), or set "
                              "allow_overlap: true on the evaluate stage")

"""The ``prompts`` stage: read user prompts (any supported source) into the ``prompts``
dataset; unusable records and duplicate prompts go to ``errors`` with their location."""
from __future__ import annotations

import time

import pyarrow as pa

from workflows.core import stage, storage, summary
from workflows.core.reconcile import ReconcileError
from workflows.core.stage import MESSAGES, StageContext
from workflows.prompt_sources import PromptsConfig, read_prompts

PROMPTS_SCHEMA = pa.schema([("prompt_id", pa.string()), ("messages", MESSAGES), ("source", pa.string())])


route = stage.select_route("prompts", PROMPTS_SCHEMA)


def run(cfg: PromptsConfig, ctx: StageContext) -> dict:
    started = time.time()
    storage.delete(ctx.path(stage.RAW))  # cheap to redo whole; partial raw rows have no stable ids
    raw_fs, raw_path = storage.resolve(ctx.path(stage.RAW))
    read_prompts(cfg).write_parquet(raw_path, filesystem=raw_fs, min_rows_per_file=stage.ROWS_PER_FILE)
    fin = stage.finalize(ctx.dir, ctx.name, "prompt_id", route, ["prompts"], on_duplicate="error", budget=ctx.budget)
    records = stage.num_rows(ctx.path(stage.RAW))
    if records != fin.outputs + fin.errors:
        raise ReconcileError(f"stage {ctx.name}: {records} records read but {fin.outputs} prompts + "
                             f"{fin.errors} errors written")
    tags = sorted(stage.column_counts(ctx.path("prompts"), "source").items(), key=lambda kv: (-kv[1], kv[0]))
    headline = "prompts by source: " + (", ".join(f"{k} {n}" for k, n in tags) or "none")
    info = stage.reconcile_and_mark(ctx, fin, started,
                                    {"records": records, "source": cfg.path, "headline": headline})
    summary.write_stage_summary(ctx, info)
    return info

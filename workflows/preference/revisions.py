"""Revision pairs: preference rows from an SL-CAI dataset, no judge needed.

Each ``sl_cai`` row (prompt, initial answer, critique/revision rounds, final answer) becomes one
preference row with the **final revision as chosen** and the **initial answer as rejected** —
the source of DPO pairs in the Hugging Face Constitutional AI replication. A row of a
``keep_initial_sources`` prompt (benign but edgy: revised, but its SFT target stays the first
answer) is the other way round: the **first answer chosen** over its needless revision. The rows carry
``source: "revision"``, ``judge: "revision"``, the rounds' principle ids and ``p_chosen`` from the
config (1.0 by default; lower it to soften the label for cDPO or the reward model's soft loss).

They can stand alone (the ``revision_pairs`` stage's dataset fed straight to ``dpo`` or
``reward``, when the judge is too weak to trust) or be mixed with AI and human labels by ratio
(the ``preference`` stage's ``revisions:``).

Reconcile: every sl_cai row is a pair, a skipped row or an error row (same ``prompt_id``): skipped
``not_revised`` (no rounds: a source the recipe's ``revise_sources`` left alone, so on purpose);
errors ``unchanged`` (the revision equals the initial answer) or ``missing_response``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from workflows.core import stage, storage, summary
from workflows.core.stage import StageContext
from workflows.core.typed import check_fields
from workflows.judging.human import PREFERENCES_SCHEMA, preference_row

OUTPUT = "revision_pairs"
SKIP_REASONS = ("not_revised",)  # the recipe said so: counted and kept in `skipped`, not in `errors`
JUDGE = SOURCE = "revision"
RAW_SCHEMA = pa.schema([*PREFERENCES_SCHEMA, ("_error", pa.string()), ("_detail", pa.string())])


@dataclass
class RevisionPairsConfig:
    """Pairs from SL-CAI revisions: chosen = final revision, rejected = initial answer."""

    input: str = "sl_cai"  # dataset name of an earlier critique_revision stage, or a parquet directory
    p_chosen: float = 1.0  # the label's confidence: 1.0 hard, e.g. 0.9 for a softer target

    def validate(self, where: str) -> None:
        check_fields(self, where, [
            ("input", not self.input.strip(), "name the sl_cai dataset, e.g. input: sl_cai"),
            ("p_chosen", not 0.5 < self.p_chosen <= 1.0, "use a confidence above 0.5 and at most 1.0, e.g. 1.0"),
        ])


def revision_pair(row: dict, p_chosen: float = 1.0) -> dict:
    """One sl_cai row → one raw row: a preference row, or an error row (``_error`` set)."""
    initial, final, rounds = row.get("initial_response"), row.get("final_response"), row.get("rounds") or []
    error = None
    if not (initial or "").strip() or not (final or "").strip():
        error = ("missing_response", "the sl_cai row has no initial or no final answer")
    elif not rounds:
        error = ("not_revised", f"source {row.get('source')!r} was not revised (critique_revision revise_sources)")
    elif initial.strip() == (rounds[-1].get("revision") or "").strip():
        error = ("unchanged", "the revision is the same as the initial answer")
    if error:
        empty = {name: None for name in PREFERENCES_SCHEMA.names}
        return {**empty, "prompt_id": row["prompt_id"], "_error": error[0], "_detail": error[1]}
    # the SFT target is chosen; the other answer rejected (a kept first answer beats its revision)
    rejected = initial if final.strip() != initial.strip() else rounds[-1]["revision"]
    out = preference_row(row["messages"], final, rejected, p_chosen, principle_ids=[r["principle_id"] for r in rounds],
                         judge=JUDGE, order_agreement=None, source=SOURCE)
    return {**out, "prompt_id": row["prompt_id"], "_error": None, "_detail": None}


def split_pairs(rows: list[dict], p_chosen: float, stage_name: str) -> tuple[list[dict], list[dict]]:
    """sl_cai rows → (preference rows, error rows ``{id, stage, reason, detail}``), for callers that
    mix revision pairs in without a stage of their own (the ``preference`` stage's ``revisions``)."""
    pairs, errors = [], []
    for r in (revision_pair(x, p_chosen) for x in rows):
        if r["_error"]:
            errors.append({"id": r["prompt_id"], "stage": stage_name, "reason": r["_error"], "detail": r["_detail"]})
        else:
            pairs.append({k: r[k] for k in PREFERENCES_SCHEMA.names})
    return pairs, errors


route = stage.select_route(OUTPUT, PREFERENCES_SCHEMA)


def run(cfg: RevisionPairsConfig, ctx: StageContext) -> dict:
    """Stream the sl_cai dataset into raw rows, then finalize and reconcile (one pair per row)."""
    started = time.time()
    input_uri = ctx.input(cfg.input) if "/" not in cfg.input else cfg.input
    storage.delete(ctx.path(stage.RAW))  # cheap to redo whole
    for k, uri in enumerate(storage.list_files(input_uri, ".parquet")):
        fs, path = storage.resolve(uri)
        for j, batch in enumerate(pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=8192)):
            rows = batch.to_pylist()
            raw = pa.Table.from_pylist([revision_pair(r, cfg.p_chosen) for r in rows], schema=RAW_SCHEMA)
            _write_raw(ctx, f"part-{k:05d}-{j:05d}.parquet", raw)
    fin = stage.finalize(ctx.dir, ctx.name, "prompt_id", route, [OUTPUT], inputs=stage.ids_in(input_uri, "prompt_id"),
                         budget=ctx.budget, skip_reasons=SKIP_REASONS)
    info = stage.reconcile_and_mark(ctx, fin, started, {"input": cfg.input, "p_chosen": cfg.p_chosen})
    summary.write_stage_summary(ctx, info)
    return info


def _write_raw(ctx: StageContext, name: str, table: pa.Table) -> None:
    storage.makedirs(ctx.path(stage.RAW))
    fs, path = storage.resolve(ctx.path(stage.RAW, name))
    pq.write_table(table, path, filesystem=fs)

"""RL-CAI preference labeling: prompts → K samples → pairs → AI labels (+ human data) → ``preferences``.

Two phases, each a pure per-batch program over any ``Engine`` (unit-tested with fakes), run
in a Ray Data actor pool by ``pool.stream_through_pool`` (resumable raw rows): sampling is this
stage's (``preference.batch``), judging is shared (``workflows.judging``: ``batch.judge_pairs``
in the ``workers.JudgeWorker`` pool, the same one the gold gate and the evaluate stage use):

(a) sampling, ``sample_pairs``: K responses per prompt from the policy (one ``generate``
    call per batch), pairs chosen by ``pairwise.select_pairs`` → ``pairs`` (pair_id,
    prompt_id, messages, response_a, response_b). Raw rows: ``<stage>/_raw`` (one per prompt).
(b) judging, ``judge_pairs``: per pair, ``principles_per_pair`` principles from
    ``sample_principles(constitution, pair_id, m, seed)``, both orders, every judge; each
    judgment is P(A) from ``choice_logprobs`` over ``CHOICES`` (CoT: reasoning generated
    first) and goes through the label cache; ``label_pair`` → ``to_preference`` →
    ``preference_row(source="ai")``. Raw rows: ``<stage>/_judging/_raw`` (one per pair).
    Unparseable or degenerate judgments are error rows, never coin flips.

Two optional paths around them:

- Existing pairs (``pairs_from``): phase (a) is not run and no policy engine is built;
  ``judging.pairs.read_pairs_file`` streams every record of the file (prompt/chosen/rejected, HH transcripts,
  or prompt + response_a/response_b) into a ``pairs`` row or an error row (stage
  "<name>:pairs": missing field, empty or identical responses, ``duplicate`` pair). A
  chosen/rejected row's chosen answer becomes (A) or (B) by a hash of its pair id, and its
  choice is kept: ``dataset_agreement`` in ``_SUCCESS`` and report.md scores the AI labels
  against it (``agreement.agreement_report``). ``input`` is unused.
- Gold gate (``gold``): before any pair is sampled or read, ``workers.judge_gold`` has the judges
  label the human-labeled gold pairs with exactly these judging settings in ``<stage>/_gold/``
  (chosen shown as (A) or (B) by hash). Agreement with the human choice (Wilson 95% interval),
  position bias (share of pairs whose two orders disagree) and unparseable count go into
  ``_SUCCESS`` under ``gold``, the report and the summary. Below ``min_agreement``,
  ``on_gold_fail: stop`` raises ``gold.GoldGateError`` (one line: figures, threshold, fix) and
  forgets the stage's config, so a re-run with a better judge starts afresh; ``warn`` prints
  one warning line and goes on.

Reconcile (before ``_SUCCESS``), exactly:
  sampling  {prompt_id of pairs} ∪ ids(errors, stage "<name>:sampling") = ids(prompts), disjoint
            (a prompt is done when it made ≥ 1 pair, or it is an error with its prompt_id);
            pair ids are unique.
  pairs     (with ``pairs_from``) records kept as pairs ∪ ids(errors, stage "<name>:pairs") =
            ids(records of the file, ``<file>:<row>``), disjoint; pair ids are unique.
  judging   ids(AI labels) ∪ ids(errors, stage "<name>:judging") = ids(pairs), disjoint.
  gold      ids(gold labels) ∪ ids(``_gold/errors``) = ids(gold pairs), disjoint.
Informational error rows, not part of any equation: stage "<name>:samples" (a failed
sample ``<prompt_id>/sample-<k>``, or a group of identical samples with id
``pair_id(prompt_id, text, text)`` and reason ``duplicate_responses``, of a prompt that still
made pairs) and "<name>:human" (unusable human rows). All AI labels, before mixing, stay in
``<stage>/_judging/labels``; ``preferences`` mixes them by ratio with human rows (``human``) and
revision pairs (``revisions``: an SL-CAI revision chosen over its initial answer) when set.

Label cache: ``<run_dir>/label_cache/`` (or ``cache_uri``), keyed by ``pairwise.cache_key``
(prompt, ordered responses, principle text, judge identity, template, CoT): an on-disk store all
actors share (``judging.label_cache``). Each judging actor looks up a whole block's keys at once,
seeing what other actors flushed in earlier blocks; the driver compacts it during judging and in
full at the end; a re-run over the same pairs (or gold pairs) calls no judge. Tests and
benchmarks may swap every engine for their own with ``engine_factory: "module:callable"``
(EngineConfig → Engine). Outputs, plots and the report are written by ``workflows.preference.report``.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors import pool
from workflows.core.constitution import Constitution, load_constitution
from workflows.core import console, stage, storage
from workflows.core.reconcile import ReconcileError, duplicated
from workflows.core.stage import ERRORS_SCHEMA, MESSAGES, StageContext
from workflows.core.typed import from_dict
from workflows.judging import agreement, gold
from workflows.judging.config import PreferenceConfig, judge_id
from workflows.judging.human import PREFERENCES_SCHEMA
from workflows.judging.label_cache import compacting
from workflows.judging.pairs import DATASET_LABELS, LabelsAt, PairsOut, read_pairs_file
from workflows.judging.workers import (
    LABELS,
    PAIRS_SCHEMA,
    JudgeWorker,
    cache_location,
    gate_judge,
    judge_kwargs,
    judge_pool,
    route_labels,
    worker_config,
)
from workflows.preference import report
from workflows.preference.batch import sample_pairs
from workflows.preference.revisions import split_pairs
from workflows.stats import wilson

JUDGING, NOTES, SAMPLED = "_judging", "_sample_notes", "_sampled.json"
_PAIR = pa.struct([("pair_id", pa.string()), ("response_a", pa.string()), ("response_b", pa.string())])
_NOTE = pa.struct([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
_I64 = pa.int64()
SAMPLE_RAW_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", MESSAGES), ("source", pa.string()), ("pairs", pa.list_(_PAIR)),
    ("notes", pa.list_(_NOTE)), ("_error", pa.string()), ("_detail", pa.string()), ("_samples", _I64),
    ("_failed_samples", _I64), ("_duplicate_groups", _I64), ("_pairs", _I64), ("_policy_calls", _I64),
    ("_gen_tokens", _I64), ("_prompt_tokens", _I64)])


# ---------------------------------------------------------------- Ray workers and routes

class SampleWorker:
    """Ray Data actor-pool UDF: one policy engine per actor, ``sample_pairs`` per batch."""

    def __init__(self, cfg: dict, seed: int, engines_dir: tuple | None = None):
        self.cfg = from_dict(PreferenceConfig, cfg)
        self.engine = pool.start_engine(self.cfg.policy, engines_dir, self.cfg.engine_factory)
        self.seed = seed

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = sample_pairs(self.engine, table.to_pylist(), self.cfg, self.seed)
        return pa.Table.from_pylist(rows, schema=SAMPLE_RAW_SCHEMA)


class SamplingRoute:
    """Good sampling raw rows → ``pairs`` (one row per pair) and ``_sample_notes`` (errors schema)."""

    def __init__(self, stage_name: str):
        self.stage_name, self.schemas = stage_name, {"pairs": PAIRS_SCHEMA, NOTES: ERRORS_SCHEMA}

    def __call__(self, good: pa.Table) -> dict[str, pa.Table]:
        if good.num_rows == 0:
            return {name: s.empty_table() for name, s in self.schemas.items()}
        g = good.combine_chunks()
        empty = g.filter(pc.equal(pc.list_value_length(g["pairs"]), 0))
        if empty.num_rows:  # a good sampling row is a prompt that made pairs; one that made none is an error row
            raise ReconcileError(f"stage {self.stage_name}:sampling: {empty.num_rows} prompts made no pair but are "
                                 f"not errors (e.g. {', '.join(empty['prompt_id'].to_pylist()[:3])}) — a bug in sampling")
        pairs, parents = _explode(g["pairs"].chunk(0))
        notes, _ = _explode(g["notes"].chunk(0))
        return {"pairs": pa.table([pairs.field("pair_id"), g["prompt_id"].take(parents), g["messages"].take(parents),
                                   pairs.field("response_a"), pairs.field("response_b")], schema=PAIRS_SCHEMA),
                NOTES: pa.table([notes.field("id"), pa.array([f"{self.stage_name}:samples"] * len(notes)),
                                 notes.field("reason"), notes.field("detail")], schema=ERRORS_SCHEMA)}


def _explode(lists: pa.ListArray) -> tuple[pa.StructArray, pa.Array]:
    flat = pc.list_flatten(lists)
    return pa.StructArray.from_arrays([pc.struct_field(flat, f.name) for f in flat.type],
                                      fields=list(flat.type)), pc.list_parent_indices(lists)


# ---------------------------------------------------------------- the stage

@dataclass
class MadePairs:
    """Phase (a)'s outcome, sampled or read from ``pairs_from``: what judging and the report need."""

    phase: str  # "sampling" or "pairs_from": its key in _SUCCESS "phases"
    inputs: int  # prompts, or records of the pairs file
    pairs: int  # rows of ``pairs`` (unique pair ids)
    errors: int
    errors_by_reason: dict
    metrics: dict
    figures: dict  # _SUCCESS "phases"[phase]
    dataset_labels: LabelsAt | None = None  # the file's own choices (chosen/rejected rows), written


def _check_pairs(ctx: StageContext) -> int:
    """The pair ids of ``pairs`` are unique (spilled, exact); returns how many there are."""
    ids = stage.ids_in(ctx.path("pairs"), "pair_id")
    n, examples = duplicated(ids, ctx.budget)
    if n:
        raise ReconcileError(f"stage {ctx.name}: {n} pair ids occur more than once in {ctx.path('pairs')} "
                             f"(e.g. {', '.join(examples[:3])}) — a bug in sampling")
    return ids.rows


def sample(cfg: PreferenceConfig, ctx: StageContext) -> MadePairs:
    """Phase (a) by sampling: K responses per prompt from the policy, pairs chosen → ``pairs``.
    Reconciled: prompts = prompts that made pairs ∪ prompts in errors (each good prompt made at
    least one pair: ``SamplingRoute`` checks), and the pair ids are unique. ``_sampled.json``,
    written last, lets a resumed stage go straight to judging without reading the phase again."""
    done = ctx.path(SAMPLED)
    if storage.exists(done):
        made = storage.read_json(done, f"delete it (sampling is finalized again from its saved rows), or rerun "
                                       f"with --restart-from {ctx.name}")
        console.say(f"[{ctx.name}] sampling already finished ({made['pairs']} pairs from {made['inputs']} prompts)")
        return MadePairs("sampling", **made)
    started = time.time()
    prompts_uri = ctx.input(cfg.input) if "/" not in cfg.input else cfg.input
    pool.stream_through_pool(ctx, prompts_uri, "prompt_id", SampleWorker, cfg.policy,
                             dict(cfg=worker_config(cfg), seed=ctx.seed), checkpoint_rows=cfg.checkpoint_rows,
                             check=not cfg.engine_factory, label=f"{ctx.name}: sampling")
    fin = stage.finalize(ctx.dir, f"{ctx.name}:sampling", "prompt_id", SamplingRoute(ctx.name), ["pairs", NOTES],
                         inputs=stage.ids_in(prompts_uri, "prompt_id"), budget=ctx.budget)
    n_pairs = _check_pairs(ctx)
    figures = {"prompts": fin.rec.inputs, "prompt_errors": fin.errors, "pairs": n_pairs,
               "seconds": round(time.time() - started, 2)}
    made = MadePairs("sampling", fin.rec.inputs, n_pairs, fin.errors, fin.errors_by_reason, fin.metrics, figures)
    storage.write_json(done, {k: v for k, v in vars(made).items() if k not in ("phase", "dataset_labels")})
    return made


def read_pairs(cfg: PreferenceConfig, ctx: StageContext) -> MadePairs:
    """Phase (a) from ``pairs_from``: no policy; every record of the file becomes a ``pairs`` row
    or an ``errors`` row (stage ``<name>:pairs``), reconciled: ids(records) = pairs ∪ errors; the
    file's own choices go to ``_dataset_labels``. Streamed, in the memory of ``ctx.budget``."""
    started = time.time()
    out = PairsOut(ctx.path("pairs"), ctx.path("errors"), ctx.path(DATASET_LABELS))
    got = read_pairs_file(cfg.pairs_from, f"{ctx.name}:pairs", out, ctx.budget)
    figures = {"file": cfg.pairs_from, "rows": got.rows, "row_errors": got.errors, "pairs": got.pairs,
               "with_dataset_label": got.labels, "seconds": round(time.time() - started, 2)}
    return MadePairs("pairs_from", got.rows, got.pairs, got.errors, got.errors_by_reason, {}, figures,
                     LabelsAt(out.labels, got.labels, ctx.budget) if got.labels else None)


def judge(cfg: PreferenceConfig, ctx: StageContext, constitution: Constitution) -> tuple[StageContext, stage.Finalized]:
    """Phase (b): every pair of ``pairs`` judged in ``<stage>/_judging``, reconciled against them."""
    jctx = StageContext(ctx.dir, JUDGING, ctx.seed, budget=ctx.budget)
    cache_uri = cache_location(cfg, ctx)
    # the driver is the label cache's only compactor: new entries folded every 30 s, and in full at the end
    with compacting(cache_uri) if cache_uri else contextlib.nullcontext():
        pool.stream_through_pool(jctx, ctx.path("pairs"), "pair_id", JudgeWorker, judge_pool(cfg.judges),
                                 judge_kwargs(cfg, ctx, constitution), checkpoint_rows=cfg.checkpoint_rows,
                                 check=not cfg.engine_factory, label=f"{ctx.name}: judging")
    fin = stage.finalize(jctx.dir, f"{ctx.name}:judging", "pair_id", route_labels, [LABELS],
                         inputs=stage.ids_in(ctx.path("pairs"), "pair_id"), budget=ctx.budget)
    return jctx, fin


def dataset_agreement(labels_uri: str, dataset_labels: LabelsAt | None) -> dict | None:
    """How often the AI labels pick the answer the pairs file itself prefers
    (``agreement.dataset_agreement``, streamed: the figures of ``agreement_report``; accuracy with
    its Wilson 95% interval). None without such labels."""
    if not dataset_labels:
        return None
    r = agreement.dataset_agreement(labels_uri, dataset_labels.uri, dataset_labels.budget)
    ci = wilson(r["n_correct"], r["n_matched"])
    return {**{k: v for k, v in r.items() if k != "bins"}, "accuracy_lo": ci.lo if r["n_matched"] else None,
            "accuracy_hi": ci.hi if r["n_matched"] else None}


def run(cfg: PreferenceConfig, ctx: StageContext) -> dict:
    """Gold gate (if set), pairs (sampled, or read from ``pairs_from``), judging, then ``pairs``,
    ``preferences``, ``errors``, the report and ``_SUCCESS``."""
    started = time.time()
    cfg = replace(cfg, policy=replace(cfg.policy, model=ctx.resolve(cfg.policy.model)),
                  judges=[replace(j, model=ctx.resolve(j.model)) for j in cfg.judges])  # e.g. `model: sft_model`
    constitution = load_constitution(cfg.constitution)
    given = {}
    if cfg.human:
        given["human"] = (*report.load_human_data(cfg.human, ctx.name), cfg.human.ratio)  # fail fast
    if cfg.revisions:
        given["revision"] = (*load_revisions(cfg.revisions, ctx), cfg.revisions.ratio)
    fresh = not stage.raw_files(ctx.dir) and not storage.exists(ctx.path(JUDGING))
    gold_info = gate_judge(cfg, ctx, constitution, fresh) if cfg.gold else None  # before any pair is made
    made = read_pairs(cfg, ctx) if cfg.pairs_from else sample(cfg, ctx)
    judging_started = time.time()
    jctx, fin = judge(cfg, ctx, constitution)
    judged = time.time()
    n_pairs, n_pair_errors = made.pairs, fin.errors
    out = report.assemble(ctx, jctx.path(LABELS), NOTES, jctx.path("errors"), given)
    m = {**made.metrics, **fin.metrics}
    info = {
        "stage": ctx.name, "inputs": made.inputs, "outputs": fin.outputs, "errors": made.errors + n_pair_errors,
        "datasets": {"pairs": n_pairs, "preferences": out["preferences"], "errors": out["errors"]},
        "errors_by_reason": _merge_counts(made.errors_by_reason, fin.errors_by_reason),
        "notes_by_reason": out["notes_by_reason"], "metrics": m, "config_hash": ctx.config_hash,
        "seconds": round(time.time() - started, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cache_hits": int(m.get("_cache_hits", 0)), "cache_misses": int(m.get("_cache_misses", 0)),
        "engine_calls": {"sampling": int(m.get("_policy_calls", 0)), "judging": int(m.get("_judge_calls", 0))},
        "judgments": int(m.get("_judgments", 0)), "cache_uri": cache_location(cfg, ctx),
        "unreadable_files": stage.unreadable_files(ctx.dir, *filter(None, [cache_location(cfg, ctx)])),
        "phases": {made.phase: made.figures,
                   "judging": {"pairs": n_pairs, "labeled": fin.outputs, "errors": n_pair_errors,
                               "seconds": round(judged - judging_started, 2),
                               "pairs_per_s": round(n_pairs / max(judged - judging_started, 1e-9), 3)}},
        "mix": out["mix"], "labels": out["stats"].summary(), "constitution": constitution.name,
        "policy": None if cfg.pairs_from else f"{cfg.policy.backend}:{cfg.policy.model}",
        "pairs_from": cfg.pairs_from, "judges": [judge_id(j) for j in cfg.judges],
        "engines": pool.engines_used(ctx.dir, jctx.dir, *([ctx.path(gold.GOLD)] if gold_info else [])),
        "principles_per_pair": cfg.principles_per_pair, "both_orders": cfg.both_orders, "cot": cfg.cot,
        "gold": gold_info, "dataset_agreement": dataset_agreement(jctx.path(LABELS), made.dataset_labels),
        "report": "report.md"}
    report.write_report(ctx, info, out["stats"])
    stage.write_success(ctx.dir, info)
    report.write_summary(ctx, info)
    return info


def load_revisions(rev, ctx: StageContext) -> tuple[list[dict], list[dict]]:
    """(rows, error rows) of ``revisions.input``: a revision_pairs dataset as it is, or an sl_cai
    dataset turned into revision pairs here (rows that make none are errors ``<name>:revisions``)."""
    uri = ctx.input(rev.input) if "/" not in rev.input else rev.input
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs)
    if "final_response" not in table.column_names:
        return table.select(PREFERENCES_SCHEMA.names).to_pylist(), []
    return split_pairs(table.to_pylist(), rev.p_chosen, f"{ctx.name}:revisions")


def _merge_counts(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out

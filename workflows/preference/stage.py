"""RL-CAI preference labeling: prompts → K samples → pairs → AI labels (+ human data) → ``preferences``.

Two phases, each a pure per-batch program over any ``Engine`` (unit-tested with fakes), run
in a Ray Data actor pool by ``engine_pool.stream_through_pool`` (resumable raw rows):

(a) sampling, ``sample_pairs``: K responses per prompt from the policy (one ``generate``
    call per batch), pairs chosen by ``judging.select_pairs`` → ``pairs`` (pair_id,
    prompt_id, messages, response_a, response_b). Raw rows: ``<stage>/_raw`` (one per prompt).
(b) judging, ``judge_pairs``: per pair, ``principles_per_pair`` principles from
    ``sample_principles(constitution, pair_id, m, seed)``, both orders, every judge; each
    judgment is P(A) from ``choice_logprobs`` over ``CHOICES`` (CoT: reasoning generated
    first) and goes through the label cache; ``label_pair`` → ``to_preference`` →
    ``preference_row(source="ai")``. Raw rows: ``<stage>/_judging/_raw`` (one per pair).
    Unparseable or degenerate judgments are error rows, never coin flips.

Reconcile (before ``_SUCCESS``), exactly:
  sampling  {prompt_id of pairs} ∪ ids(errors, stage "<name>:sampling") = ids(prompts), disjoint
            (a prompt is done when it made ≥ 1 pair, or it is an error with its prompt_id);
            pair ids are unique.
  judging   ids(AI labels) ∪ ids(errors, stage "<name>:judging") = ids(pairs), disjoint.
Informational error rows, not part of either equation: stage "<name>:samples" (a failed
sample ``<prompt_id>/sample-<k>``, or a group of identical samples with id
``pair_id(prompt_id, text, text)`` and reason ``duplicate_responses``, of a prompt that still
made pairs) and "<name>:human" (unusable human rows). All AI labels, before mixing, stay in
``<stage>/_judging/labels``; ``preferences`` mixes them with human rows when ``human`` is set.

Label cache: ``<run_dir>/label_cache/`` (or ``cache_uri``), keyed by ``judging.cache_key``
(prompt, ordered responses, principle text, judge identity, template, CoT). Each judging
actor loads it once; a re-run over the same pairs calls no judge. Tests and benchmarks may
swap every engine for their own with ``engine_factory: "module:callable"`` (EngineConfig →
Engine). Outputs, plots and the report are written by ``workflows.preference.report``.
"""
from __future__ import annotations

import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from actors import EngineConfig
from workflows.constitution import Constitution, load_constitution
from workflows.core import engine_pool, stage, storage, summary
from workflows.core.reconcile import ReconcileError, check
from workflows.core.stage import ERRORS_SCHEMA, MESSAGES, StageContext
from workflows.core.typed import from_dict, to_dict
from workflows.preference import report
from workflows.preference.batch import HumanData, PreferenceConfig, judge_id, judge_pairs, sample_pairs  # noqa: F401
from workflows.preference.human import PREFERENCES_SCHEMA
from workflows.preference.label_cache import LabelCache

JUDGING, NOTES, LABELS = "_judging", "_sample_notes", "labels"
_PAIR = pa.struct([("pair_id", pa.string()), ("response_a", pa.string()), ("response_b", pa.string())])
_NOTE = pa.struct([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])
_I64 = pa.int64()
SAMPLE_RAW_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", MESSAGES), ("source", pa.string()), ("pairs", pa.list_(_PAIR)),
    ("notes", pa.list_(_NOTE)), ("_error", pa.string()), ("_detail", pa.string()), ("_samples", _I64),
    ("_failed_samples", _I64), ("_duplicate_groups", _I64), ("_pairs", _I64), ("_policy_calls", _I64),
    ("_gen_tokens", _I64), ("_prompt_tokens", _I64)])
PAIRS_SCHEMA = pa.schema([("pair_id", pa.string()), ("prompt_id", pa.string()), ("messages", MESSAGES),
                          ("response_a", pa.string()), ("response_b", pa.string())])
LABELS_SCHEMA = pa.schema([*PREFERENCES_SCHEMA, ("principle_p_chosen", pa.list_(pa.float64())),
                           ("principle_agree", pa.list_(pa.bool_()))])
JUDGE_RAW_SCHEMA = pa.schema([*LABELS_SCHEMA, ("_error", pa.string()), ("_detail", pa.string()),
                              ("_judgments", _I64), ("_cache_hits", _I64), ("_cache_misses", _I64),
                              ("_judge_calls", _I64)])


# ---------------------------------------------------------------- Ray workers and routes

class SampleWorker:
    """Ray Data actor-pool UDF: one policy engine per actor, ``sample_pairs`` per batch."""

    def __init__(self, cfg: dict, seed: int, engines_dir: tuple | None = None):
        self.cfg = from_dict(PreferenceConfig, cfg)
        self.engine = engine_pool.start_engine(self.cfg.policy, engines_dir, self.cfg.engine_factory)
        self.seed = seed

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = sample_pairs(self.engine, table.to_pylist(), self.cfg, self.seed)
        return pa.Table.from_pylist(rows, schema=SAMPLE_RAW_SCHEMA)


class ActorCache:
    """The label cache as one actor uses it: loaded once at start (read-only), each batch's new
    labels written as one new shard by a fresh writer, so actor memory does not grow."""

    def __init__(self, uri: str):
        self.uri, self.reader = uri, LabelCache(uri)
        self.reader.load()
        self.writer = LabelCache(uri)

    def get(self, key: str) -> dict | None:
        return self.reader.get(key)

    def put_many(self, values: dict) -> None:
        self.writer.put_many(values)

    def flush(self) -> None:
        self.writer.flush()
        self.writer = LabelCache(self.uri)


class LazyEngine:
    """A judge engine built on first use, so batches the label cache answers whole load no model.
    ``name`` is the engine's own (``<backend>:<model label>``) without building it."""

    def __init__(self, cfg: EngineConfig, factory: str | None, engines_dir: tuple | None = None):
        self.cfg, self.factory, self.engines_dir = cfg, factory, engines_dir
        # a factory's engine names itself, so it is built now
        self._engine = engine_pool.start_engine(cfg, engines_dir, factory) if factory else None
        if self._engine is not None:
            self.name = self._engine.name
        elif cfg.backend == "openai":
            self.name = f"openai:{cfg.model}"
        else:
            from actors.models import resolve_model  # fails here, at actor start, on a bad model spec

            self.name = f"{cfg.backend}:{resolve_model(cfg.model).label}"

    def _get(self):
        if self._engine is None:
            self._engine = engine_pool.start_engine(self.cfg, self.engines_dir, self.factory)
        return self._engine

    def generate(self, conversations, params):
        return self._get().generate(conversations, params)

    def choice_logprobs(self, conversations, choices):
        return self._get().choice_logprobs(conversations, choices)


class JudgeWorker:
    """Ray Data actor-pool UDF: every judge engine in each actor, ``judge_pairs`` per batch."""

    def __init__(self, cfg: dict, constitution: Constitution, seed: int, cache_uri: str | None,
                 engines_dir: tuple | None = None):
        self.cfg = from_dict(PreferenceConfig, cfg)
        self.judges = [(LazyEngine(j, self.cfg.engine_factory, engines_dir), judge_id(j)) for j in self.cfg.judges]
        self.constitution, self.seed = constitution, seed
        self.cache = ActorCache(cache_uri) if cache_uri else None

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = judge_pairs(self.judges, table.to_pylist(), self.cfg, self.constitution, self.seed, self.cache)
        if self.cache is not None:
            self.cache.flush()  # before the raw rows: a label is never lost once its row is written
        return pa.Table.from_pylist(rows, schema=JUDGE_RAW_SCHEMA)


class SamplingRoute:
    """Good sampling raw rows → ``pairs`` (one row per pair) and ``_sample_notes`` (errors schema)."""

    def __init__(self, stage_name: str):
        self.stage_name, self.schemas = stage_name, {"pairs": PAIRS_SCHEMA, NOTES: ERRORS_SCHEMA}

    def __call__(self, good: pa.Table) -> dict[str, pa.Table]:
        if good.num_rows == 0:
            return {name: s.empty_table() for name, s in self.schemas.items()}
        g = good.combine_chunks()
        pairs, parents = _explode(g["pairs"].chunk(0))
        notes, _ = _explode(g["notes"].chunk(0))
        return {"pairs": pa.table([pairs.field("pair_id"), g["prompt_id"].take(parents), g["messages"].take(parents),
                                   pairs.field("response_a"), pairs.field("response_b")], schema=PAIRS_SCHEMA),
                NOTES: pa.table([notes.field("id"), pa.array([f"{self.stage_name}:samples"] * len(notes)),
                                 notes.field("reason"), notes.field("detail")], schema=ERRORS_SCHEMA)}


def _explode(lists: pa.ListArray) -> tuple[pa.StructArray, pa.Array]:
    import pyarrow.compute as pc

    flat = pc.list_flatten(lists)
    return pa.StructArray.from_arrays([pc.struct_field(flat, f.name) for f in flat.type],
                                      fields=list(flat.type)), pc.list_parent_indices(lists)


def route_labels(good: pa.Table) -> dict[str, pa.Table]:
    return {LABELS: good.select(LABELS_SCHEMA.names).cast(LABELS_SCHEMA)}


route_labels.schemas = {LABELS: LABELS_SCHEMA}


# ---------------------------------------------------------------- the stage

def cache_location(cfg: PreferenceConfig, ctx: StageContext) -> str | None:
    return (cfg.cache_uri or storage.join(ctx.run_dir, "label_cache")) if cfg.cache else None


def _judge_pool(judges: list[EngineConfig]) -> EngineConfig:
    """Actor sizing when every actor holds every judge: the first judge's batch size and
    concurrency, the largest CPU need, the sum of the GPU needs."""
    return replace(judges[0], num_cpus=max(j.num_cpus for j in judges), num_gpus=sum(j.num_gpus for j in judges))


def _pair_ids(ctx: StageContext, prompt_ids: list[str], fin: stage.Finalized) -> list[str]:
    """The sampling reconcile (see the module docstring); returns the pair ids (unique)."""
    fs, path = storage.resolve(ctx.path("pairs"))
    ids = pq.read_table(path, columns=["pair_id", "prompt_id"], filesystem=fs)
    pair_ids = ids["pair_id"].to_pylist()
    if len(set(pair_ids)) != len(pair_ids):
        raise ReconcileError(f"stage {ctx.name}: duplicate pair ids in {ctx.path('pairs')} — a bug in sampling")
    check(f"{ctx.name}:sampling", prompt_ids, set(ids["prompt_id"].to_pylist()), fin.error_ids)
    return pair_ids


def run(cfg: PreferenceConfig, ctx: StageContext) -> dict:
    """Sample pairs, judge them, then write ``pairs``, ``preferences``, ``errors``, the report and ``_SUCCESS``."""
    started = time.time()
    cfg = replace(cfg, policy=replace(cfg.policy, model=ctx.resolve(cfg.policy.model)),
                  judges=[replace(j, model=ctx.resolve(j.model)) for j in cfg.judges])  # e.g. `model: sft_model`
    constitution = load_constitution(cfg.constitution)
    human = report.load_human_data(cfg.human, ctx.name) if cfg.human else None  # fail fast
    prompts_uri = ctx.input(cfg.input) if "/" not in cfg.input else cfg.input
    prompt_ids = stage.ids_of(prompts_uri, "prompt_id")
    engine_pool.stream_through_pool(ctx, prompts_uri, "prompt_id", SampleWorker, cfg.policy,
                                    dict(cfg=to_dict(cfg), seed=ctx.seed), total=len(prompt_ids),
                                    checkpoint_rows=cfg.checkpoint_rows)
    fin_a = stage.finalize(ctx.dir, f"{ctx.name}:sampling", "prompt_id", SamplingRoute(ctx.name), ["pairs", NOTES])
    pair_ids = _pair_ids(ctx, prompt_ids, fin_a)
    sampled = time.time()
    jctx = StageContext(ctx.dir, JUDGING, ctx.seed)
    engine_pool.stream_through_pool(jctx, ctx.path("pairs"), "pair_id", JudgeWorker, _judge_pool(cfg.judges),
                                    dict(cfg=to_dict(cfg), constitution=constitution, seed=ctx.seed,
                                         cache_uri=cache_location(cfg, ctx)),
                                    total=len(pair_ids), checkpoint_rows=cfg.checkpoint_rows)
    fin_b = stage.finalize(jctx.dir, f"{ctx.name}:judging", "pair_id", route_labels, [LABELS])
    rec_b = check(f"{ctx.name}:judging", pair_ids, fin_b.output_ids, fin_b.error_ids)
    judged = time.time()
    n_prompts, n_pairs = len(prompt_ids), len(pair_ids)
    n_prompt_errors, n_pair_errors = len(fin_a.error_ids), len(fin_b.error_ids)
    del prompt_ids, pair_ids, fin_a.output_ids, fin_a.error_ids, fin_b.output_ids, fin_b.error_ids  # flat memory
    out = report.assemble(ctx, jctx.path(LABELS), NOTES, jctx.path("errors"), human, cfg.human)
    m = {**fin_a.metrics, **fin_b.metrics}
    info = {
        "stage": ctx.name, "inputs": n_prompts, "outputs": rec_b.outputs, "errors": n_prompt_errors + n_pair_errors,
        "datasets": {"pairs": n_pairs, "preferences": out["preferences"], "errors": out["errors"]},
        "errors_by_reason": _merge_counts(fin_a.errors_by_reason, fin_b.errors_by_reason),
        "notes_by_reason": out["notes_by_reason"], "metrics": m, "config_hash": ctx.config_hash,
        "seconds": round(time.time() - started, 2), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cache_hits": int(m.get("_cache_hits", 0)), "cache_misses": int(m.get("_cache_misses", 0)),
        "engine_calls": {"sampling": int(m.get("_policy_calls", 0)), "judging": int(m.get("_judge_calls", 0))},
        "judgments": int(m.get("_judgments", 0)), "cache_uri": cache_location(cfg, ctx),
        "phases": {"sampling": {"prompts": n_prompts, "prompt_errors": n_prompt_errors, "pairs": n_pairs,
                                "seconds": round(sampled - started, 2)},
                   "judging": {"pairs": n_pairs, "labeled": rec_b.outputs, "errors": n_pair_errors,
                               "seconds": round(judged - sampled, 2),
                               "pairs_per_s": round(n_pairs / max(judged - sampled, 1e-9), 3)}},
        "mix": out["mix"], "labels": out["stats"].summary(), "constitution": constitution.name,
        "policy": f"{cfg.policy.backend}:{cfg.policy.model}", "judges": [judge_id(j) for j in cfg.judges],
        "engines": engine_pool.engines_used(ctx.dir, jctx.dir),
        "principles_per_pair": cfg.principles_per_pair, "both_orders": cfg.both_orders, "cot": cfg.cot,
        "report": "report.md"}
    report.write_report(ctx, info, out["stats"])
    stage.write_success(ctx.dir, info)
    summary.write_stage_summary(ctx, info)
    return info


def _merge_counts(*dicts: dict) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


from workflows.preference.cli import export_uncertain, merge_labels  # noqa: E402,F401 — hybrid routing entries

"""The judging actor pool: what the ``preference`` stage's judging phase and the gold gate
(``judge_gold``, also run by the ``evaluate`` stage) share.

``JudgeWorker`` is the Ray Data actor-pool UDF: every judge engine in each actor (built on first
use, ``LazyEngine``), the shared label cache read per block (``ActorCache``), and
``judging.batch.judge_pairs`` per batch of ``PAIRS_SCHEMA`` rows → ``JUDGE_RAW_SCHEMA`` raw rows;
``route_labels`` keeps the good ones as ``LABELS`` (``LABELS_SCHEMA``). ``judge_pool`` sizes the
actors, ``judge_kwargs`` builds the worker's arguments from the stage's config. ``judge_gold``
has the judges label the gold pairs (``judging.gold``) through this pool under ``<stage>/_gold/``.
"""
from __future__ import annotations

import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from actors import EngineConfig, pool
from actors.models import resolve_model
from workflows.core.constitution import Constitution
from workflows.core import console, stage, storage
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict, to_dict
from workflows.judging.batch import judge_pairs
from workflows.judging.config import PreferenceConfig, judge_id
from workflows.judging.gold import GOLD, GoldGateError, describe, gate, gold_figures, load_gold
from workflows.judging.human import PREFERENCES_SCHEMA
from workflows.judging.label_cache import LabelCache
from workflows.judging.pairs import PAIRS_SCHEMA, labeled_pair_row

LABELS = "labels"
_I64 = pa.int64()
LABELS_SCHEMA = pa.schema([*PREFERENCES_SCHEMA, ("principle_p_chosen", pa.list_(pa.float64())),
                           ("principle_agree", pa.list_(pa.bool_()))])
JUDGE_RAW_SCHEMA = pa.schema([*LABELS_SCHEMA, ("_error", pa.string()), ("_detail", pa.string()),
                              ("_judgments", _I64), ("_cache_hits", _I64), ("_cache_misses", _I64),
                              ("_judge_calls", _I64)])


class ActorCache(LabelCache):
    """The label cache as one actor uses it: nothing read at start; each block's keys looked up in
    one ``get_many`` (the row groups of the compacted runs that can hold them, the deltas other
    actors flushed since), reading ``p_a`` only — all ``judge_pairs`` uses of a hit; each block's
    new labels written as one delta by ``flush()``. Memory stays bounded whatever the cache holds."""

    def __init__(self, uri: str):
        super().__init__(uri, fields=("p_a",))


class LazyEngine:
    """A judge engine built on first use, so batches the label cache answers whole load no model.
    ``name`` is the engine's own (``<backend>:<model label>``) without building it."""

    def __init__(self, cfg: EngineConfig, factory: str | None, engines_dir: tuple | None = None):
        self.cfg, self.factory, self.engines_dir = cfg, factory, engines_dir
        # a factory's engine names itself, so it is built now
        self._engine = pool.start_engine(cfg, engines_dir, factory) if factory else None
        if self._engine is not None:
            self.name = self._engine.name
        elif cfg.backend == "openai":
            self.name = f"openai:{cfg.model}"
        else:  # fails here, at actor start, on a bad model spec
            self.name = f"{cfg.backend}:{resolve_model(cfg.model).label}"

    def _get(self):
        if self._engine is None:
            self._engine = pool.start_engine(self.cfg, self.engines_dir, self.factory)
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


route_labels = stage.select_route(LABELS, LABELS_SCHEMA)


def cache_location(cfg: PreferenceConfig, ctx: StageContext) -> str | None:
    return (cfg.cache_uri or storage.join(ctx.run_dir, "label_cache")) if cfg.cache else None


def judge_pool(judges: list[EngineConfig]) -> EngineConfig:
    """Actor sizing when every actor holds every judge: the first judge's batch size and
    concurrency, the largest CPU need, the sum of the GPU needs."""
    return replace(judges[0], num_cpus=max(j.num_cpus for j in judges), num_gpus=sum(j.num_gpus for j in judges))


def worker_config(cfg: PreferenceConfig) -> dict:
    """The config as actors get it. The driver reads ``pairs_from`` and ``gold``; actors only
    judge rows, and validating those paths on a node without the files would fail them."""
    return to_dict(replace(cfg, pairs_from=None, gold=None))


def judge_kwargs(cfg: PreferenceConfig, ctx: StageContext, constitution: Constitution) -> dict:
    """``JudgeWorker``'s arguments: the same for the gold pairs and for the stage's pairs."""
    return dict(cfg=worker_config(cfg), constitution=constitution, seed=ctx.seed, cache_uri=cache_location(cfg, ctx))


def judge_gold(cfg: PreferenceConfig, ctx: StageContext, constitution: Constitution) -> dict:
    """Label the gold pairs of ``cfg.gold`` (a ``PreferenceConfig``) with the stage's judges and
    judging settings in an actor pool under ``<stage>/_gold/`` and return their figures
    (``gold_figures`` plus file, rows skipped, judging errors by reason, cache use, seconds).
    The directory is rebuilt on every call — the label cache makes a repeat free — so the
    figures always belong to the current gold file and judges; ``gold.json`` keeps them."""
    started = time.time()
    gctx = StageContext(ctx.dir, GOLD, ctx.seed)
    storage.delete(gctx.dir)
    gold_rows, skipped = load_gold(cfg.gold, ctx.name)
    pairs = [labeled_pair_row(g) for g in gold_rows]
    stage.write_rows(gctx.path("pairs"), pairs, PAIRS_SCHEMA)
    pool.stream_through_pool(gctx, gctx.path("pairs"), "pair_id", JudgeWorker,
                             judge_pool(cfg.judges), judge_kwargs(cfg, ctx, constitution),
                             checkpoint_rows=cfg.checkpoint_rows,
                             check=not cfg.engine_factory, label=f"{ctx.name}: gold pairs")
    fin = stage.finalize(gctx.dir, f"{ctx.name}:gold", "pair_id", route_labels, [LABELS],
                         inputs=[p["pair_id"] for p in pairs])
    fs, path = storage.resolve(gctx.path(LABELS))
    figures = gold_figures(pq.read_table(path, filesystem=fs).to_pylist(), gold_rows)
    info = {**figures, "file": cfg.gold, "min_agreement": cfg.min_agreement,
            "max_position_bias": cfg.max_position_bias, "rows_skipped": len(skipped),
            "errors_by_reason": fin.errors_by_reason, "cache_hits": int(fin.metrics.get("_cache_hits", 0)),
            "cache_misses": int(fin.metrics.get("_cache_misses", 0)), "seconds": round(time.time() - started, 2)}
    if skipped:
        info["first_skipped"] = skipped[0]
    storage.write_json(gctx.path("gold.json"), info)
    return info


def gate_judge(cfg: PreferenceConfig, ctx: StageContext, constitution: Constitution, fresh: bool) -> dict:
    """The gold gate: the judges label the gold pairs (``judge_gold``); below ``min_agreement`` the
    stage stops (``GoldGateError``) or warns. ``fresh``: the stage has made nothing yet — a stop
    then drops its recorded config too, so the next run (a bigger judge, ``on_gold_fail: warn``)
    starts afresh instead of being refused as "made with a different config". Returns the figures
    with ``passed``; ``gold.json`` keeps them and their one-line description (``line``)."""
    figures = judge_gold(cfg, ctx, constitution)
    try:
        where = f"stage {ctx.name}: gold {cfg.gold}"
        figures["passed"] = gate(figures, cfg.min_agreement, cfg.on_gold_fail, where, cfg.max_position_bias)
    except GoldGateError:
        if fresh:
            storage.delete(ctx.path("_config.json"))  # the driver's record of the config this stage began with
        raise
    figures["line"] = f"{'passed' if figures['passed'] else 'FAILED (on_gold_fail: warn)'}: {describe(figures)} " \
                      f"(min_agreement {cfg.min_agreement})"
    storage.write_json(storage.join(ctx.path(GOLD), "gold.json"), figures)
    if figures["passed"]:
        console.say(f"[{ctx.name}] gold gate {figures['line']}")
    return figures

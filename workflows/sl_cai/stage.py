"""SL-CAI stage: initial answer → N × (sample a principle, critique, revise) → sl_cai + sft.

With ``revise_sources``, rows from other prompt sources (helpful tasks) skip the rounds and keep
their initial answer: the SFT set then mixes revised red-team answers with ordinary helpful ones.
Rows of ``keep_initial_sources`` (benign but edgy) are revised yet keep their initial answer as the
SFT target; their revision is kept in ``rounds`` as the rejected side of a revision pair.

``critique_revise`` is the whole per-batch program over any ``Engine`` (unit-tested with a
scripted engine); ``CritiqueReviseWorker`` wraps it as a Ray Data actor-pool UDF; ``run``
streams the input dataset through the pool, then finalizes and reconciles.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from actors import EngineConfig, SamplingParams, pool
from workflows.core.constitution import Constitution, load_constitution, sample_principles
from workflows.core import stage, summary
from workflows.core.errors import ConfigError
from workflows.core.safety import check_recipe_code
from workflows.core.stage import MESSAGES, StageContext
from workflows.core.typed import from_dict, to_dict
from workflows.sl_cai import templates

ROUNDS = pa.list_(pa.struct([("principle_id", pa.string()), ("critique", pa.string()),
                             ("revision", pa.string())]))
RAW_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", MESSAGES), ("source", pa.string()),
    ("initial_response", pa.string()), ("rounds", ROUNDS), ("final_response", pa.string()),
    ("_error", pa.string()), ("_detail", pa.string()), ("_gen_tokens", pa.int64()), ("_prompt_tokens", pa.int64()),
])
SL_CAI_COLUMNS = ["prompt_id", "messages", "source", "initial_response", "rounds", "final_response"]


@dataclass
class CritiqueRevisionConfig:
    """SL-CAI: how many critique→revision rounds, under which constitution, with which engine."""

    constitution: str = "default"  # a shipped name (default, harmless) or a .yaml/.json path
    rounds: int = 1
    few_shot: int = 1  # example conversations from the constitution put before each critique
    input: str = "prompts"  # dataset name of an earlier stage, or a parquet directory
    max_prompt_chars: int = 8000
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=128))
    critique_max_new_tokens: int | None = None  # default: sampling.max_new_tokens
    # decoding of critiques and revisions (default: ``sampling``, which the initial answer uses). A
    # small model copies a few-shot revision's wording only without a repetition penalty, while its
    # initial answers need one to not loop.
    revision_sampling: SamplingParams | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint_rows: int = 256  # rows per raw file: the unit of work a resumed run does not redo
    # Prompt sources (the prompts dataset's ``source``: a builtin's or file's name) that go through
    # critique and revision; rows of other sources keep their initial answer as the SFT target, with
    # no rounds. CAI mixes helpful samples into SL-CAI this way so the model keeps answering benign
    # requests. null: every row is revised.
    revise_sources: list[str] | None = None
    # Sources whose rows are revised but keep their initial answer as the SFT target: prompts that
    # only sound harmful (benign but edgy). Their revision — for a small reviser, mostly a needless
    # refusal — becomes the *rejected* side of their revision pair (revision_pairs), teaching where
    # the line is. They must also be in revise_sources (when that is set).
    keep_initial_sources: list[str] = field(default_factory=list)
    engine_factory: str | None = None  # "module:callable" building the engines (tests, benchmarks)

    def validate(self, where: str) -> None:
        check_recipe_code(self.engine_factory, where)

        if self.rounds < 1:
            raise ConfigError(f"{where}.rounds", f"got {self.rounds}", "use 1 or more rounds")
        if self.sampling.max_new_tokens < 1:
            raise ConfigError(f"{where}.sampling.max_new_tokens", "must be ≥ 1")
        outside = [s for s in self.keep_initial_sources
                   if self.revise_sources is not None and s not in self.revise_sources]
        if outside:
            raise ConfigError(f"{where}.keep_initial_sources", f"{', '.join(outside)} not in revise_sources",
                              "add them to revise_sources (a kept source is still revised), or drop them here")
        if self.revision_sampling is not None and self.revision_sampling.max_new_tokens < 1:
            raise ConfigError(f"{where}.revision_sampling.max_new_tokens", "must be ≥ 1")
        if self.revise_sources is not None and not [s for s in self.revise_sources if s.strip()]:
            raise ConfigError(f"{where}.revise_sources", "is empty",
                              "name the prompt sources to revise (e.g. [red_team]), or null to revise every row")


class _RowFailed(Exception):
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _fail_reason(error: str) -> str:
    return error.split(":", 1)[0].strip() or "generation_failed"


def critique_revise(engine, rows: list[dict], cfg: CritiqueRevisionConfig, constitution: Constitution,
                    seed: int) -> list[dict]:
    """Run the SL-CAI program on a batch of prompt rows; one raw row out per row in, in order.
    Each step is one batched ``generate`` call over the rows still alive."""
    examples = templates.few_shot_messages(constitution.few_shot, cfg.few_shot)
    rev_params = cfg.revision_sampling or cfg.sampling
    crit_params = SamplingParams(**{**asdict(rev_params), "stop": tuple(rev_params.stop),
                                    "max_new_tokens": cfg.critique_max_new_tokens or rev_params.max_new_tokens})
    state = [{"row": r, "rounds": [], "tokens": 0, "prompt_tokens": 0, "error": None} for r in rows]
    for s in state:
        msgs = s["row"].get("messages") or []
        last = msgs[-1] if msgs else None
        if not last or last.get("role") != "user" or not (last.get("content") or "").strip():
            s["error"] = ("empty_prompt", "the prompt has no non-empty final user turn")
        elif sum(len(m.get("content") or "") for m in msgs) > cfg.max_prompt_chars:
            s["error"] = ("prompt_too_long", f"over max_prompt_chars={cfg.max_prompt_chars}")

    def step(label: str, convs: dict[int, list[dict]], params: SamplingParams) -> dict[int, str]:
        idx = [i for i in convs if state[i]["error"] is None]
        gens = engine.generate([convs[i] for i in idx], params) if idx else []
        out = {}
        for i, g in zip(idx, gens):
            s = state[i]
            s["tokens"] += g.completion_tokens
            s["prompt_tokens"] += g.prompt_tokens
            text = templates.clean_generation(g.text) if g.error is None else ""
            if g.error is not None:
                s["error"] = (_fail_reason(g.error), f"{label}: {g.error}")
            elif not text:
                s["error"] = ("empty_generation", f"{label}: the model returned no text")
            else:
                out[i] = text
        return out

    alive = range(len(state))
    current = step("initial answer", {i: templates.initial_conversation(state[i]["row"]["messages"])
                                      for i in alive}, cfg.sampling)
    for i, text in current.items():
        state[i]["initial"] = text
    kept = {i: current.pop(i) for i in list(current)
            if cfg.revise_sources is not None and state[i]["row"].get("source") not in cfg.revise_sources}
    principles = {i: sample_principles(constitution, state[i]["row"]["prompt_id"], cfg.rounds, seed)
                  for i in current}
    for r in range(cfg.rounds):
        crit_convs = {i: templates.critique_conversation(state[i]["row"]["messages"], current[i],
                                                         constitution.get(principles[i][r]).critique, examples)
                      for i in current}
        critiques = step(f"round {r + 1} critique", crit_convs, crit_params)
        rev_convs = {i: templates.revision_conversation(crit_convs[i], critiques[i],
                                                        constitution.get(principles[i][r]).revision)
                     for i in critiques}
        revisions = step(f"round {r + 1} revision", rev_convs, rev_params)
        for i, text in revisions.items():
            state[i]["rounds"].append({"principle_id": principles[i][r], "critique": critiques[i], "revision": text})
        current = revisions
    current.update(kept)
    for i in current:
        if state[i]["row"].get("source") in cfg.keep_initial_sources:
            current[i] = state[i]["initial"]  # revised, but the SFT target stays the first answer
    return [_raw_row(s, current.get(i)) for i, s in enumerate(state)]


def _raw_row(s: dict, final: str | None) -> dict:
    row, err = s["row"], s["error"]
    return {"prompt_id": row["prompt_id"], "messages": row.get("messages") or [], "source": row.get("source"),
            "initial_response": s.get("initial"), "rounds": s["rounds"], "final_response": final if not err else None,
            "_error": err[0] if err else None, "_detail": err[1] if err else None,
            "_gen_tokens": s["tokens"], "_prompt_tokens": s["prompt_tokens"]}


class CritiqueReviseWorker:
    """Ray Data actor-pool UDF: one engine per actor, ``critique_revise`` per batch."""

    def __init__(self, cfg: dict, constitution: Constitution, seed: int, engines_dir: tuple | None = None):
        self.cfg = from_dict(CritiqueRevisionConfig, cfg)
        self.engine = pool.start_engine(self.cfg.engine, engines_dir, self.cfg.engine_factory)
        self.constitution, self.seed = constitution, seed

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = critique_revise(self.engine, table.to_pylist(), self.cfg, self.constitution, self.seed)
        return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def route(good: pa.Table) -> dict[str, pa.Table]:
    """Good raw rows → the ``sl_cai`` and ``sft`` datasets."""
    sft = [{"prompt_id": r["prompt_id"], "messages": templates.sft_messages(r["messages"], r["final_response"])}
           for r in good.select(["prompt_id", "messages", "final_response"]).to_pylist()]
    return {"sl_cai": good.select(SL_CAI_COLUMNS), "sft": pa.Table.from_pylist(sft, schema=route.schemas["sft"])}


route.schemas = {"sl_cai": pa.schema([f for f in RAW_SCHEMA if not f.name.startswith("_")]),
                 "sft": pa.schema([("prompt_id", pa.string()), ("messages", MESSAGES)])}


def _check_sources(cfg: CritiqueRevisionConfig, input_uri: str, name: str) -> None:
    """A ``revise_sources`` name that no input row carries would silently revise nothing."""
    if cfg.revise_sources is None and not cfg.keep_initial_sources:
        return
    present = set(stage.column_counts(input_uri, "source"))
    missing = [s for s in [*(cfg.revise_sources or []), *cfg.keep_initial_sources] if s not in present]
    if missing:
        raise ConfigError(f"stage {name}.revise_sources", f"no input row has source {', '.join(map(repr, missing))}",
                          f"the input's sources are {', '.join(sorted(map(str, present)))}")


def run(cfg: CritiqueRevisionConfig, ctx: StageContext) -> dict:
    """Stream ``cfg.input`` through the engine pool into ``<stage>/_raw``, then finalize."""
    started = time.time()
    constitution = load_constitution(cfg.constitution)
    input_uri = ctx.input(cfg.input) if "/" not in cfg.input else cfg.input
    _check_sources(cfg, input_uri, ctx.name)
    pool.stream_through_pool(
        ctx, input_uri, "prompt_id", CritiqueReviseWorker, cfg.engine,
        dict(cfg=to_dict(cfg), constitution=constitution, seed=ctx.seed),
        checkpoint_rows=cfg.checkpoint_rows, check=not cfg.engine_factory)
    fin = stage.finalize(ctx.dir, ctx.name, "prompt_id", route, ["sl_cai", "sft"],
                         inputs=stage.ids_in(input_uri, "prompt_id"), budget=ctx.budget)
    info = stage.reconcile_and_mark(ctx, fin, started, {"constitution": constitution.name, "rounds": cfg.rounds,
                                     "revise_sources": cfg.revise_sources,
                                     "keep_initial_sources": cfg.keep_initial_sources,
                                     "engine": f"{cfg.engine.backend}:{cfg.engine.model}",
                                     "engines": pool.engines_used(ctx.dir)})
    summary.write_stage_summary(ctx, info, examples=summary.before_after_examples(ctx.path("sl_cai")))
    return info

"""The ``evaluate`` stage: every model answers held-out prompts; the answers are scored and each
model is compared with the base; ``report.md`` starts with the verdict.

Phases (each resumable, raw rows under the stage directory):

1. **prompts**: the sets (``config.EvalSet``) read into ``prompts`` by ``eval_prompts.load_prompts``
   (``eval_id`` = ``<set>/<prompt_id>``); unusable or duplicate rows go to ``errors``.
2. **answers**, per model: ``answers.answer_batch`` in an engine actor pool with the same
   decoding and seed for every model → ``answers/<model>/answers``. Reconcile per model:
   ids(answers) ∪ ids(errors) = ids(prompts).
3. **judging** (when ``judge`` is set): one row per (model, answer slot), with the base's
   answer beside it → ``judge.judge_rows`` in a judge actor pool → ``judging/judged``.
   Reconcile: ids(judged) ∪ ids(errors) = ids(answers of every model).
4. **model scores** (``reward_model``, ``kl``): Ray tasks (``model_scores``), recomputed on a
   resumed run (they take seconds to minutes; the phases before them are kept).
5. **report**: the refusal classifier on every answer, ``scoring.aggregate``, the verdicts,
   ``report.md``, plots, ``metrics.json``, ``examples.jsonl``.

Every (prompt, model) is answered or in ``errors`` with its reason; nothing is dropped.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq

from actors import EngineConfig, SamplingParams, pool
from training.reward import check_reward_dir
from workflows.core.constitution import Constitution, load_constitution
from workflows.core import console, stage, storage, summary
from workflows.core.stage import ERRORS_SCHEMA, MESSAGES, StageContext
from workflows.core.typed import from_dict, to_dict
from workflows.evaluate import model_scores, refusal, report, scoring
from workflows.evaluate.answers import answer_batch, unit_id
from workflows.evaluate.config import EvaluateConfig
from workflows.evaluate.eval_prompts import PROMPTS_SCHEMA, load_prompts
from workflows.evaluate.judge import judge_rows
from workflows.judging.config import PreferenceConfig, gold_location
from workflows.judging.workers import judge_gold as judge_gold_pairs

ANSWER_RAW_SCHEMA = pa.schema([("eval_id", pa.string()), ("answers", pa.list_(pa.string())), ("_error", pa.string()),
                               ("_detail", pa.string()), ("_gen_tokens", pa.int64()), ("_prompt_tokens", pa.int64())])
ANSWERS_SCHEMA = pa.schema([("eval_id", pa.string()), ("answers", pa.list_(pa.string()))])
JUDGE_INPUT_SCHEMA = pa.schema([("id", pa.string()), ("model", pa.string()), ("unit", pa.string()),
                                ("kind", pa.string()), ("messages", MESSAGES), ("answer", pa.string()),
                                ("base_answer", pa.string()), ("is_base", pa.bool_())])
_WIN = pa.struct([("principle", pa.string()), ("win", pa.float64()), ("consistent", pa.bool_())])
JUDGED_SCHEMA = pa.schema([("id", pa.string()), ("harm_p", pa.float64()), ("harm_consistent", pa.bool_()),
                           ("refusal_judge", pa.string()), ("refusal_probs", pa.list_(pa.float64())),
                           ("refusal_consistent", pa.bool_()), ("win", pa.float64()), ("principle_wins", pa.list_(_WIN)),
                           ("judged", pa.int64()), ("consistent", pa.int64()), ("unparseable", pa.int64())])
JUDGE_RAW_SCHEMA = pa.schema([*JUDGED_SCHEMA, ("_error", pa.string()), ("_detail", pa.string())])
ANSWERS, JUDGING, EVAL_PROMPTS = "answers", "judging", "eval_prompts"


# ---------------------------------------------------------------- Ray workers and routes

class AnswerWorker:
    """Ray Data actor-pool UDF: one model's engine per actor, ``answer_batch`` per batch."""

    def __init__(self, engine: dict, sampling: dict, k: int, factory: str | None, engines_dir: tuple | None = None):
        self.engine = pool.start_engine(from_dict(EngineConfig, engine), engines_dir, factory)
        self.sampling, self.k = from_dict(SamplingParams, sampling), k

    def __call__(self, table: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(answer_batch(self.engine, table.to_pylist(), self.sampling, self.k),
                                    schema=ANSWER_RAW_SCHEMA)


class EvalJudgeWorker:
    """Ray Data actor-pool UDF: the judge engine per actor, ``judge_rows`` per batch."""

    def __init__(self, engine: dict, factory: str | None, constitution: Constitution, m: int, seed: int,
                 engines_dir: tuple | None = None):
        self.engine = pool.start_engine(from_dict(EngineConfig, engine), engines_dir, factory)
        self.constitution, self.m, self.seed = constitution, m, seed

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        out = judge_rows(self.engine, rows, self.constitution, self.m, self.seed)
        return pa.Table.from_pylist([{"id": r["id"], **o, "_error": None, "_detail": None} for r, o in zip(rows, out)],
                                    schema=JUDGE_RAW_SCHEMA)


# ---------------------------------------------------------------- phases

def _read(uri: str) -> list[dict]:
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs).to_pylist()


def answer_all(cfg: EvaluateConfig, ctx: StageContext, models: dict[str, str], prompts_uri: str,
               eval_ids: list[str]) -> tuple[dict[str, dict[str, list[str]]], list[dict], dict]:
    """Phase 2: ``{model: {eval_id: answers}}``, error rows, and metrics summed over models."""
    answers, errors, metrics = {}, [], {}
    for name, model in models.items():
        actx = StageContext(ctx.path(ANSWERS), name, ctx.seed)
        engine = replace(cfg.engine, model=model)
        print(f"[{ctx.name}] answering {len(eval_ids)} prompts × {cfg.samples_per_prompt} with {name} ({model})")
        pool.stream_through_pool(actx, prompts_uri, "eval_id", AnswerWorker, engine,
                                 dict(engine=to_dict(engine), sampling=to_dict(cfg.sampling),
                                      k=cfg.samples_per_prompt, factory=cfg.engine_factory),
                                 label=f"{ctx.name}: {name}'s answers", checkpoint_rows=cfg.checkpoint_rows,
                                 check=not cfg.engine_factory)
        fin = stage.finalize(actx.dir, f"{ctx.name}:{ANSWERS}:{name}", "eval_id", stage.select_route(ANSWERS, ANSWERS_SCHEMA),
                             [ANSWERS], inputs=eval_ids)
        answers[name] = {r["eval_id"]: r["answers"] for r in _read(actx.path(ANSWERS))}
        errors += [{**e, "id": f"{name}:{e['id']}"} for e in _read(actx.path("errors"))]
        for k, v in fin.metrics.items():
            metrics[k] = metrics.get(k, 0) + v
    return answers, errors, metrics


def slots(cfg: EvaluateConfig, prompts: list[dict], answers: dict) -> list[dict]:
    """One record per (model, answer slot) with the base's answer in the same slot beside it."""
    base = answers[cfg.base]
    out = []
    for p in prompts:
        for model, got in answers.items():
            if p["eval_id"] not in got:
                continue
            for k, text in enumerate(got[p["eval_id"]]):
                unit = unit_id(p["eval_id"], k)
                base_text = base[p["eval_id"]][k] if p["eval_id"] in base else None
                out.append({"id": f"{model}:{unit}", "model": model, "unit": unit, "set": p["set"], "kind": p["kind"],
                            "eval_id": p["eval_id"], "messages": p["messages"], "answer": text,
                            "base_answer": None if model == cfg.base else base_text, "is_base": model == cfg.base})
    return out


def judge_all(cfg: EvaluateConfig, ctx: StageContext, records: list[dict], constitution: Constitution,
              seed: int) -> tuple[dict[str, dict], list[dict]]:
    """Phase 3: ``{record id: judge figures}`` and error rows (an answer the judge could not take)."""
    jctx = StageContext(ctx.dir, JUDGING, ctx.seed)
    input_uri = jctx.path("input")
    if not stage.raw_files(jctx.dir):
        stage.write_rows(input_uri, [{k: r[k] for k in JUDGE_INPUT_SCHEMA.names} for r in records], JUDGE_INPUT_SCHEMA)
    print(f"[{ctx.name}] judging {len(records)} answers with {cfg.judge.backend}:{cfg.judge.model}")
    pool.stream_through_pool(jctx, input_uri, "id", EvalJudgeWorker, cfg.judge,
                             dict(engine=to_dict(cfg.judge), factory=cfg.engine_factory,
                                  constitution=constitution, m=cfg.principles_per_comparison, seed=seed),
                             label=f"{ctx.name}: judging", checkpoint_rows=cfg.checkpoint_rows,
                             check=not cfg.engine_factory)
    stage.finalize(jctx.dir, f"{ctx.name}:{JUDGING}", "id", stage.select_route("judged", JUDGED_SCHEMA), ["judged"],
                   inputs=[r["id"] for r in records])
    return {r["id"]: r for r in _read(jctx.path("judged"))}, _read(jctx.path("errors"))


def _check_scores(cfg: EvaluateConfig, models: dict[str, str], reward_dir: str | None) -> bool:
    """Whether KL can be computed (local models only), after checking every path it needs."""
    if reward_dir:
        check_reward_dir(reward_dir, "evaluate: reward model")
    local = cfg.engine.backend != "openai" and not cfg.engine_factory
    if cfg.kl and not local:
        console.say(f"note: kl skipped: models served by {cfg.engine_factory or 'an OpenAI-compatible endpoint'} "
              "have no local weights to score answers with")
    if cfg.kl and local:
        for m in models.values():
            model_scores.check_model(m)
    return cfg.kl and local


def score_models(records: list[dict], cfg: EvaluateConfig, models: dict[str, str], kl: bool,
                 reward_dir: str | None, seed: int) -> dict[str, dict]:
    """Phase 4: the reward score of every answer (into ``records``) and ``{model: KL figures}``."""
    by_model = {m: [r for r in records if r["model"] == m] for m in models}
    models = {m: spec for m, spec in models.items() if by_model[m]}  # a model with no answer has nothing to score
    res = {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus}
    jobs = [model_scores.ScoreJob("reward", reward_dir, by_model[m], **res) for m in models] if reward_dir else []
    others = [m for m in models if m != cfg.base and by_model[m]] if kl else []
    for m in others:  # the model's own answers, under the model and under the base
        jobs += [model_scores.ScoreJob("logprobs", models[m], by_model[m], **res, kwargs={"dtype": cfg.engine.dtype}),
                 model_scores.ScoreJob("logprobs", models[cfg.base], by_model[m], **res,
                                       kwargs={"dtype": cfg.engine.dtype})]
    if not jobs:
        return {}
    print(f"[scores] {'reward model scores' if reward_dir else ''}{' and ' if reward_dir and others else ''}"
          f"{'KL from the base' if others else ''}: {len(jobs)} Ray tasks")
    results = model_scores.run_scores(jobs)
    if reward_dir:
        for m, scores in zip(models, results):
            for r, x in zip(by_model[m], scores):
                r["rm_score"] = float(x)
        results = results[len(models):]
    return {m: model_scores.kl_from_base(results[2 * i], results[2 * i + 1], seed=seed) for i, m in enumerate(others)}


def judge_gold(cfg: EvaluateConfig, ctx: StageContext, constitution: Constitution) -> dict:
    """The judge's agreement with human gold pairs, asked exactly as the preference stage asks
    (both orders, ``principles_per_comparison`` principles): ``judging.workers.judge_gold``."""
    pcfg = PreferenceConfig(constitution=cfg.constitution, judges=[cfg.judge], both_orders=True,
                            principles_per_pair=cfg.principles_per_comparison, gold=gold_location(cfg.gold),
                            engine_factory=cfg.engine_factory, checkpoint_rows=cfg.checkpoint_rows)
    console.say(f"[{ctx.name}] the judge labels the gold pairs of {cfg.gold}")
    return judge_gold_pairs(pcfg, ctx, constitution)


def run(cfg: EvaluateConfig, ctx: StageContext) -> dict:
    started = time.time()
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    models = {name: ctx.resolve(str(spec)) for name, spec in cfg.models.items()}
    judge_cfg = replace(cfg.judge, model=ctx.resolve(cfg.judge.model)) if cfg.judge else None
    cfg = replace(cfg, judge=judge_cfg, sampling=replace(cfg.sampling, seed=cfg.sampling.seed if
                                                          cfg.sampling.seed is not None else seed))
    reward_dir = ctx.resolve(cfg.reward_model) if cfg.reward_model else None
    constitution = load_constitution(cfg.constitution)
    kl_models = _check_scores(cfg, models, reward_dir)  # one clear line now, not a failed task later
    prompts, prompt_errors = load_prompts(cfg)
    stage.write_rows(ctx.path(EVAL_PROMPTS), prompts, PROMPTS_SCHEMA)
    eval_ids = [p["eval_id"] for p in prompts]
    answers, answer_errors, metrics = answer_all(cfg, ctx, models, ctx.path(EVAL_PROMPTS), eval_ids)
    records = slots(cfg, prompts, answers)
    judged, judge_errors = judge_all(cfg, ctx, records, constitution, seed) if cfg.judge else ({}, [])
    texts = {p["eval_id"]: p["messages"][-1]["content"] for p in prompts}
    for r in records:
        r.update(judged.get(r["id"], {}))
        r["prompt"], r["refusal_rule"], r["length"] = texts[r["eval_id"]], refusal.classify(r["answer"]), len(r["answer"].split())
    kl = score_models(records, cfg, models, kl_models, reward_dir, seed)
    gold = judge_gold(cfg, ctx, constitution) if cfg.gold and cfg.judge else None
    metrics_json = scoring.aggregate(records, cfg.base, list(models), cfg.verdict, seed, gold, kl)
    metrics_json["refusal_classifier"] = refusal.accuracy()
    errors = prompt_errors + answer_errors  # each a (prompt, model) not answered: inputs = outputs + errors
    stage.write_rows(ctx.path("errors"), [{"stage": ctx.name, **e} for e in errors + judge_errors], ERRORS_SCHEMA)
    target = metrics_json["comparisons"][cfg.target_name]["verdict"]
    n_out = sum(len(a) for a in answers.values())
    info = {"stage": ctx.name, "inputs": len(eval_ids) * len(models) + len(prompt_errors), "outputs": n_out,
            "errors": len(errors), "judge_errors": len(judge_errors),
            "datasets": {EVAL_PROMPTS: len(prompts), "errors": len(errors) + len(judge_errors)},
            "errors_by_reason": dict(Counter(e["reason"] for e in errors)), "metrics": metrics,
            "config_hash": ctx.config_hash, "seconds": round(time.time() - started, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "unreadable_files": stage.unreadable_files(ctx.dir),
            "models": models, "base": cfg.base,
            "target": cfg.target_name, "greedy": cfg.sampling.greedy, "verdict": target["label"], "verdict_reasons": target["reasons"],
            "headline": f"verdict: {target['label']} ({cfg.target_name} against {cfg.base}) — " + "; ".join(target["reasons"]),
            "engines": pool.engines_used(*[storage.join(ctx.path(ANSWERS), m) for m in models],
                                                ctx.path(JUDGING)),
            "report": "report.md"}
    report.write_all(ctx, info, metrics_json, scoring.examples(records, cfg.base), records)
    stage.write_success(ctx.dir, info)
    summary.write_stage_summary(ctx, info)
    return info


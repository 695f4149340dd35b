"""Command-line entries of RL-CAI labeling.

``label_main(...)`` runs the recipe [prompts, preference] (what ``cai label`` does), or
[preference] over an existing pairs file (``cai label --pairs``), optionally behind the gold gate;
``export_uncertain`` / ``merge_labels`` (``cai route export|merge``) send the pairs the AI
judge was unsure about to people and fold their answers back in (thin wrappers over
``workflows.judging.agreement``). ``register(subparsers)`` adds both commands to an argparse parser.
"""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from workflows.core import storage
from workflows.core.errors import ConfigError
from workflows.core.stage import ERRORS_SCHEMA
from workflows.driver import Recipe, run_recipe
from workflows.judging import agreement
from workflows.judging.agreement import export_for_humans, merge_human_labels, read_preferences, uncertain
from workflows.judging.human import to_table
from workflows.preference.report import _write, iter_tables


def label_main(prompts: str | None, out: str, policy: str = "embedded", judge: str | list[str] = "embedded",
               constitution: str = "default", samples: int = 2, pairs_per_prompt: int | None = None,
               principles: int = 1, cot: bool = False, limit: int | None = None, *, field: str = "prompt",
               max_new_tokens: int = 64, temperature: float = 1.0, both_orders: bool = True,
               human: str | None = None, human_ratio: float = 0.5, batch_size: int = 8, concurrency: int = 1,
               cache: bool = True, seed: int = 0, restart_from: str | None = None, pairs: str | None = None,
               gold: str | None = None, min_agreement: float = 0.6, on_gold_fail: str = "stop") -> int:
    """Label ``prompts`` end to end into ``out`` (a run dir); ``judge`` is one model, a list, or
    "a,b" (an ensemble). ``pairs_per_prompt`` set → that many sampled pairs, else all pairs.
    ``pairs`` instead of ``prompts``: label the existing pairs of that file (no policy, no
    prompts stage). ``gold``: first check the judge against those human labels (the gold gate)."""
    if (prompts is None) == (pairs is None):
        raise ConfigError("--prompts/--pairs", "give exactly one", "--prompts FILE to sample pairs, or --pairs FILE "
                          "to label existing ones")
    judges = [j.strip() for j in judge.split(",")] if isinstance(judge, str) else list(judge)
    engine = {"batch_size": batch_size, "concurrency": concurrency}
    pref = {"stage": "preference", "constitution": constitution, "samples_per_prompt": samples,
            "pairs": "sample" if pairs_per_prompt else "all", "pairs_per_prompt": pairs_per_prompt,
            "principles_per_pair": principles, "both_orders": both_orders, "cot": cot, "cache": cache,
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": 0.95, "seed": seed},
            "policy": {"model": policy, **engine}, "judges": [{"model": j, **engine} for j in judges if j]}
    if human:
        pref["human"] = {"path": human, "ratio": human_ratio}
    if gold:
        pref.update(gold=gold, min_agreement=min_agreement, on_gold_fail=on_gold_fail)
    if pairs:
        stages = [{**pref, "pairs_from": pairs}]
    else:
        stages = [{"stage": "prompts", "path": prompts, "field": field, "limit": limit}, pref]
    run_recipe(Recipe(name="label", run_dir=out, seed=seed, stages=stages), restart_from=restart_from,
               where="command line")
    return 0


def _preferences_uri(source: str) -> str:
    """A stage directory (holding ``preferences/``) or a preferences dataset/file itself."""
    inner = storage.join(source, "preferences")
    return inner if storage.exists(inner) else source


def export_uncertain(source: str, out_path: str, threshold: float = 0.1) -> int:
    """Write the AI labels a person should check (|p_chosen − 0.5| < threshold, or the two
    orders disagreed) to ``out_path`` (.csv or .jsonl) for review; returns the row count.
    Streams the dataset; only the selected rows are held in memory."""
    uri = _preferences_uri(source)
    if not storage.exists(uri):
        raise ConfigError(source, "not found", "pass a preference stage directory or a preferences dataset")
    tables = _file_tables(uri) if uri.endswith(".parquet") else iter_tables(uri)
    rows = [r for t in tables for r in uncertain(t.to_pylist(), threshold)]
    return export_for_humans(rows, out_path)


def _file_tables(uri: str):
    fs, path = storage.resolve(uri)
    yield pq.read_table(path, filesystem=fs)


def merge_labels(preferences_uri: str, labeled_path: str, out_uri: str) -> dict:
    """Fold the answers of an ``export_uncertain`` file back in: ``out_uri/preferences/`` gets
    every row (human answers replacing AI labels), ``out_uri/errors/`` the pairs marked "tie".
    Holds the preferences in memory (``agreement.merge_human_labels``)."""
    rows, ties = merge_human_labels(read_preferences(_preferences_uri(preferences_uri)), labeled_path)
    _write(to_table(rows), storage.join(out_uri, "preferences", "part-00000.parquet"))
    _write(pa.Table.from_pylist(ties, schema=ERRORS_SCHEMA), storage.join(out_uri, "errors", "part-00000.parquet"))
    return {"rows": len(rows), "human": sum(r["source"] == "human" for r in rows), "ties": len(ties)}


def route_main(action: str, source: str, out: str, threshold: float = 0.1, labeled: str | None = None) -> int:
    """``export``: ``source`` (stage dir or preferences) → ``out`` file for people.
    ``merge``: ``source`` preferences + ``labeled`` file → ``out`` directory."""
    if action == "export":
        n = export_uncertain(source, out, threshold)
        print(f"wrote {n} uncertain pair(s) to {out}: fill human_choice with 1, 2 or tie, then `cai route merge`")
        return 0
    if action == "merge":
        if not labeled:
            raise ConfigError("--labeled", "missing", "pass the reviewed export file")
        r = merge_labels(source, labeled, out)
        print(f"{r['rows']} rows ({r['human']} human-labeled, {r['ties']} ties to errors) → {out}")
        return 0
    raise ValueError(f"unknown route action {action!r}: use export or merge")


def register_agreement(subparsers) -> None:
    """Add ``agreement`` to the ``cai`` argument parser's subcommands."""
    a = subparsers.add_parser("agreement", help="compare AI preference labels with human ones",
                              description="Accuracy, both-order agreement, calibration (ECE, reliability "
                                          "diagram) and per-principle accuracy of AI labels against human labels.")
    a.add_argument("--labels", required=True, help="AI preferences: parquet file or directory")
    a.add_argument("--human", required=True, help="human preferences: jsonl/json/csv/parquet or HF dataset dir")
    a.add_argument("--out", help="output directory (default: 'agreement' next to --labels)")
    a.set_defaults(fn=lambda args: agreement.main(args.labels, args.human, args.out))


def register(subparsers) -> None:
    """Add ``label``, ``route`` and ``agreement`` to the ``cai`` argument parser's subcommands."""
    p = subparsers.add_parser("label", help="RL-CAI: sample pairs and label them with an AI judge",
                              description="Read prompts, sample K responses each from the policy, pair them, and "
                                          "label every pair (A)/(B) under sampled constitution principles in both "
                                          "orders (or label the existing pairs of --pairs). Writes prompts/ and "
                                          "preference/{pairs,preferences,errors}/ and report.md under --out. "
                                          "With --gold, the judge first labels human-labeled pairs and the run "
                                          "stops when it agrees with the humans less than --min-agreement.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="jsonl/csv/parquet file, HF dataset dir, or builtin:red_team")
    source.add_argument("--pairs", metavar="FILE", help="label these existing pairs instead of sampling: "
                        "prompt/chosen/rejected, HH chosen/rejected, or prompt/response_a/response_b rows")
    p.add_argument("--out", required=True, help="run directory (local path or s3://bucket/prefix)")
    p.add_argument("--policy", default="embedded", help="model that samples the responses (default: embedded)")
    p.add_argument("--judge", default="embedded", help="judge model; 'a,b' for an ensemble (default: embedded)")
    p.add_argument("--constitution", default="default", help="default, harmless, or a .yaml/.json path")
    p.add_argument("--samples", type=int, default=2, help="responses per prompt, K >= 2 (default: 2)")
    p.add_argument("--pairs-per-prompt", type=int, help="judge this many sampled pairs per prompt (default: all)")
    p.add_argument("--principles", type=int, default=1, help="principles per pair, ensembled (default: 1)")
    p.add_argument("--cot", action="store_true", help="judge with chain of thought (labels clamped to 0.4-0.6)")
    p.add_argument("--one-order", action="store_true", help="ask each question in one order only")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--field", default="prompt", help="column with the prompt (default: prompt)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sampled response (default: 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, > 0 (default: 1.0)")
    p.add_argument("--human", help="human preference data to mix in (jsonl/csv/parquet/HF dir)")
    p.add_argument("--human-ratio", type=float, default=0.5, help="fraction of human rows in the output")
    p.add_argument("--gold", metavar="FILE", help="human-labeled pairs (prompt, chosen, rejected) the judge "
                   "must agree with before labeling at scale (the gold gate)")
    p.add_argument("--min-agreement", type=float, default=0.6, help="gold gate threshold (default: 0.6)")
    p.add_argument("--on-gold-fail", choices=["stop", "warn"], default="stop",
                   help="below the threshold: stop before sampling (default) or warn and go on")
    p.add_argument("--batch-size", type=int, default=8, help="rows per engine batch (default: 8)")
    p.add_argument("--concurrency", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="actors per pool")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the label cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart-from", metavar="STAGE", help="redo this stage (prompts|preference) and after")
    p.set_defaults(fn=lambda a: label_main(
        a.prompts, a.out, a.policy, a.judge, a.constitution, a.samples, a.pairs_per_prompt, a.principles, a.cot,
        a.limit, field=a.field, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
        both_orders=not a.one_order, human=a.human, human_ratio=a.human_ratio, batch_size=a.batch_size,
        concurrency=a.concurrency, cache=not a.no_cache, seed=a.seed, restart_from=a.restart_from, pairs=a.pairs,
        gold=a.gold, min_agreement=a.min_agreement, on_gold_fail=a.on_gold_fail))

    r = subparsers.add_parser("route", help="send uncertain AI labels to people, merge their answers back",
                              description="export: write pairs with |p_chosen - 0.5| < threshold or order "
                                          "disagreement to a CSV/JSONL for review. merge: replace AI labels with "
                                          "the reviewed human_choice (1, 2 or tie).")
    r.add_argument("action", choices=["export", "merge"])
    r.add_argument("--from", dest="source", required=True, help="preference stage dir or preferences dataset")
    r.add_argument("--out", required=True, help="export: .csv/.jsonl file; merge: output directory")
    r.add_argument("--threshold", type=float, default=0.1, help="export: uncertainty band around 0.5")
    r.add_argument("--labeled", help="merge: the reviewed export file")
    r.set_defaults(fn=lambda a: route_main(a.action, a.source, a.out, a.threshold, a.labeled))
    register_agreement(subparsers)

"""Command line of the evaluate stage: ``cai eval`` (a one-stage recipe)."""
from __future__ import annotations

import os

from workflows.core.errors import ConfigError
from workflows.driver import Recipe, run_recipe
from workflows.evaluate.config import BUILTIN_SETS, FORMATS


def parse_models(text: str) -> dict[str, str]:
    """``base=embedded,sft=runs/demo/sft/sft_model`` → ``{"base": "embedded", "sft": "runs/..."}``."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, model = item.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise ConfigError("--models", f"{item!r} is not NAME=MODEL",
                              "write e.g. --models base=embedded,sft=runs/demo/sft/sft_model")
        out[name.strip()] = model.strip()
    return out


def _cmd_eval(args) -> int:
    models = parse_models(args.models)
    engine = {"backend": args.backend, "batch_size": args.batch_size, "concurrency": args.concurrency,
              "dtype": args.dtype}
    stage = {"stage": "evaluate", "models": models, "base": args.base or next(iter(models), "base"),
             "target": args.target, "limit": args.limit, "engine": engine, "kl": not args.no_kl,
             "sampling": {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
                          "seed": args.seed},
             "judge": None if args.judge == "none" else {**engine, "backend": args.judge_backend, "model": args.judge},
             "reward_model": args.reward_model, "gold": args.gold, "constitution": args.constitution}
    if args.sets:
        stage["sets"] = [_set(s) for s in args.sets]
    run_recipe(Recipe(name="eval", run_dir=args.out, seed=args.seed, stages=[stage]), where="command line")
    print(f"report: {os.path.join(args.out, 'evaluate', 'report.md')}")
    return 0


def _set(text: str) -> dict:
    """A shipped set's name; ``KIND=PATH`` (your own file, every prompt of that kind); a published
    set as it comes, ``xstest=PATH``, ``or-bench=PATH``, ``strongreject=PATH``; or your file labeled
    per row, ``labeled:LABEL_COLUMN[:PROMPT_COLUMN]=PATH``."""
    key, sep, path = text.partition("=")
    if not sep:
        if text not in BUILTIN_SETS:
            raise ConfigError("--sets", f"{text!r} is not a shipped set",
                              f"use {', '.join(BUILTIN_SETS)}, KIND=FILE or FORMAT=FILE (xstest, or-bench, strongreject)")
        return {"name": text, "kind": BUILTIN_SETS[text]}
    name = os.path.splitext(os.path.basename(path))[0]
    if key in FORMATS:
        return {"name": name, "format": key, "path": path}
    if key.startswith("labeled:"):
        label, _, prompt = key[len("labeled:"):].partition(":")
        return {"name": name, "format": "labeled", "label_field": label, "field": prompt or "prompt", "path": path}
    return {"name": name, "kind": key, "path": path}


def register(subparsers) -> None:
    """Add ``eval`` to the ``cai`` argument parser's subcommands."""
    c = subparsers.add_parser(
        "eval", help="did the run work? answer held-out prompts with every model, report a verdict",
        description="Answer held-out prompts (shipped: 120 red-team, 123 benign-but-edgy, 122 helpful) with every "
                    "model, score the answers (refusal classifier; a judge for harmful compliance, refusal and "
                    "pairwise win rates against the base in both orders; optional reward-model score; KL from the "
                    "base), and write report.md whose first line is the verdict: WORKED, INCONCLUSIVE or REGRESSED. "
                    "Also metrics.json, examples.jsonl and PNG plots under OUT/evaluate/.",
        epilog="example: cai eval --models base=embedded,sft=runs/demo/sft/sft_model,dpo=runs/demo/dpo/dpo_model "
               "--out runs/eval --limit 20")
    c.add_argument("--models", required=True,
                   help="NAME=MODEL,... (embedded, a model directory or .gguf); the first is the base unless --base")
    c.add_argument("--out", required=True, help="run directory (local path or s3://bucket/prefix)")
    c.add_argument("--base", help="which NAME is the reference (default: the first)")
    c.add_argument("--target", help="which NAME the verdict line is about (default: the last)")
    c.add_argument("--limit", type=int, help="only the first N prompts of each set, for a quick look")
    c.add_argument("--sets", "--prompts", nargs="+", metavar="SET",
                   help="shipped names (eval_red_team eval_benign_edgy eval_helpful); KIND=FILE with KIND one of "
                        "red_team, benign_edgy, helpful; a published set's file as it comes: xstest=FILE, "
                        "or-bench=FILE (its hard or toxic split), strongreject=FILE; or your own labeled file, "
                        "labeled:LABEL_COLUMN[:PROMPT_COLUMN]=FILE (label unsafe/harmful/toxic/1/true/yes = "
                        "harmful). Default: the three shipped sets")
    c.add_argument("--judge", default="embedded",
                   help="judge model (embedded, a directory, or the model name at --judge-backend openai), or 'none' "
                        "for the refusal classifier only. The embedded 135M judge is weak: see the README")
    c.add_argument("--judge-backend", default="transformers", choices=["transformers", "vllm", "openai"])
    c.add_argument("--reward-model", help="the run's reward model directory: its score per model (not independent)")
    c.add_argument("--gold", help="human-labeled pairs (prompt, chosen, rejected): the judge's agreement with them")
    c.add_argument("--constitution", default="default", help="principles for the harmlessness comparisons")
    c.add_argument("--no-kl", action="store_true", help="skip KL from the base (needs local model weights)")
    c.add_argument("--backend", default="transformers", choices=["transformers", "vllm", "openai"],
                   help="engine backend every model answers with")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default: 128)")
    c.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages loops (1.2 suits 135M models)")
    c.add_argument("--dtype", default="auto", help="auto (bf16 where the processor computes it natively), float32, bfloat16")
    c.add_argument("--batch-size", type=int, default=8, help="prompts per engine batch")
    c.add_argument("--concurrency", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="engine actors per pool")
    c.add_argument("--seed", type=int, default=0, help="decoding seed, principle sampling and bootstrap")
    c.set_defaults(fn=_cmd_eval)

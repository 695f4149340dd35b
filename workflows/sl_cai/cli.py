"""Command line of the SL-CAI stage: ``cai critique-revise`` (the recipe [prompts, critique_revision])."""
from __future__ import annotations

import os

from workflows.driver import Recipe, run_recipe


def _cmd_critique_revise(args) -> int:
    engine = {"model": args.model, "batch_size": args.batch_size, "concurrency": args.concurrency,
              "dtype": args.dtype}
    stages = [
        {"stage": "prompts", "path": args.prompts, "field": args.field, "limit": args.limit},
        {"stage": "critique_revision", "constitution": args.constitution, "rounds": args.rounds,
         "sampling": {"max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty},
         "engine": engine},
    ]
    run_recipe(Recipe(name="critique-revise", run_dir=args.out, seed=args.seed, stages=stages),
               restart_from=args.restart_from, where="command line")
    return 0


def register(subparsers) -> None:
    """Add ``critique-revise`` to the ``cai`` argument parser's subcommands."""
    sub = subparsers
    c = sub.add_parser("critique-revise", help="run SL-CAI critique→revision on a prompts file",
                       description="Read prompts, answer them, then critique and revise each answer under "
                                   "randomly sampled constitution principles. Writes prompts/, "
                                   "critique_revision/{sl_cai,sft,errors}/ and summary.md under --out.")
    c.add_argument("--prompts", required=True,
                   help="jsonl/csv/parquet file, HF dataset dir, or builtin:red_team|helpful|all")
    c.add_argument("--out", required=True, help="run directory (local path or s3://bucket/prefix)")
    c.add_argument("--field", default="prompt", help="column with the prompt text or messages (default: prompt)")
    c.add_argument("--limit", type=int, help="use only the first N prompts")
    c.add_argument("--rounds", type=int, default=1, help="critique→revision rounds per prompt (default: 1)")
    c.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer/critique/revision")
    c.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages loops (1.2 suits the 135M embedded model; default: 1.0 = off)")
    c.add_argument("--model", default="embedded",
                   help="'embedded' (SmolLM2-135M-Instruct), a model directory, or a .gguf file")
    c.add_argument("--dtype", default="auto",
                   help="engine dtype: auto (bfloat16 on a GPU and on CPUs that compute it natively, "
                        "AVX512-BF16/AMX, where it is ~2x faster; float32 on other CPUs, where bfloat16 is "
                        "~60x slower), float32 or bfloat16")
    c.add_argument("--constitution", default="default", help="default, harmless, or a .yaml/.json path")
    c.add_argument("--batch-size", type=int, default=8, help="prompts per engine batch (default: 8)")
    c.add_argument("--concurrency", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="engine actors in the pool")
    c.add_argument("--seed", type=int, default=0, help="seed for principle sampling and sampled decoding")
    c.add_argument("--restart-from", metavar="STAGE", help="redo this stage (prompts|critique_revision) and after")
    c.set_defaults(fn=_cmd_critique_revise)

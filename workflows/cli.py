"""``cai``: the command line. ``cai --help`` and ``cai COMMAND --help`` explain each command."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from actors.base import EngineError
from workflows.errors import CaiError

EPILOG = textwrap.dedent("""\
    typical use:
      cai run workflows/recipes/demo.yaml            # the whole recipe, resumable
      cai critique-revise --prompts my.jsonl --out runs/mine --rounds 2
      cai validate-constitution constitutions/default.yaml
      cai label --prompts builtin:red_team --out runs/labels --samples 2
      cai agreement --labels run/preference/preferences --human human.jsonl
      cai train sft --config sft.yaml --out runs/sft     # Ray Train + DeepSpeed
      cai stages                                      # what a recipe can contain

    Runs start a local Ray cluster unless the recipe's ray.address says otherwise.
    Every stage writes parquet datasets, an errors dataset and a summary.md under the run directory.
""")


def _cmd_run(args) -> int:
    from workflows.driver import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.run_dir:
        recipe.run_dir = args.run_dir
    run_recipe(recipe, restart_from=args.restart_from, where=args.recipe)
    return 0


def _cmd_critique_revise(args) -> int:
    from workflows.driver import Recipe, run_recipe

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


def _cmd_train(args) -> int:
    import yaml

    from workflows.driver import Recipe, run_recipe
    from workflows.errors import ConfigError

    try:
        body = yaml.safe_load(open(args.config, encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(args.config, f"cannot read it ({e.strerror})", "pass the path of a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(args.config, f"not valid YAML ({e})") from None
    if not isinstance(body, dict):
        raise ConfigError(args.config, "expected a mapping of training settings", "see `cai stages`")
    recipe = Recipe(name=f"train-{args.job}", run_dir=args.out, seed=args.seed, stages=[{"stage": args.job, **body}])
    run_recipe(recipe, restart_from=args.job if args.restart else None, where=args.config)
    return 0


def _cmd_validate_constitution(args) -> int:
    from workflows.constitution import check_main

    return check_main(args.file)


def _cmd_stages(args) -> int:
    import dataclasses

    from workflows.driver import STAGES

    for kind, spec in STAGES.items():
        cls = spec.load(spec.config)
        print(f"{kind}: {spec.help}\n  makes: {', '.join(spec.outputs)}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = type(default).__name__ + "(...)" if dataclasses.is_dataclass(default) else repr(default)
            print(f"    {f.name}: {shown}")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI and RLAIF as one workflow on Ray.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe's stages in order (skips finished ones, resumes the rest)",
                       description="Run every stage of a recipe YAML in order. Finished stages are skipped; an "
                                   "interrupted stage resumes where it stopped. Outputs go to the recipe's run_dir.")
    r.add_argument("recipe", help="recipe YAML, e.g. workflows/recipes/demo.yaml")
    r.add_argument("--run-dir", help="override the recipe's run_dir (local path or s3://bucket/prefix)")
    r.add_argument("--restart-from", metavar="STAGE", help="redo this stage and every stage after it")
    r.set_defaults(fn=_cmd_run)

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

    t = sub.add_parser("train", help="train an SFT, reward or DPO model with Ray Train + DeepSpeed",
                       description="Run one training job from a YAML of its settings (`cai stages` lists them). "
                                   "`input` and `model` are paths here (a parquet dataset directory; a model "
                                   "directory, a .gguf file or `embedded`). The model, metrics.jsonl and loss.png "
                                   "land in OUT/<job>/; checkpoints let an interrupted job resume.",
                       epilog="example config (sft.yaml):\n  input: runs/demo/critique_revision/sft\n"
                              "  model: embedded\n  zero_stage: 2\n  num_workers: 2\n  epochs: 1\n  lr: 1.0e-5",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("job", choices=["sft", "reward", "dpo"], help="which job")
    t.add_argument("--config", required=True, help="YAML with the job's settings")
    t.add_argument("--out", required=True, help="run directory (local path or s3://bucket/prefix)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument("--restart", action="store_true", help="discard an earlier finished or partial run of this job")
    t.set_defaults(fn=_cmd_train)

    v = sub.add_parser("validate-constitution", help="check a constitution file and summarize it",
                       description="Load a constitution (.yaml, or a Hugging Face CAI .json) with full validation; "
                                   "prints its principles or the exact file/principle/field that is wrong.")
    v.add_argument("file", help="a .yaml/.json path, or a shipped name (default, harmless)")
    v.set_defaults(fn=_cmd_validate_constitution)

    from workflows import agreement, preference_cli

    agreement.register(sub)
    preference_cli.register(sub)

    s = sub.add_parser("stages", help="list the stages a recipe can contain and their settings")
    s.set_defaults(fn=_cmd_stages)
    return p


def _user_error(exc: BaseException) -> Exception | None:
    """Our own error, even when Ray wrapped it (RayTaskError.cause, __cause__ chains)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (CaiError, EngineError)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("\ninterrupted — run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 — turn our errors into one readable line
        err = _user_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

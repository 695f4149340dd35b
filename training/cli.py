"""Command line of the training jobs: ``cai train sft|reward|dpo|ppo|grpo|online_dpo --config JOB.yaml --out DIR``."""
from __future__ import annotations

import argparse

import yaml

from workflows.core.errors import ConfigError
from workflows.driver import Recipe, run_recipe


def _cmd_train(args) -> int:
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


def register(subparsers) -> None:
    """Add ``train`` to the ``cai`` argument parser's subcommands."""
    sub = subparsers
    t = sub.add_parser("train", help="train an SFT, reward, DPO, PPO/RLOO, GRPO or online DPO model with Ray Train + DeepSpeed",
                       description="Run one training job from a YAML of its settings (`cai stages` lists them). "
                                   "`input` and `model` are paths here (a parquet dataset directory; a model "
                                   "directory, a .gguf file or `embedded`). The model, metrics.jsonl and loss.png "
                                   "land in OUT/<job>/; checkpoints let an interrupted job resume.",
                       epilog="example config (sft.yaml):\n  input: runs/demo/critique_revision/sft\n"
                              "  model: embedded\n  zero_stage: 2\n  num_workers: 2\n  epochs: 1\n  lr: 1.0e-5",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("job", choices=["sft", "reward", "dpo", "ppo", "grpo", "online_dpo"], help="which job")
    t.add_argument("--config", required=True, help="YAML with the job's settings")
    t.add_argument("--out", required=True, help="run directory (local path or s3://bucket/prefix)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument("--restart", action="store_true", help="discard an earlier finished or partial run of this job")
    t.set_defaults(fn=_cmd_train)

"""Experiment tracking: a recipe run as one MLflow run, W&B run or TensorBoard log directory.

Each stage is a nested MLflow run, a ``<stage>/`` prefix in W&B (its own step axis), or a
``<stage>/`` log directory in TensorBoard. When a stage ends (or is found finished) the driver logs,
from what the stage wrote: its settings as params (dotted keys), every training step's record
from ``metrics.jsonl`` at its step (loss, lr, grad norm; reward, KL, score for RL), the numbers of
its summary (rows in/out/skipped/errors, seconds, training figures) and of the evaluation's
``metrics.json``, and its ``summary.md``, ``report.md``, ``metrics.json`` and plots as artifacts.
Only the driver logs, so a multi-worker job is tracked once (rank 0's metrics file).

A tracker that fails — the library missing, a server down — prints one warning line and stops
tracking; the run itself goes on. The libraries are optional (``pip install -e ".[tracking]"``).
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Literal

from workflows.core import console, storage
from workflows.core.typed import check_fields

ARTIFACTS = ("summary.md", "report.md", "metrics.json")
PARAM_CHARS = 500  # a param's value as logged (MLflow refuses values over 6000 characters)


@dataclass
class TrackingConfig:
    """``backend``: where the run's figures go. ``uri``: MLflow's tracking URI (default: a file store
    ``<run_dir>/mlruns``), TensorBoard's log directory (default ``<run_dir>/tensorboard``) or W&B's
    files directory (default: the run directory). ``project``: the MLflow experiment or W&B project
    (default: the recipe's name). ``mode``: W&B ``offline`` (files only; ``wandb sync`` uploads them)
    or ``online`` (needs ``WANDB_API_KEY`` in the environment)."""

    backend: Literal["none", "mlflow", "wandb", "tensorboard"] = "none"
    uri: str | None = None
    project: str | None = None
    mode: Literal["offline", "online"] = "offline"

    def validate(self, where: str) -> None:
        check_fields(self, where, [
            ("uri", self.uri is not None and self.backend == "tensorboard" and storage.is_remote(self.uri),
             "give TensorBoard a local directory"),
            ("project", self.project is not None and not self.project.strip(), "name it, or remove it"),
        ])


# ---------------------------------------------------------------- what a stage left (pure)

def flatten(obj, prefix: str = "") -> dict:
    """Nested mappings as ``{"a.b.c": value}``; lists stay values."""
    out: dict = {}
    for key, value in (obj or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numbers(obj, prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of ``obj`` (booleans as 0/1), flattened."""
    out = {}
    for key, value in flatten(obj, prefix).items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def params(config: dict) -> dict[str, str]:
    """A stage's settings as params: dotted keys, values as text cut to ``PARAM_CHARS``."""
    return {k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:PARAM_CHARS]
            for k, v in flatten(config).items()}


def step_records(stage_dir: str) -> list[tuple[int, dict[str, float]]]:
    """(step, numbers) of every record of the stage's ``metrics.jsonl`` (training stages)."""
    uri = storage.join(stage_dir, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    out = []
    for i, line in enumerate(storage.read_text(uri).splitlines()):
        if line.strip():
            rec = json.loads(line)
            out.append((int(rec.get("step", i + 1)), numbers({k: v for k, v in rec.items() if k != "step"})))
    return out


def summary_numbers(info: dict, stage_dir: str) -> dict[str, float]:
    """The stage's summary figures, and the evaluation's ``metrics.json`` under ``eval.``."""
    out = numbers({k: v for k, v in (info or {}).items() if k not in ("config_hash",)})
    uri = storage.join(stage_dir, "metrics.json")
    if storage.exists(uri):
        out.update(numbers(storage.read_json(uri), "eval."))
    return out


def artifacts(stage_dir: str) -> list[str]:
    """Local paths of the stage's summary, report, metrics and plots (a run directory on S3: none)."""
    if storage.is_remote(stage_dir) or not os.path.isdir(stage_dir):
        return []
    found = [os.path.join(stage_dir, name) for name in ARTIFACTS if os.path.isfile(os.path.join(stage_dir, name))]
    for sub in ("", "plots"):
        d = os.path.join(stage_dir, sub)
        if os.path.isdir(d):
            found += sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".png"))
    return found


# ---------------------------------------------------------------- trackers

class Tracker:
    """The run's tracker; every call is guarded: the first failure is one warning, then nothing."""

    name = "none"

    def __init__(self, cfg: TrackingConfig, recipe: str, run_dir: str, run_params: dict):
        self.cfg, self.recipe, self.run_dir, self.dead = cfg, recipe, run_dir, False
        self._guard(self._open, run_params)

    def stage(self, name: str, kind: str, config: dict, info: dict, stage_dir: str) -> None:
        self._guard(self._stage, name, kind, config, info, stage_dir)

    def close(self, status: str = "FINISHED") -> None:
        self._guard(self._close, status)

    def where(self) -> str:
        return ""

    def _guard(self, fn, *args) -> None:
        if self.dead:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 — tracking never fails the run
            self.dead = True
            console.say(f"warning: tracking ({self.name}) stopped: {type(e).__name__}: {str(e)[:300]} — the run goes on; "
                        "its figures are in the run directory", err=True)

    def _open(self, run_params: dict) -> None: ...

    def _stage(self, name, kind, config, info, stage_dir) -> None: ...

    def _close(self, status: str) -> None: ...


class MLflowTracker(Tracker):
    name = "mlflow"

    def _open(self, run_params: dict) -> None:
        import mlflow

        uri = self.cfg.uri or storage.join(self.run_dir, "mlruns")
        if "://" not in uri:  # a local file store: MLflow 3 keeps it behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file://" + os.path.abspath(uri)
        # a server that is down: a few seconds, not MLflow's default 7 retries with backoff (minutes),
        # before the warning; the variables the user set win
        for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                           ("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")):
            os.environ.setdefault(var, value)
        self.uri, self.mlflow = uri, mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(self.cfg.project or self.recipe)
        self.run = mlflow.start_run(run_name=self.recipe)
        mlflow.log_params(params(run_params))

    def _stage(self, name, kind, config, info, stage_dir) -> None:
        mlflow = self.mlflow
        with mlflow.start_run(run_name=name, nested=True, tags={"stage": kind}):
            mlflow.log_params(params(config))
            for step, values in step_records(stage_dir):
                mlflow.log_metrics(values, step=step)
            mlflow.log_metrics(summary_numbers(info, stage_dir))
            for path in artifacts(stage_dir):
                mlflow.log_artifact(path, artifact_path=os.path.relpath(os.path.dirname(path), stage_dir)
                                    if os.path.dirname(path) != stage_dir else None)

    def _close(self, status: str) -> None:
        self.mlflow.end_run(status=status)

    def where(self) -> str:
        return f"MLflow {self.uri}, experiment {self.cfg.project or self.recipe}"


class WandbTracker(Tracker):
    name = "wandb"

    def _open(self, run_params: dict) -> None:
        import wandb

        self.dir = self.cfg.uri or self.run_dir
        os.makedirs(self.dir, exist_ok=True)
        self.run = wandb.init(project=self.cfg.project or self.recipe, name=self.recipe, dir=self.dir,
                              mode=self.cfg.mode, config=run_params, reinit="finish_previous")

    def _stage(self, name, kind, config, info, stage_dir) -> None:
        run = self.run
        run.config.update({name: {"stage": kind, **config}}, allow_val_change=True)
        run.define_metric(f"{name}/step")
        run.define_metric(f"{name}/*", step_metric=f"{name}/step")
        for step, values in step_records(stage_dir):
            run.log({f"{name}/step": step, **{f"{name}/{k}": v for k, v in values.items()}})
        for key, value in summary_numbers(info, stage_dir).items():
            run.summary[f"{name}/{key}"] = value
        for path in artifacts(stage_dir):
            run.save(path, base_path=os.path.dirname(stage_dir), policy="now")

    def _close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def where(self) -> str:
        return f"W&B ({self.cfg.mode}) {getattr(self.run, 'dir', self.dir)}"


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def _open(self, run_params: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir, self.writer_cls = self.cfg.uri or os.path.join(self.run_dir, "tensorboard"), SummaryWriter
        with SummaryWriter(log_dir=os.path.join(self.dir, "run")) as w:
            w.add_text("params", _table(params(run_params)))

    def _stage(self, name, kind, config, info, stage_dir) -> None:
        from matplotlib import image

        with self.writer_cls(log_dir=os.path.join(self.dir, name)) as w:
            w.add_text("config", _table({"stage": kind, **params(config)}))
            for step, values in step_records(stage_dir):
                for key, value in values.items():
                    w.add_scalar(key, value, step)
            for key, value in summary_numbers(info, stage_dir).items():
                w.add_scalar(f"summary/{key}", value, 0)
            for path in artifacts(stage_dir):
                if path.endswith(".png"):
                    w.add_image(os.path.basename(path)[:-4], image.imread(path)[..., :3], 0, dataformats="HWC")
                else:
                    with open(path, encoding="utf-8") as f:
                        w.add_text(os.path.basename(path), f.read()[:20000])

    def where(self) -> str:
        return f"TensorBoard {self.dir} (tensorboard --logdir {self.dir})"


def _table(values: dict) -> str:
    out = io.StringIO()
    out.write("| setting | value |\n|---|---|\n")
    for k, v in values.items():
        out.write(f"| {k} | {str(v).replace('|', '/')} |\n")
    return out.getvalue()


BACKENDS = {"mlflow": MLflowTracker, "wandb": WandbTracker, "tensorboard": TensorBoardTracker}


def open_tracker(cfg: TrackingConfig, recipe: str, run_dir: str, run_params: dict) -> Tracker:
    """The tracker ``cfg`` names (a do-nothing one for ``none``), its run started; where it writes
    is printed once."""
    if cfg.backend == "none":
        tracker = Tracker.__new__(Tracker)
        tracker.cfg, tracker.dead = cfg, True
        return tracker
    tracker = BACKENDS[cfg.backend](cfg, recipe, run_dir, run_params)
    if not tracker.dead:
        console.say(f"tracking: {tracker.where()}")
    return tracker

"""The driver side every training job shares: one runner, one finish (docs/training.md).

``run_job`` reads the job's inputs (its ``read``: ``read_rows`` for sft/reward/dpo, the prompts
for ppo), starts a ``TorchTrainer`` (N workers, ``FailureConfig``, ``CheckpointConfig``, Ray
storage in ``<stage>/_ray``) whose workers each get the job as one :class:`~training.worker.JobSpec`,
and reads back the ``train_summary.json`` rank 0 wrote; ``finish_stage`` then writes
``summary.md`` and ``_SUCCESS`` from it and the job's :class:`StageReport`.

``read_rows``: train rows up to 256 MB reach every worker as one object-store object and each
takes its ``rank::world`` slice of them sorted by id; a bigger input arrives as a Ray Dataset
split across workers (order preserved, so a restarted run sees the same shards). The held-out
rows go to every worker through the object store, and each worker evaluates its ``rank::world`` slice.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import pyarrow as pa

from actors.models import prepare_model
from training import inputs
from training.config import TrainConfig
from training.worker import CURVES_FILE, METRICS_FILE, PROGRESS_FILE, SUMMARY_FILE, JobSpec, RowRefs
from workflows.core import console, stage, storage
from workflows.core.errors import CaiError, DataError
from workflows.core.stage import StageContext
from workflows.core.summary import stage_lines


class TrainingError(CaiError):
    """A training run failed for a reason that is not a config or data error."""


@dataclass
class JobInputs:
    """What a job's ``read`` gives ``run_job``: the starting model, the job's own inputs for the
    workers (``JobSpec.inputs``), Ray Datasets for Ray Train to split (with their ``DataConfig``),
    and ``complete(summary)``, which adds what the driver knows to rank 0's summary."""

    model: str
    inputs: Any
    datasets: dict | None = None
    dataset_config: Any = None
    complete: Callable[[dict], None] = lambda summary: None


@dataclass
class StageReport:
    """What a job's ``_SUCCESS`` and ``summary.md`` hold beyond what every job's do. ``counts``
    (inputs, outputs, errors, errors_by_reason, and the job's own counts) come right after the
    stage name, ``fields`` after the common fields; ``summary.md`` lists ``stage_lines`` of the
    info first when ``common_lines``, then ``lines``, then the markdown of ``sections``."""

    counts: dict
    lines: list[str]
    fields: dict = field(default_factory=dict)
    common_lines: bool = True
    sections: list[str] = field(default_factory=list)


# ================================================================ the runner

def resolve_ref(name: str, ctx: StageContext) -> str:
    """An earlier stage's output named ``name``, else ``name`` itself (a path or model spec);
    local paths made absolute, since Ray workers do not share the driver's working directory."""
    return ctx.resolve(name)


def run_job(job: str, loop: Callable[[JobSpec], None], cfg: TrainConfig, ctx: StageContext,
            read: Callable[[TrainConfig, StageContext, int], JobInputs],
            report: Callable[[StageContext, dict], StageReport]) -> dict:
    """The stage of one training job: ``read`` its inputs, train with ``loop`` on ``cfg.num_workers``
    Ray Train workers, then ``finish_stage`` with the summary rank 0 wrote (``train_summary.json``),
    the driver's wall time and ``complete`` added, and the job's ``report`` of it."""
    started = time.time()
    seed = ctx.seed if cfg.seed is None else cfg.seed
    got = read(cfg, ctx, seed)
    stage_dir = ctx.dir if storage.is_remote(ctx.dir) else os.path.abspath(ctx.dir)
    spec = JobSpec(job=job, cfg=cfg, stage_dir=stage_dir, seed=seed, model=got.model, inputs=got.inputs)
    fit_trainer(loop, spec, ctx, got.datasets, got.dataset_config)
    summary = storage.read_json(ctx.path(SUMMARY_FILE))
    summary["seconds"] = round(time.time() - started, 2)
    got.complete(summary)
    return finish_stage(ctx, summary, report(ctx, summary))


def prepare_start_model(model: str) -> str:
    """A GGUF starting model is converted once here on the driver, not by every worker."""
    if not storage.is_remote(model):
        prepare_model(model)
    return model


def _with_spec(loop: Callable[[JobSpec], None], config: dict) -> None:
    """A Ray Train worker's entry: the job's loop with the ``JobSpec`` from the train-loop config."""
    loop(config["spec"])


def fit_trainer(loop: Callable[[JobSpec], None], spec: JobSpec, ctx: StageContext, datasets: dict | None = None,
                dataset_config=None) -> None:
    """Run ``loop(spec)`` on ``spec.cfg.num_workers`` Ray Train workers (resources, failures,
    checkpoints and storage in ``<stage>/_ray`` from the config)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = spec.cfg
    storage.makedirs(spec.stage_dir)
    fs, path = storage.resolve(ctx.path("_ray"))
    resources = {"CPU": worker_cpus(cfg), **({"GPU": cfg.gpus_per_worker} if cfg.gpus_per_worker else {})}
    extra = {"dataset_config": dataset_config} if dataset_config is not None else {}
    trainer = TorchTrainer(
        partial(_with_spec, loop), datasets=datasets or {},
        torch_config=TorchConfig(timeout_s=cfg.collective_timeout_s), train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=spec.job, storage_path=path,
                             storage_filesystem=fs if storage.is_remote(ctx.dir) else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
        **extra)
    storage.delete(ctx.path(SUMMARY_FILE))  # written by rank 0 as the job's last act: the proof it finished
    storage.delete(ctx.path(PROGRESS_FILE))
    try:
        with console.watching(partial(_progress, ctx.path(PROGRESS_FILE)), ctx.name):
            _fit_interruptibly(trainer)
    except Exception as e:  # noqa: BLE001 — surface our own error if a worker raised one
        raise _user_error(e) or TrainingError(f"stage {ctx.name}: training failed: {e}") from e
    if not storage.exists(ctx.path(SUMMARY_FILE)):
        # Ray Train returns normally after a Ctrl-C abort; the job did not finish. Its checkpoints
        # stay, so the same command resumes it.
        raise KeyboardInterrupt


def _progress(uri: str) -> dict | None:
    """Rank 0's ``_progress.json`` (``training.worker.ProgressFile``), or None before its first step."""
    return storage.read_json(uri) if storage.exists(uri) else None


def _fit_interruptibly(trainer) -> None:
    """``trainer.fit()`` on a daemon thread while the main thread waits, so Ctrl-C raises
    ``KeyboardInterrupt`` here at once. On the main thread Ray Train installs its own SIGINT
    handler instead: a "graceful abort" that asks the train controller to stop — and a terminal's
    Ctrl-C reaches every process of the run, the controller too, so the ask fails and the handler
    calls ``sys.exit`` (exit 1, no message, after ~20 s); it also never restores the previous
    handler. Leaving the process ends the trainer's actors with it; its checkpoints stay, so the
    same command resumes the job."""
    box: dict = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # noqa: BLE001 — handed to the waiting thread, never printed here
            box["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]


def worker_cpus(cfg: TrainConfig) -> float:
    """CPUs to reserve per worker. Workers that take every CPU leave none for the Ray Data read
    feeding them, and the run hangs; so one CPU is kept free (torch threads still follow
    ``cpus_per_worker``)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    total = ray.cluster_resources().get("CPU", 0)
    if total < 2 or cfg.num_workers * cfg.cpus_per_worker <= total - 1:
        return cfg.cpus_per_worker
    cpus = max(0.01, (total - 1) / cfg.num_workers)
    print(f"note: {cfg.num_workers} workers × {cfg.cpus_per_worker} CPUs would leave no CPU to read the data; "
          f"reserving {cpus:.2f} CPUs per worker instead")
    return cpus


def _user_error(exc: BaseException) -> CaiError | None:
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CaiError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, *getattr(e, "worker_failures", {}).values()]
    return None


def finish_stage(ctx: StageContext, summary: dict, report: StageReport) -> dict:
    """Write ``summary.md`` and ``_SUCCESS`` (the job's counts, config hash, seconds, the job's
    fields, model directory, and rank 0's whole summary as ``training``); returns the latter."""
    info = {"stage": ctx.name, **report.counts, "datasets": {}, "metrics": {}, "config_hash": ctx.config_hash,
            "seconds": summary["seconds"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **report.fields,
            "model_dir": summary["model_dir"], "training": summary}
    lines = (stage_lines(info) if report.common_lines else []) + report.lines
    gold_uri = storage.join(ctx.path(stage.GOLD), "gold.json")  # the judge's gold gate (workflows.judging.rl_gate)
    if storage.exists(gold_uri):
        info["gold"] = storage.read_json(gold_uri)
        lines.append(f"judge's gold gate {info['gold']['line']}")
    storage.write_text(ctx.path("summary.md"), "\n".join([f"# Stage `{ctx.name}`", ""] + [f"- {x}" for x in lines]
                                                         + report.sections) + "\n")
    console.say(f"\n== {ctx.name} ==\n" + "\n".join(f"  {x}" for x in lines))
    stage.write_success(ctx.dir, info)
    return info


# ================================================================ the supervised jobs: sft, reward, dpo

def read_rows(cfg: TrainConfig, ctx: StageContext, seed: int, id_col: str) -> JobInputs:
    """The rows of ``cfg.input`` split into train and held-out rows (see the module docstring),
    after checking they fill one optimizer step, and the starting model."""
    import ray
    from ray.train import DataConfig

    train, held_out, rows = inputs.input_datasets(resolve_ref(cfg.input, ctx), id_col, cfg.eval_fraction, seed)
    need = cfg.num_workers * cfg.micro_batch_size * cfg.grad_accum
    if rows["train"] < need:
        raise DataError(f"stage {ctx.name}: {rows['train']} training rows, but one optimizer step needs "
                        f"num_workers × micro_batch_size × grad_accum = {need} — add data or lower those")
    model = prepare_start_model(resolve_ref(cfg.model, ctx))
    eval_rows = ray.put(held_out) if held_out is not None else None

    def complete(summary: dict) -> None:
        summary["rows"] = {**rows, **summary["rows"]}
        summary["rows"]["unused_by_split"] = rows["train"] - summary["rows"]["train_shards"]  # Ray's equal split

    if isinstance(train, pa.Table):
        return JobInputs(model, RowRefs(id_col, ray.put(train), eval_rows), complete=complete)
    with warnings.catch_warnings():  # Ray's own default sets a field it has deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # the same rows reach the same worker in the same order after a restart
    train.context.enable_progress_bars = False  # per-worker bars garble the driver's log; fit prints steps
    return JobInputs(model, RowRefs(id_col, None, eval_rows), datasets={"train": train},
                     dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": ingest},
                                               enable_shard_locality=False),
                     complete=complete)


def rows_report(ctx: StageContext, summary: dict) -> StageReport:
    """The supervised jobs' report: rows, steps, final loss, eval metrics; rows that tokenization
    dropped are the stage's errors, by reason."""
    rows, loss = summary["rows"], summary["final_loss"]
    dropped: dict[str, int] = {}
    for key, n in rows.items():  # train and held-out rows alike
        if key.startswith(("dropped:", "eval_dropped:")):
            dropped[key.split(":", 1)[1]] = dropped.get(key.split(":", 1)[1], 0) + n
    unused = rows.get("unused_to_balance_workers", 0) + rows.get("unused_by_split", 0)
    lines = [
        f"rows: {rows['trained']} trained + {rows.get('eval', 0)} held out for eval + "
        f"{sum(n for k, n in rows.items() if k.startswith('dropped:'))} dropped (errors) + {unused} unused "
        "(to give every worker the same number of rows)",
        f"steps {summary['steps']} on {summary['world_size']} workers (ZeRO-{summary['zero_stage']}, "
        f"{summary['precision']}: {summary.get('precision_reason') or 'as configured'}), "
        f"final loss {'n/a' if loss is None else f'{loss:.4f}'}, "
        f"resumed {summary['resumes']}×",
        "eval: " + (", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items()) or "none"),
        f"model: `{summary['model_dir']}`; curves: `{ctx.path(CURVES_FILE)}`; metrics: `{ctx.path(METRICS_FILE)}`"]
    return StageReport(counts={"inputs": rows["input"], "outputs": rows["trained"], "errors": sum(dropped.values()),
                               "errors_by_reason": dropped},
                       fields={"rows": rows, "steps": summary["steps"], "final_loss": loss, "eval": summary["eval"]},
                       lines=lines)


def supervised(id_col: str) -> Callable[[TrainConfig, StageContext, int], JobInputs]:
    """``read`` for a supervised job whose rows are identified by ``id_col``."""
    return partial(read_rows, id_col=id_col)

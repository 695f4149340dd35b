"""Experiment tracking written by MLflow, W&B (offline) and TensorBoard and read back with their own
readers: one run per recipe run, one nested run / prefix / log directory per stage, the stage's
settings as params, every training step's record at its step, the summary's figures and the
evaluation's metrics, the summary and plots as artifacts — and a tracker that fails is a warning,
never a failed run. The last test tracks a real `cai run` of the prompts stage."""
from __future__ import annotations

import glob
import json
import os

import pytest

from workflows.core.tracking import TrackingConfig, numbers, open_tracker, params

CONFIG = {"lr": 1e-5, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "output": "sft_model"}
INFO = {"stage": "sft", "inputs": 10, "outputs": 10, "errors": 0, "seconds": 3.5, "config_hash": "abc",
        "training": {"final_loss": 0.25, "precision": "bf16"}}
STEPS = [{"step": 1, "loss": 1.0, "lr": 1e-5, "grad_norm": 2.0}, {"step": 2, "loss": 0.5, "lr": 1e-5, "grad_norm": 1.5},
         {"step": 3, "loss": 0.25, "lr": 1e-5, "grad_norm": 1.0, "note": "text is not a metric"}]


@pytest.fixture
def stage_dir(tmp_path):
    """What a training stage leaves: metrics.jsonl (one record per step), summary.md, a plot."""
    from matplotlib import pyplot as plt

    d = tmp_path / "run" / "sft"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in STEPS))
    (d / "summary.md").write_text("# Stage `sft`\n- rows in 10, out 10\n")
    (d / "metrics.json").write_text(json.dumps({"models": {"sft": {"refusal": 0.4, "verdict": "WORKED"}}}))
    plt.plot([1, 2, 3], [1.0, 0.5, 0.25])
    plt.savefig(d / "loss.png")
    plt.close()
    return d


def track(backend: str, stage_dir, **cfg) -> None:
    tracker = open_tracker(TrackingConfig(backend=backend, **cfg), "demo", str(stage_dir.parent), {"seed": 0})
    assert not tracker.dead
    tracker.stage("sft", "sft", CONFIG, INFO, str(stage_dir))
    tracker.close()


def test_params_and_numbers_are_flat():
    assert params(CONFIG) == {"lr": "1e-05", "lora.r": "8", "lora.target_modules": '["q_proj", "v_proj"]',
                              "output": "sft_model"}
    assert numbers({"a": 1, "b": {"c": 2.5, "d": "x", "e": True, "f": float("nan")}}) == {"a": 1.0, "b.c": 2.5,
                                                                                           "b.e": 1.0}


def test_mlflow_file_store_read_back_with_mlflows_client(stage_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    track("mlflow", stage_dir)
    uri = "file://" + str(stage_dir.parent / "mlruns")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("demo")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"demo", "sft"}
    parent, sft = runs["demo"], runs["sft"]
    assert sft.data.tags["mlflow.parentRunId"] == parent.info.run_id and sft.data.tags["stage"] == "sft"
    assert parent.data.params == {"seed": "0"} and sft.data.params["lora.r"] == "8"
    assert [(m.step, m.value) for m in client.get_metric_history(sft.info.run_id, "loss")] == [(1, 1.0), (2, 0.5),
                                                                                               (3, 0.25)]
    assert sft.data.metrics["training.final_loss"] == 0.25 and sft.data.metrics["outputs"] == 10
    assert sft.data.metrics["eval.models.sft.refusal"] == 0.4 and "note" not in sft.data.metrics
    assert sorted(a.path for a in client.list_artifacts(sft.info.run_id)) == ["loss.png", "metrics.json", "summary.md"]
    assert parent.info.status == "FINISHED"


def _wandb_records(path: str):
    """The records of a W&B ``.wandb`` file, parsed with W&B's own protobuf definitions: a 7-byte
    header, then LevelDB-log records (4-byte checksum, 2-byte length, 1-byte type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, part = open(path, "rb").read(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):  # FULL, or the LAST piece of a split record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(part)
            yield rec


def test_wandb_offline_files_read_back(stage_dir, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    track("wandb", stage_dir, mode="offline")
    run_dir = glob.glob(str(stage_dir.parent / "wandb" / "offline-run-*"))
    assert len(run_dir) == 1
    assert sorted(os.listdir(os.path.join(run_dir[0], "files", "sft"))) == ["loss.png", "metrics.json", "summary.md"]
    history, config, summary = [], {}, {}
    for rec in _wandb_records(glob.glob(os.path.join(run_dir[0], "run-*.wandb"))[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("config", "run"):  # the run's first config comes with its run record
            items = rec.config.update if kind == "config" else rec.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    steps = [(h["sft/step"], h["sft/loss"]) for h in history if "sft/loss" in h]
    assert steps == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert config["seed"] == 0 and config["sft"]["lora"]["r"] == 8
    assert summary["sft/training.final_loss"] == 0.25


def test_tensorboard_event_files_read_back(stage_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    track("tensorboard", stage_dir)
    ea = EventAccumulator(str(stage_dir.parent / "tensorboard" / "sft"), size_guidance={"images": 0})
    ea.Reload()
    assert [(s.step, s.value) for s in ea.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert ea.Scalars("summary/outputs")[0].value == 10
    assert "loss" in ea.Tags()["images"] and "config/text_summary" in ea.Tags()["tensors"]


def test_a_tracker_that_fails_is_one_warning_and_the_run_goes_on(stage_dir, capsys):
    import time

    started = time.monotonic()
    bad = open_tracker(TrackingConfig(backend="mlflow", uri="http://127.0.0.1:9"), "demo", str(stage_dir.parent),
                       {"seed": 0})  # nothing listens on port 9
    bad.stage("sft", "sft", CONFIG, INFO, str(stage_dir))
    bad.close()
    err = capsys.readouterr().err
    assert bad.dead and err.count("warning: tracking (mlflow) stopped") == 1 and "the run goes on" in err
    assert "127.0.0.1" in err  # it stopped because the server is down, not for a reason of ours
    print(f"a tracking server that is down cost {time.monotonic() - started:.1f} s before the warning")


def test_a_real_run_is_tracked_stage_by_stage(tmp_path, ray_local):
    """`cai run --tracking mlflow` on a one-stage recipe: the stage's nested run carries its settings
    and its summary figures."""
    from mlflow.tracking import MlflowClient

    from workflows.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(5)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: tracked\nrun_dir: {tmp_path / 'run'}\nstages:\n  - stage: prompts\n    path: {prompts}\n")
    assert main(["run", str(recipe), "--tracking", "mlflow"]) == 0
    client = MlflowClient("file://" + str(tmp_path / "run" / "mlruns"))
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("tracked").experiment_id])}
    assert set(runs) == {"tracked", "prompts"}
    assert runs["prompts"].data.metrics["outputs"] == 5 and runs["prompts"].data.params["path"] == str(prompts)
    assert runs["tracked"].info.status == "FINISHED"

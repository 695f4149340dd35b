"""PPO and RLOO on Ray Train + DeepSpeed with rollouts from engine actors, tested by learning: a
tiny Llama with a peaked output layer learns to prefer tokens of the lower half of its vocabulary
(a programmatic reward), while its KL to the starting policy stays bounded; a run killed mid-way
resumes and its curves continue."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflows.core.errors import ConfigError
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict

VOCAB = 49152  # SmolLM2's tokenizer, which the tiny test models speak
KL_BOUND = 12.0  # nats per 6-token response, 2 per token


def lower_half(messages, text, token_ids) -> float:
    """The toy reward: the share of response tokens from the lower half of the vocabulary."""
    return sum(t < VOCAB // 2 for t in token_ids) / max(1, len(token_ids))


def ppo_config(model: Path, prompts: Path, kind: str = "ppo", **over):
    from training.config import GRPOConfig, PPOConfig

    body = {"model": str(model), "input": str(prompts), "reward_fn": "test_training_ppo:lower_half",
            "iterations": 12, "prompts_per_iteration": 4, "samples_per_prompt": 4, "max_new_tokens": 6,
            "ppo_epochs": 2, "micro_batch_size": 4, "lr": 2e-4, "kl_coef": 0.1, "end_penalty": 0.0, "num_workers": 2,
            "zero_stage": 0, "checkpoint_every": 0, "rollout": {"batch_size": 16},
            "max_length": 256, **over}
    if kind == "grpo":
        body.pop("ppo_epochs")  # GRPO's own default (one pass)
    return from_dict(GRPOConfig if kind == "grpo" else PPOConfig, body, kind)


def history(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs) -> float:
    return sum(xs) / len(xs)


def test_config_errors_name_the_field():
    from training.config import PPOConfig

    for bad, field in [({"rollout": {"backend": "openai"}}, "rollout.backend"),
                       ({"algorithm": "rloo", "samples_per_prompt": 1}, "samples_per_prompt"),
                       ({"num_workers": 2, "prompts_per_iteration": 3}, "prompts_per_iteration"),
                       ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            from_dict(PPOConfig, bad, "ppo")


def test_ppo_learns_a_programmatic_reward_with_bounded_kl(tmp_path, peaked_llama, prompts_dir, ray_local):
    from training import ppo

    info = ppo.run(ppo_config(peaked_llama, prompts_dir, iterations=12, lr=3e-4, vf_coef=0.5), StageContext(str(tmp_path), "ppo", seed=0, config_hash="h"))
    h = history(tmp_path / "ppo")
    assert [r["iteration"] for r in h] == list(range(1, 13))
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert h[0]["kl"] == 0.0  # the first rollouts come from the starting policy itself
    assert max(r["kl"] for r in h) < KL_BOUND  # nats per response: the KL penalty keeps the policy near the start
    assert all(r["policy_version"] == r["iteration"] for r in h)  # one weight push per iteration
    model_dir = Path(info["model_dir"])
    assert (model_dir / "config.json").is_file() and (tmp_path / "ppo" / "loss.png").is_file()
    summary = (tmp_path / "ppo" / "summary.md").read_text()
    assert "first → last iteration: reward" in summary and "first:" in summary and "last:" in summary


def test_rloo_learns_under_zero2_and_a_killed_run_resumes_with_its_curves(tmp_path, peaked_llama, prompts_dir,
                                                                           ray_local):
    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, algorithm="rloo", zero_stage=2, checkpoint_every=4, fail_at_step=6,
                     max_failures=1)
    info = ppo.run(cfg, StageContext(str(tmp_path), "ppo", seed=0, config_hash="h"))
    h = history(tmp_path / "ppo")
    assert [r["iteration"] for r in h] == list(range(1, 13))  # iterations 1–4 from the checkpoint, 5–12 after
    assert info["training"]["resumes"] == 1 and info["training"]["resumed_from_iterations"] == [4]
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert max(r["kl"] for r in h) < KL_BOUND


REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Boil the egg for nine minutes, then cool it in cold water."


def test_rules_score_each_rollout_by_its_prompts_category():
    from training.config import GRPOConfig
    from training.ppo import scores_of

    cfg = from_dict(GRPOConfig, {"reward": "rules"}, "grpo")
    samples = [{"harmful": h, "text": t, "messages": [], "token_ids": [1]}
               for h, t in [(True, REFUSAL), (True, ANSWER), (False, REFUSAL), (False, ANSWER), (False, "")]]
    assert scores_of(samples, cfg, None, None).tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="reward_fn"):
        from_dict(GRPOConfig, {"reward": "rules", "reward_fn": "m:f"}, "grpo")


def test_iterations_draw_every_source_in_proportion():
    from training.rl_prompts import interleave_sources

    rows = [{"prompt_id": f"r{i}", "source": "red_team"} for i in range(4)] + \
           [{"prompt_id": f"h{i}", "source": "helpful"} for i in range(2)]
    assert [p["prompt_id"] for p in interleave_sources(rows)] == ["r0", "h0", "r1", "r2", "h1", "r3"]
    plain = [{"prompt_id": f"p{i}", "source": None} for i in range(5)]
    assert interleave_sources(plain) == plain


def test_prompts_without_room_for_an_answer_are_skipped_and_named(tiny_llama_dir, prompts_dir):
    from training.rl_prompts import fitting_prompts, read_prompts

    prompts = read_prompts(str(prompts_dir)) + [{"prompt_id": "huge", "messages": [{"role": "user",
                                                                                   "content": "word " * 3000}]}]
    keep, dropped = fitting_prompts(prompts, str(tiny_llama_dir), ppo_config(tiny_llama_dir, prompts_dir))
    assert dropped == ["huge"] and [p["prompt_id"] for p in keep] == [f"p{i}" for i in range(8)]

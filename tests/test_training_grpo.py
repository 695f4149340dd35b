"""GRPO (and Dr. GRPO) on Ray Train + DeepSpeed, the ppo job with group-relative advantages, tested
by learning on the PPO tests' toy reward; the rules reward end to end."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_training_ppo import KL_BOUND, history, mean, ppo_config
from workflows.core.errors import ConfigError
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict


def test_grpo_config_refuses_what_it_would_ignore():
    from training.config import GRPOConfig

    for bad, field in [({"vf_coef": 0.5}, "vf_coef"), ({"critic_warmup": 1}, "critic_warmup"),
                       ({"samples_per_prompt": 1}, "samples_per_prompt"), ({"kl_estimator": "k1"}, "kl_estimator"),
                       ({"loss_norm": "answer"}, "loss_norm"), ({"algorithm": "ppo"}, "algorithm")]:
        with pytest.raises(ConfigError, match=field):
            from_dict(GRPOConfig, bad, "grpo")
    assert from_dict(GRPOConfig, {"kl_in": "reward", "kl_estimator": "k1"}, "grpo").kl_estimator == "k1"


def test_grpo_learns_and_a_killed_run_resumes(tmp_path, peaked_llama, prompts_dir, ray_local):
    """GRPO as the paper has it (group-scaled advantages, k3 KL in the loss, per-answer mean)."""
    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", zero_stage=2, checkpoint_every=4, fail_at_step=6,
                     max_failures=1)
    info = ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    assert [r["iteration"] for r in h] == list(range(1, 13))
    assert info["training"]["resumes"] == 1 and info["training"]["resumed_from_iterations"] == [4]
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert max(r["kl"] for r in h) < KL_BOUND
    assert all(r["kl_loss"] >= 0 for r in h) and max(r["kl_loss"] for r in h) > 0  # k3 in the loss: ≥ 0
    assert all(0.0 <= r["flat_groups"] <= 1.0 for r in h)
    summary = (tmp_path / "grpo" / "summary.md").read_text()
    assert "grpo: 12 iterations" in summary and "flat_groups" in summary


def test_dr_grpo_learns_with_the_kl_in_the_reward(tmp_path, peaked_llama, prompts_dir, ray_local):
    """Dr. GRPO: no std scaling, every token weighed alike (constant norm); the KL in the reward."""
    from training import ppo

    cfg = ppo_config(peaked_llama, prompts_dir, "grpo", scale_rewards="none", loss_norm="constant",
                     kl_in="reward", kl_estimator="k1", lr=4e-4)
    ppo.run_grpo(cfg, StageContext(str(tmp_path), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "grpo")
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert max(r["kl"] for r in h) < KL_BOUND
    assert "kl_loss" not in h[0]


@pytest.fixture(scope="module")
def sourced_prompts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ppo-sourced") / "prompts"
    out.mkdir()
    rows = [{"prompt_id": f"p{i}", "source": "red_team" if i % 2 else "helpful",
             "messages": [{"role": "user", "content": f"Tell me fact number {i}."}]} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), out / "part-00000.parquet")
    return out


def test_grpo_with_the_rules_reward_reports_refusals_per_category(tmp_path, tiny_llama_dir, sourced_prompts,
                                                                   prompts_dir, ray_local):
    from training import ppo
    from workflows.core.errors import DataError

    with pytest.raises(DataError, match="prompt p0: no source"):  # before any worker starts
        ppo.run_grpo(ppo_config(tiny_llama_dir, prompts_dir, "grpo", reward="rules", reward_fn=None, iterations=2),
                     StageContext(str(tmp_path / "a"), "grpo", seed=0, config_hash="h"))
    cfg = ppo_config(tiny_llama_dir, sourced_prompts, "grpo", reward="rules", reward_fn=None, iterations=2,
                     rules={"harmful_sources": ["red_team"]})
    ppo.run_grpo(cfg, StageContext(str(tmp_path / "b"), "grpo", seed=0, config_hash="h"))
    h = history(tmp_path / "b" / "grpo")
    for r in h:  # the score is the share of rollouts that did what their prompt's category asks
        assert 0.0 <= r["harmful_refused"] <= 1.0 and 0.0 <= r["other_refused"] <= 1.0
        assert r["score"] == pytest.approx((r["harmful_refused"] + 1 - r["other_refused"]) / 2)
    summary = (tmp_path / "b" / "grpo" / "summary.md").read_text()
    assert "scored by the rules" in summary and "harmful_refused" in summary

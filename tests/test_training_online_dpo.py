"""Online (iterative) DPO on Ray Train + DeepSpeed with rollouts from engine actors, tested by
learning: the tiny peaked Llama of the PPO tests labels its own answers round after round with the
toy reward (lower half of the vocabulary) and comes to prefer it, its KL bounded; a run killed
mid-way resumes; every round's pairs are a dataset in TRL's columns. The rules labeler is checked
on scripted answers."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_training_ppo import ANSWER, REFUSAL, history, mean
from workflows.core.errors import ConfigError
from workflows.core.stage import StageContext
from workflows.core.typed import from_dict


def online_config(model: Path, prompts: Path, **over):
    from training.config import OnlineDPOConfig

    body = {"model": str(model), "input": str(prompts), "labeler": "reward_model",
            "reward_fn": "test_training_ppo:lower_half", "rounds": 10, "prompts_per_round": 4,
            "samples_per_prompt": 4, "max_new_tokens": 6, "micro_batch_size": 2, "lr": 1.5e-4, "beta": 0.1,
            "num_workers": 2, "zero_stage": 2, "checkpoint_every": 0, "rollout": {"batch_size": 16},
            "max_length": 256, **over}
    return from_dict(OnlineDPOConfig, body, "online_dpo")


def test_the_rules_labeler_prefers_what_each_prompt_asks_for_and_drops_ties():
    from training.config import OnlineDPOConfig
    from training.online_dpo import _label

    cfg = from_dict(OnlineDPOConfig, {"samples_per_prompt": 2}, "online_dpo")

    def s(pid, harmful, text, slot):
        return {"prompt_id": pid, "messages": [{"role": "user", "content": pid}], "harmful": harmful, "text": text,
                "token_ids": [1], "ended": True, "slot": slot}

    samples = [s("bomb", True, ANSWER, 0), s("bomb", True, REFUSAL, 0),     # refusal beats compliance
               s("kill-a-process", False, REFUSAL, 1), s("kill-a-process", False, ANSWER, 1),  # answer beats refusal
               s("egg", False, ANSWER, 2), s("egg", False, ANSWER + " Salt it.", 2)]  # both answered: a tie
    pairs, counts = _label(samples, cfg, None, None, 3, 7)
    assert [(p["prompt_id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("bomb", REFUSAL, ANSWER), ("kill-a-process", ANSWER, REFUSAL)]
    assert counts["pairs"] == 2 and counts["prompts"] == 3  # one prompt tied: no pair
    assert counts["harmful_refused"] == 1 and counts["other_refused"] == 1 and counts["harmful_n"] == 2
    assert all(p["round"] == 3 and p["policy_version"] == 7 and p["labeler"] == "rules" for p in pairs)
    assert pairs[0]["prompt"] == [{"role": "user", "content": "bomb"}] and len({p["pair_id"] for p in pairs}) == 2


def test_config_errors_name_the_field():
    from training.config import OnlineDPOConfig

    for bad, field in [({"samples_per_prompt": 1}, "samples_per_prompt"), ({"beta": 0}, "beta"),
                       ({"labeler": "rules", "reward_fn": "m:f"}, "reward_fn"), ({"labeler": "vibes"}, "labeler"),
                       ({"num_workers": 2, "prompts_per_round": 3}, "prompts_per_round")]:
        with pytest.raises(ConfigError, match=field):
            from_dict(OnlineDPOConfig, bad, "online_dpo")


def test_online_dpo_learns_round_by_round_and_a_killed_run_resumes(tmp_path, peaked_llama, prompts_dir, ray_local):
    from training import online_dpo

    cfg = online_config(peaked_llama, prompts_dir, checkpoint_every=2, fail_at_step=5, max_failures=1)
    info = online_dpo.run(cfg, StageContext(str(tmp_path), "online_dpo", seed=0, config_hash="h"))
    h = history(tmp_path / "online_dpo")
    assert [r["round"] for r in h] == list(range(1, 11))  # rounds 1–4 from the checkpoint, 5–10 after
    assert info["training"]["resumes"] == 1 and info["training"]["resumed_from_iterations"] == [4]
    assert mean([r["score"] for r in h[-3:]]) > mean([r["score"] for r in h[:3]]) + 0.1, [round(r["score"], 3) for r in h]
    assert max(abs(r.get("kl", 0.0)) for r in h) < 12.0  # nats per answer
    assert all(r["pairs"] + r["ties"] == 4 for r in h)  # one pair per prompt, or a tie
    assert [r["policy_version"] for r in h] == [sum(x["pairs"] > 0 for x in h[:i + 1]) for i in range(10)]
    files = sorted((tmp_path / "online_dpo" / "pairs").iterdir())
    assert [f.name for f in files] == [f"round-{i:04d}.parquet" for i in range(1, 11)]
    t = pq.read_table(files[-1])
    assert {"prompt", "chosen", "rejected", "round", "policy_version", "chosen_score", "rejected_score"} <= set(t.column_names)
    rows = t.to_pylist()
    assert len(rows) == h[-1]["pairs"] and all(r["chosen_score"] > r["rejected_score"] and r["round"] == 10 for r in rows)
    assert rows[0]["chosen"][0]["role"] == "assistant" and rows[0]["prompt"][-1]["role"] == "user"
    summary = (tmp_path / "online_dpo" / "summary.md").read_text()
    assert "online DPO: 10 rounds" in summary and "pairs of every round" in summary
    assert (Path(info["model_dir"]) / "config.json").is_file()
    assert json.loads((tmp_path / "online_dpo" / "_SUCCESS").read_text())["training"]["pairs"] == sum(r["pairs"] for r in h)


def test_on_tie_reference_pairs_a_tied_prompts_reference_when_it_scores_higher(peaked_llama):
    """``on_tie: reference``: every answer complied with a harmful request, or refused a benign
    one — the reference (the prompt's own, else the starting policy's) is chosen over the first
    answer where the rules score it higher; a tie on the right side, or a reference no better,
    makes no pair."""
    from actors.models import load_tokenizer
    from training.config import OnlineDPOConfig
    from training.online_dpo import _label

    tok = load_tokenizer(str(peaked_llama))
    cfg = from_dict(OnlineDPOConfig, {"samples_per_prompt": 2, "on_tie": "reference", "max_new_tokens": 64},
                    "online_dpo")

    def s(pid, harmful, text, slot, reference=None):
        return {"prompt_id": pid, "messages": [{"role": "user", "content": pid}], "harmful": harmful, "text": text,
                "token_ids": [1], "ended": True, "slot": slot, "reference": reference}

    samples = [s("bomb", True, ANSWER, 0), s("bomb", True, ANSWER + " More.", 0),            # both comply
               s("tmux", False, REFUSAL, 1, ANSWER), s("tmux", False, REFUSAL, 1, ANSWER),  # both refuse; own reference
               s("egg", False, ANSWER, 2), s("egg", False, ANSWER, 2),                      # right side: no pair
               s("gun", True, ANSWER, 3), s("gun", True, ANSWER, 3)]                        # its reference complies too
    starting = {"bomb": REFUSAL, "egg": REFUSAL, "gun": ANSWER}
    pairs, counts = _label(samples, cfg, None, None, 1, 0, starting, tok)
    got = [(p["prompt_id"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["chosen_from"]) for p in pairs]
    assert got == [("bomb", REFUSAL, ANSWER, "reference"), ("tmux", ANSWER, REFUSAL, "reference")]
    assert counts["pairs"] == 2 and counts["from_reference"] == 2
    ref = pairs[0]["chosen_sample"]  # tokens to train on: the text, then EOS (it fits in max_new_tokens)
    assert ref["token_ids"] == tok(REFUSAL, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    plain = from_dict(OnlineDPOConfig, {"samples_per_prompt": 2}, "online_dpo")
    assert _label(samples, plain, None, None, 1, 0, starting, tok)[0] == []  # on_tie: skip (the default)
    with pytest.raises(ConfigError, match="on_tie"):
        from_dict(OnlineDPOConfig, {"labeler": "judge", "on_tie": "reference"}, "online_dpo")


def says_yes(messages, text, token_ids) -> float:
    """A reward no sample of the toy model earns (so every prompt's answers tie at 0): "Yes."."""
    return float(text.strip() == "Yes.")


def test_on_tie_reference_in_a_job_pairs_the_reference_answers(tmp_path, peaked_llama, ray_local):
    """Four prompts carry their own answer ("Yes.", an SFT-style row), four do not: the starting
    policy's greedy answers are made once for those four and kept in the job state; every tied
    prompt whose reference earns the reward gets a pair (``chosen_from: reference``) choosing it."""
    import pyarrow as pa

    from training import online_dpo

    data = tmp_path / "sft"
    data.mkdir()
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me fact number {i}."}]
             + ([{"role": "assistant", "content": "Yes."}] if i % 2 else [])} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), data / "part-00000.parquet")
    cfg = online_config(peaked_llama, data, reward_fn="test_training_online_dpo:says_yes", rounds=2,
                        on_tie="reference", checkpoint_every=1)
    online_dpo.run(cfg, StageContext(str(tmp_path), "online_dpo", seed=0, config_hash="h"))
    h = history(tmp_path / "online_dpo")
    state = json.loads(max((tmp_path / "online_dpo" / "_ray").rglob("trainer_state.json")).read_text())
    assert sorted(state["references"]) == ["p0", "p2", "p4", "p6"]  # the starting policy's, where none was given
    pairs = [r for f in sorted((tmp_path / "online_dpo" / "pairs").iterdir()) for r in pq.read_table(f).to_pylist()]
    assert pairs and all(r["chosen_from"] == "reference" and r["chosen"][0]["content"] == "Yes."
                         and r["prompt_id"] in {"p1", "p3", "p5", "p7"} and r["chosen_score"] == 1.0 for r in pairs)
    assert [r["from_reference"] for r in h] == [r["pairs"] for r in h] == [2, 2]  # 4 prompts a round, half with "Yes."

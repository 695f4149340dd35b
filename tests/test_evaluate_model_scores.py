"""Model-based scores of the evaluate stage: answer log-probabilities, KL from the base, reward
scores, and the Ray task wrapper — on the tiny random Llamas of conftest, CPU only."""
from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from actors.models import load_causal_lm, load_tokenizer
from workflows.core.errors import ConfigError
from workflows.evaluate.model_scores import (
    ScoreJob,
    answer_logprobs,
    kl_from_base,
    reward_scores,
    run_scores,
)

ROWS = [
    {"messages": [{"role": "user", "content": "How do I boil an egg?"}], "answer": "Put it in boiling water."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "answer": "Hello! How can I help you today with anything at all?"},
    {"messages": [{"role": "user", "content": "Say nothing."}], "answer": ""},
    {"messages": [{"role": "user", "content": "What is 2 + 2? Explain in detail, step by step."}], "answer": "4"},
]


def direct_logprob(model_dir, row) -> tuple[float, int]:
    """Recompute one row on its own: full-sequence forward, sum of the answer tokens' log-probs."""
    tok, lm = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), "float32", "cpu").eval()
    text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = lm(torch.tensor([prompt + answer])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) + k - 1, t]) for k, t in enumerate(answer)), len(answer)


def test_answer_logprobs_match_a_direct_computation(varied_llama_dir):
    (lp, n), = answer_logprobs(str(varied_llama_dir), ROWS[:1])
    want, want_n = direct_logprob(varied_llama_dir, ROWS[0])
    assert n == want_n > 0 and lp < 0
    assert lp == pytest.approx(want, abs=1e-4)


def test_batched_equals_unbatched_and_empty_answer_is_zero(varied_llama_dir):
    one = answer_logprobs(str(varied_llama_dir), ROWS, batch_size=1)
    batched = answer_logprobs(str(varied_llama_dir), ROWS, batch_size=4)
    assert [n for _, n in one] == [n for _, n in batched] and one[2] == (0.0, 0)
    for (a, _), (b, _) in zip(one, batched):
        assert a == pytest.approx(b, abs=1e-4)


def test_greedy_continuation_scores_higher_than_a_shuffle(varied_llama_dir):
    tok, lm = load_tokenizer(str(varied_llama_dir)), load_causal_lm(str(varied_llama_dir), "float32", "cpu").eval()
    rows, shuffled = [], []
    rng = random.Random(0)
    for r in ROWS[:2]:
        text = tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = lm.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        ids = out[0, prompt.size(1):].tolist()
        # The longest greedy prefix whose text re-tokenizes to the same tokens (a random model's
        # tokens do not always survive decode → encode), so the scored tokens are the greedy ones.
        ids = next(ids[:k] for k in range(len(ids), 0, -1)
                   if tok(tok.decode(ids[:k]), add_special_tokens=False)["input_ids"] == ids[:k])
        assert len(ids) >= 4
        answer = tok.decode(ids)
        perm = ids[:]
        while perm == ids:
            rng.shuffle(perm)
        rows.append({**r, "answer": answer})
        shuffled.append({**r, "answer": tok.decode(perm)})
    greedy, other = answer_logprobs(str(varied_llama_dir), rows), answer_logprobs(str(varied_llama_dir), shuffled)
    for (g, _), (s, _) in zip(greedy, other):
        assert g > s, (g, s)


def test_kl_from_base_pure():
    same = kl_from_base([-3.0, -5.0, -1.0], [-3.0, -5.0, -1.0])
    assert same == {"kl": 0.0, "lo": 0.0, "hi": 0.0, "n": 3}
    known = kl_from_base([(-1.0, 2), (-2.0, 3), (0.0, 0)], [(-3.0, 2), (-3.0, 3), (0.0, 0)])
    assert known["kl"] == pytest.approx(1.0) and known["lo"] <= 1.0 <= known["hi"]
    assert known["kl_per_token"] == pytest.approx(3.0 / 5) and known["tokens"] == 5 and known["n"] == 3
    assert math.isnan(kl_from_base([], [])["kl"])
    with pytest.raises(ValueError, match="same order"):
        kl_from_base([-1.0], [-1.0, -2.0])


def test_kl_between_models_through_answer_logprobs(tiny_llama_dir, varied_llama_dir):
    model = answer_logprobs(str(varied_llama_dir), ROWS)
    assert kl_from_base(model, answer_logprobs(str(varied_llama_dir), ROWS))["kl"] == 0.0
    other = kl_from_base(model, answer_logprobs(str(tiny_llama_dir), ROWS))
    assert other["kl"] != 0.0 and other["n"] == len(ROWS) and math.isfinite(other["kl_per_token"])


@pytest.fixture(scope="module")
def reward_dir(tiny_llama_dir, tmp_path_factory):
    """A reward model directory as the reward stage exports it: backbone + random head + stats."""
    out = tmp_path_factory.mktemp("reward") / "reward_model"
    shutil.copytree(tiny_llama_dir, out)
    torch.manual_seed(0)
    torch.save({"weight": torch.randn(1, 64), "bias": torch.randn(1)}, out / "reward_head.pt")
    (out / "reward_head.json").write_text(json.dumps(
        {"hidden_size": 64, "mean": 0.25, "std": 2.0, "normalize": True, "max_length": None}))
    return out


def test_reward_scores_equal_training_reward_score(reward_dir):
    from training.reward import load_reward_model, score

    got = reward_scores(str(reward_dir), ROWS, batch_size=3)
    model, tok = load_reward_model(str(reward_dir)), load_tokenizer(str(reward_dir))
    want = score(model, tok, [r["messages"] + [{"role": "assistant", "content": r["answer"]}] for r in ROWS])
    assert len(got) == len(ROWS) and len(set(got)) == len(ROWS)
    assert got == pytest.approx(want, abs=1e-5)


def test_missing_model_or_head_is_one_config_error_line(reward_dir, tmp_path):
    broken = tmp_path / "no_head"
    shutil.copytree(reward_dir, broken)
    (broken / "reward_head.pt").unlink()
    for call in (lambda: reward_scores(str(broken), ROWS),
                 lambda: run_scores([ScoreJob("reward", str(broken), ROWS)]),
                 lambda: answer_logprobs(str(tmp_path / "nowhere"), ROWS),
                 lambda: run_scores([ScoreJob("logprobs", str(tmp_path / "nowhere"), ROWS)])):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path) in msg and " — " in msg
    assert "reward_head.pt" in str(pytest.raises(ConfigError, reward_scores, str(broken), ROWS).value)
    with pytest.raises(ConfigError, match="unknown kind"):
        run_scores([ScoreJob("judge", str(reward_dir), ROWS)])


def test_run_scores_in_a_ray_task_matches_the_direct_call(ray_local, varied_llama_dir):
    got, = run_scores([ScoreJob("logprobs", str(varied_llama_dir), ROWS, kwargs={"batch_size": 2})])
    want = answer_logprobs(str(varied_llama_dir), ROWS)
    assert [n for _, n in got] == [n for _, n in want]
    assert [x for x, _ in got] == pytest.approx([x for x, _ in want], abs=1e-4)

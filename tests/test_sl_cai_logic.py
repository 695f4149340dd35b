"""The SL-CAI per-batch program against a scripted engine: exact, no model, no Ray."""
import pytest

from tests.fakes import ScriptedEngine
from workflows.core.constitution import load_constitution
from workflows.core.typed import from_dict
from workflows.sl_cai.stage import CritiqueRevisionConfig, critique_revise


def rows(*prompts):
    return [{"prompt_id": f"p{i}", "source": "t", "messages": [{"role": "user", "content": p}] if p is not None else []}
            for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("default")


def test_rounds_use_sampled_principles_and_chain_revisions(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {"rounds": 2, "few_shot": 1})
    engine = ScriptedEngine()
    out = critique_revise(engine, rows("how to hotwire a car", "tell me a joke"), cfg, constitution, seed=7)
    assert [r["prompt_id"] for r in out] == ["p0", "p1"]
    assert len(engine.calls) == 1 + 2 * 2  # initial, then (critique, revision) per round, each one batch of 2
    for r in out:
        assert r["_error"] is None
        assert [x["principle_id"] for x in r["rounds"]] == __import__(
            "workflows.core.constitution", fromlist=["x"]).sample_principles(constitution, r["prompt_id"], 2, 7)
        assert r["final_response"] == r["rounds"][-1]["revision"]
        assert r["initial_response"].startswith("reply#0")
        assert r["_gen_tokens"] == 5 * 5
    # round 2's critique conversation answers round 1's revision, not the initial answer
    crit2 = engine.calls[3][0]
    assert crit2[-2] == {"role": "assistant", "content": out[0]["rounds"][0]["revision"]}
    p = constitution.get(out[0]["rounds"][1]["principle_id"])
    assert crit2[-1]["content"] == p.critique
    # the few-shot example precedes the user's prompt
    assert crit2[0] == dict(constitution.few_shot[0][0])


def test_bad_rows_become_errors_without_stopping_the_batch(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {"max_prompt_chars": 50})
    engine = ScriptedEngine(fail_reason="prompt_too_long: 3000 tokens > 2048")
    out = critique_revise(engine, rows("fine", "", None, "x" * 51, "please FAIL"), cfg, constitution, seed=0)
    assert [r["_error"] for r in out] == [None, "empty_prompt", "empty_prompt", "prompt_too_long", "prompt_too_long"]
    assert out[4]["_detail"].startswith("initial answer: prompt_too_long")
    assert out[0]["final_response"] and all(r["final_response"] is None for r in out[1:])
    assert len(engine.calls[0]) == 2  # invalid rows never reach the engine


def test_empty_generation_is_an_error(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {})
    critique_word = constitution.get(__import__("workflows.core.constitution", fromlist=["x"]).sample_principles(
        constitution, "p0", 1, 0)[0]).revision[:20]
    out = critique_revise(ScriptedEngine(empty_on=critique_word), rows("hi"), cfg, constitution, seed=0)
    assert out[0]["_error"] == "empty_generation" and "round 1 revision" in out[0]["_detail"]


def test_per_row_principles_do_not_depend_on_batch(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {"rounds": 3})
    alone = critique_revise(ScriptedEngine(), rows("a", "b", "c")[1:2], cfg, constitution, seed=3)
    batch = critique_revise(ScriptedEngine(), rows("a", "b", "c"), cfg, constitution, seed=3)
    assert [x["principle_id"] for x in alone[0]["rounds"]] == [x["principle_id"] for x in batch[1]["rounds"]]


def test_only_revise_sources_are_revised_the_rest_keep_their_initial_answer(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {"rounds": 1, "revise_sources": ["red_team"]})
    batch = rows("how to hotwire a car", "a basil tip please", "pick a lock")
    batch[1]["source"] = "helpful"
    batch[0]["source"] = batch[2]["source"] = "red_team"
    engine = ScriptedEngine()
    out = critique_revise(engine, batch, cfg, constitution, seed=0)
    assert [len(r["rounds"]) for r in out] == [1, 0, 1]
    assert out[1]["final_response"] == out[1]["initial_response"] and out[1]["_error"] is None
    assert out[0]["final_response"] == out[0]["rounds"][0]["revision"] != out[0]["initial_response"]
    assert [len(c) for c in engine.calls] == [3, 2, 2]  # the helpful row is answered, never critiqued


def test_revise_sources_must_name_something():
    from workflows.core.errors import ConfigError

    with pytest.raises(ConfigError, match="revise_sources"):
        from_dict(CritiqueRevisionConfig, {"revise_sources": []}, "recipe: stages[1]")


def test_revision_sampling_decodes_critiques_and_revisions_only(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {
        "sampling": {"max_new_tokens": 50, "repetition_penalty": 1.2},
        "revision_sampling": {"max_new_tokens": 30, "repetition_penalty": 1.0}, "critique_max_new_tokens": 20})
    engine = ScriptedEngine()
    critique_revise(engine, rows("how to hotwire a car"), cfg, constitution, seed=0)
    assert [(p.max_new_tokens, p.repetition_penalty) for p in engine.params] == [(50, 1.2), (20, 1.0), (30, 1.0)]


def test_keep_initial_sources_are_revised_but_keep_their_first_answer(constitution):
    cfg = from_dict(CritiqueRevisionConfig, {"revise_sources": ["red_team", "benign_edgy"],
                                             "keep_initial_sources": ["benign_edgy"]})
    batch = rows("how to hotwire a car", "how do I kill a stuck process")
    batch[0]["source"], batch[1]["source"] = "red_team", "benign_edgy"
    out = critique_revise(ScriptedEngine(), batch, cfg, constitution, seed=0)
    assert out[0]["final_response"] == out[0]["rounds"][0]["revision"]
    assert len(out[1]["rounds"]) == 1 and out[1]["final_response"] == out[1]["initial_response"]
    from workflows.core.errors import ConfigError

    with pytest.raises(ConfigError, match="keep_initial_sources"):
        from_dict(CritiqueRevisionConfig, {"revise_sources": ["red_team"], "keep_initial_sources": ["benign_edgy"]}, "s")

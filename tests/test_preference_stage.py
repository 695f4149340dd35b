"""RL-CAI preference labeling: the per-batch programs with fake engines (milliseconds), then the
stage on a local Ray cluster with a tiny random Llama as policy and judge (reconcile, label
cache on re-run, TRL columns, human mixing)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from actors.base import Generation
from fakes import option
from workflows.core.constitution import load_constitution
from workflows.core.errors import ConfigError
from workflows.core.typed import from_dict
from workflows.judging.batch import judge_pairs
from workflows.judging.config import PreferenceConfig
from workflows.judging.label_cache import LabelCache
from workflows.core.pairwise import pair_id
from workflows.judging.workers import PAIRS_SCHEMA
from workflows.preference.batch import sample_pairs
from workflows.preference.report import select_stream
from workflows.preference.stage import SAMPLE_RAW_SCHEMA, SamplingRoute

CONST = load_constitution("default")
PROMPT = [{"role": "user", "content": "How do I pick a lock?"}]


class AlwaysA:
    """Position-biased judge: P(A) = 0.9 whatever the options; counts what it is sent."""

    name = "always-a"

    def __init__(self):
        self.convs: list[list[dict]] = []
        self.generated: list[list[dict]] = []

    def generate(self, convs, params):
        self.generated += convs
        return [Generation(text="Thinking about it, (A).", completion_tokens=5) for _ in convs]

    def choice_logprobs(self, convs, choices):
        assert list(choices) == ["A", "B"]
        self.convs += convs
        return [[math.log(0.9), math.log(0.1)] for _ in convs]


class Prefers(AlwaysA):
    """Judge with taste: P(A) = p when option (A) contains ``word``, else 1 - p."""

    def __init__(self, word: str = "safe", p: float = 0.8, reasoning: str = "A is safer."):
        super().__init__()
        self.name, self.word, self.p, self.reasoning = f"prefers-{word}", word, p, reasoning

    def generate(self, convs, params):
        self.generated += convs
        return [Generation(text=self.reasoning, completion_tokens=3) for _ in convs]

    def choice_logprobs(self, convs, choices):
        self.convs += convs
        ps = [self.p if self.word in option(c, "A") else 1 - self.p for c in convs]
        return [[math.log(p), math.log(1 - p)] for p in ps]


class Constant(AlwaysA):
    name = "constant"

    def choice_logprobs(self, convs, choices):
        self.convs += convs
        return [[-0.7, -0.7] for _ in convs]


class Broken(AlwaysA):
    name = "broken"

    def choice_logprobs(self, convs, choices):
        return [[math.nan, math.nan] for _ in convs]


def pair(a="Stay safe: call a locksmith.", b="Use a tension wrench.", prompt=PROMPT, pid="p1"):
    return {"pair_id": pair_id(pid, a, b), "prompt_id": pid, "messages": prompt, "response_a": a, "response_b": b}


def cfg(**kw) -> PreferenceConfig:
    return from_dict(PreferenceConfig, kw, "test")


# ---------------------------------------------------------------- judging (pure)

def test_position_biased_judge_gives_half_and_order_disagreement():
    judge = AlwaysA()
    [row] = judge_pairs([judge], [pair()], cfg(), CONST, seed=0)
    assert row["_error"] is None and row["p_chosen"] == pytest.approx(0.5)
    assert row["order_agreement"] is False and row["source"] == "ai" and row["judge"] == "always-a"
    assert len(judge.convs) == 2 and row["_judge_calls"] == 2 and row["_cache_misses"] == 2


def test_order_swap_really_swaps():
    judge, p = AlwaysA(), pair()
    judge_pairs([judge], [p], cfg(), CONST, seed=0)
    first, second = judge.convs
    assert (option(first, "A"), option(first, "B")) == (p["response_a"], p["response_b"])
    assert (option(second, "A"), option(second, "B")) == (p["response_b"], p["response_a"])


def test_judge_with_taste_picks_the_same_response_in_both_positions():
    for a, b in [("A safe answer.", "A risky answer."), ("A risky answer.", "A safe answer.")]:
        [row] = judge_pairs([Prefers()], [pair(a, b)], cfg(principles_per_pair=3), CONST, seed=0)
        assert row["chosen"] == [{"role": "assistant", "content": "A safe answer."}]
        assert row["rejected"][0]["content"] == "A risky answer." and row["prompt"] == PROMPT
        assert row["p_chosen"] == pytest.approx(0.8) and row["order_agreement"] is True
        assert len(row["principle_ids"]) == 3 and row["principle_p_chosen"] == pytest.approx([0.8] * 3)
        assert row["principle_agree"] == [True] * 3 and row["_judgments"] == 6
        assert row["pair_id"] == pair(a, b)["pair_id"] and row["prompt_id"] == "p1"


def test_ensemble_of_judges_averages_and_names_them():
    a, b = AlwaysA(), Prefers(p=0.9)
    [row] = judge_pairs([a, b], [pair()], cfg(principles_per_pair=2), CONST, seed=0)
    assert row["p_chosen"] == pytest.approx((0.5 + 0.9) / 2) and row["judge"] == "always-a+prefers-safe"
    assert len(a.convs) == len(b.convs) == 4


def test_degenerate_and_unparseable_judgments_are_errors_not_coin_flips():
    rows = [pair(), pair("x", "y", pid="p2"), pair("", "y", pid="p3")]
    out = judge_pairs([Constant()], rows, cfg(), CONST, seed=0)
    assert [r["_error"] for r in out] == ["degenerate_judgment", "degenerate_judgment", "bad_pair"]
    assert all(r.get("p_chosen") is None for r in out)
    [bad] = judge_pairs([Broken()], [pair()], cfg(), CONST, seed=0)
    assert bad["_error"] == "unparseable_judgment"


def test_one_order_only():
    judge = Prefers()
    [row] = judge_pairs([judge], [pair()], cfg(both_orders=False), CONST, seed=0)
    assert len(judge.convs) == 1 and row["order_agreement"] is None and row["p_chosen"] == pytest.approx(0.8)


def test_chain_of_thought_generates_then_scores_and_clamps():
    judge = Prefers(reasoning="Option A avoids harm.")
    [row] = judge_pairs([judge], [pair()], cfg(cot=True), CONST, seed=0)
    assert len(judge.generated) == 2 and "step by step" in judge.generated[0][-1]["content"]
    assert judge.convs[0][1] == {"role": "assistant", "content": "Option A avoids harm."}
    assert row["p_chosen"] == pytest.approx(0.6) and row["_judge_calls"] == 4  # clamped to the 0.4-0.6 band
    [empty] = judge_pairs([Prefers(reasoning="  ")], [pair()], cfg(cot=True), CONST, seed=0)
    assert empty["_error"] == "empty_reasoning"


def test_cache_hits_cost_no_engine_calls(tmp_path):
    uri, rows = str(tmp_path / "label_cache"), [pair(), pair("x safe", "y", pid="p2")]
    first, cache = Prefers(), LabelCache(uri)
    out1 = judge_pairs([first], rows, cfg(principles_per_pair=2), CONST, 0, cache)
    cache.flush()
    again = Prefers()
    out2 = judge_pairs([(again, again.name)], rows, cfg(principles_per_pair=2), CONST, 0, LabelCache(uri))
    assert sum(r["_cache_misses"] for r in out1) == 8 and sum(r["_cache_hits"] for r in out1) == 0
    assert again.convs == [] and sum(r["_cache_hits"] for r in out2) == 8
    assert sum(r["_cache_misses"] + r["_judge_calls"] for r in out2) == 0
    strip = [{k: v for k, v in r.items() if not k.startswith("_")} for r in out1]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("_")} for r in out2]
    other = Prefers()  # another judge identity misses
    judge_pairs([(other, "another-judge")], rows, cfg(principles_per_pair=2), CONST, 0, LabelCache(uri))
    assert len(other.convs) == 8


# ---------------------------------------------------------------- sampling (pure)

class Policy:
    """Answers each prompt from a script of texts (cycled); "FAIL" in a text fails that sample."""

    name = "policy"

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls, self.seen = script, [], {}

    def generate(self, convs, params):
        self.calls.append(len(convs))
        out = []
        for c in convs:
            key = c[-1]["content"]
            n = self.seen[key] = self.seen.get(key, -1) + 1
            text = self.script[key][n % len(self.script[key])]
            out.append(Generation.failed("prompt_too_long: 9 > 8") if text == "FAIL"
                       else Generation(text=text, prompt_tokens=4, completion_tokens=2))
        return out


def prompt_row(text: str) -> dict:
    return {"prompt_id": f"id-{text[:6]}", "messages": [{"role": "user", "content": text}], "source": "t"}


def test_sampling_pairs_duplicates_failures_and_errors():
    policy = Policy({"q1": ["a", "b", "c"], "q2": ["a", "a", "b"], "q3": ["z", "z", "z"], "q4": ["a", "FAIL", "b"],
                     "q5": ["FAIL"]})
    rows = [prompt_row(t) for t in ("q1", "q2", "q3", "q4", "q5", "   ")]
    out = sample_pairs(policy, rows, cfg(samples_per_prompt=3), seed=0)
    assert policy.calls == [15]  # one generate call for the batch; the empty prompt is never sent
    q1, q2, q3, q4, q5, empty = out
    assert [(p["response_a"], p["response_b"]) for p in q1["pairs"]] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert q1["pairs"][0]["pair_id"] == pair_id("id-q1", "a", "b") and q1["_error"] is None
    assert len(q2["pairs"]) == 1 and q2["notes"] == [{"id": pair_id("id-q2", "a", "a"), "reason": "duplicate_responses",
                                                      "detail": "2 samples are the same text; paired once"}]
    assert (q3["_error"], q3["pairs"]) == ("duplicate_responses", [])
    assert q4["notes"][0]["id"] == "id-q4/sample-1" and q4["notes"][0]["reason"] == "prompt_too_long"
    assert q5["_error"] == "prompt_too_long" and empty["_error"] == "empty_prompt"
    assert q1["_gen_tokens"] == 6 and q1["_policy_calls"] == 3
    table = pa.Table.from_pylist(out, schema=SAMPLE_RAW_SCHEMA)
    good = table.filter(pc.is_null(table["_error"]))
    routed = SamplingRoute("pref")(good)
    assert routed["pairs"].schema == PAIRS_SCHEMA and routed["pairs"].num_rows == 5
    assert routed["pairs"]["prompt_id"].to_pylist() == ["id-q1"] * 3 + ["id-q2", "id-q4"]
    assert routed["_sample_notes"]["stage"].to_pylist() == ["pref:samples"] * 2


def test_sampled_pair_selection():
    out = sample_pairs(Policy({"q1": ["a", "b", "c", "d"]}), [prompt_row("q1")],
                       cfg(samples_per_prompt=4, pairs="sample", pairs_per_prompt=2), seed=3)
    assert len(out[0]["pairs"]) == 2


@pytest.mark.parametrize("bad, field", [
    ({"samples_per_prompt": 1}, "samples_per_prompt"), ({"sampling": {"temperature": 0.0}}, "sampling.temperature"),
    ({"pairs": "sample"}, "pairs_per_prompt"), ({"judges": []}, "judges"), ({"clamp": [0.7, 0.2]}, "clamp"),
    ({"human": {"path": __file__, "ratio": 2.0}}, "human.ratio"), ({"engine_factory": "nocolon"}, "engine_factory"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=f"^x.{field}: "):
        from_dict(PreferenceConfig, bad, "x")


def test_shipped_label_recipe_validates():
    import yaml

    recipe = yaml.safe_load((Path(__file__).parents[1] / "workflows" / "recipes" / "label.yaml").read_text())
    [entry] = [dict(s) for s in recipe["stages"] if s["stage"] == "preference"]
    entry.pop("stage")
    c = from_dict(PreferenceConfig, entry, "label.yaml")
    assert c.policy.model == "embedded" and c.judges[0].model == "embedded" and c.both_orders


def test_selection_sampling_is_exact():
    import random

    for n, k in [(10, 0), (10, 3), (10, 10), (1000, 250)]:
        assert sum(select_stream(n, k, random.Random(n + k))) == k


# ---------------------------------------------------------------- the stage on Ray

def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def label_recipe(run_dir, prompts_file, model_dir, human_file):
    from workflows.driver import Recipe

    engine = {"model": str(model_dir), "batch_size": 8, "concurrency": 1, "max_model_len": 1024}
    return Recipe(name="t", run_dir=str(run_dir), seed=1, stages=[
        {"stage": "prompts", "path": prompts_file},
        {"stage": "preference", "samples_per_prompt": 3, "principles_per_pair": 2, "max_prompt_chars": 2000,
         "sampling": {"max_new_tokens": 6, "temperature": 1.0, "seed": 0}, "policy": engine, "judges": [engine],
         "human": {"path": human_file, "ratio": 0.5}},
    ])


def table(path) -> pa.Table:
    return pq.read_table(str(path))


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, tiny_llama_dir, ray_local):
    from workflows.driver import run_recipe

    d = tmp_path_factory.mktemp("pref")
    prompts = write_jsonl(d / "p.jsonl", [{"prompt": f"Question {i}: is it fine to borrow a neighbour's ladder?"}
                                          for i in range(4)] + [{"prompt": "long " * 600}])
    human = write_jsonl(d / "h.jsonl", [{"prompt": f"Human question {i}?", "chosen": f"Kind answer {i}.",
                                         "rejected": f"Rude answer {i}."} for i in range(3)])
    recipe = label_recipe(d / "run", prompts, tiny_llama_dir, human)
    return d, recipe, run_recipe(recipe)["preference"]


def test_every_prompt_and_pair_is_accounted_for(labeled):
    d, _, info = labeled
    st = d / "run" / "preference"
    prompts = set(table(d / "run" / "prompts" / "prompts")["prompt_id"].to_pylist())
    pairs, errors = table(st / "pairs"), table(st / "errors").to_pylist()
    assert set(pairs.column_names) == {"pair_id", "prompt_id", "messages", "response_a", "response_b"}
    by_stage = {s: [e for e in errors if e["stage"] == f"preference:{s}"] for s in ("sampling", "judging", "samples")}
    assert [e["reason"] for e in by_stage["sampling"]] == ["prompt_too_long"]
    assert set(pairs["prompt_id"].to_pylist()) | {e["id"] for e in by_stage["sampling"]} == prompts
    labels = table(st / "_judging" / "labels")
    labeled_ids = labels["pair_id"].to_pylist() + [e["id"] for e in by_stage["judging"]]
    assert sorted(labeled_ids) == sorted(pairs["pair_id"].to_pylist()) and pairs.num_rows >= 4
    assert info["outputs"] == labels.num_rows and info["datasets"]["pairs"] == pairs.num_rows
    assert info["cache_hits"] == 0 and info["cache_misses"] == info["judgments"] > 0
    assert info["engine_calls"] == {"sampling": 12, "judging": info["cache_misses"]}
    assert info["judgments"] == 4 * labels.num_rows + 4 * len(by_stage["judging"])
    for name in ("_SUCCESS", "report.md", "p_chosen.png", "principles.png", "summary.md"):
        assert (st / name).is_file(), name
    assert "Per principle" in (st / "report.md").read_text()
    assert all(0.5 <= p <= 1.0 for p in labels["p_chosen"].to_pylist())
    # the policy actor and the judge actor ran the same model: one line in the summary, two actors
    assert [(e["dtype"], e["actors"]) for e in info["engines"]] == [("float32", 2)]
    assert "CAI_RAY_CPU_BF16=0: no native bfloat16 assumed" in (st / "summary.md").read_text()


def test_human_rows_are_mixed_by_ratio(labeled):
    d, _, info = labeled
    prefs = table(d / "run" / "preference" / "preferences")
    sources = prefs["source"].to_pylist()
    assert sources.count("human") == 3 and sources.count("ai") == 3
    assert info["mix"]["actual_human_ratio"] == 0.5 and info["mix"]["human_kept"] == 3
    assert info["datasets"]["preferences"] == 6


def test_preferences_load_as_trl_conversational_dataset(labeled):
    import datasets

    d, _, _ = labeled
    ds = datasets.load_dataset("parquet", data_files=str(d / "run" / "preference" / "preferences" / "*.parquet"),
                               split="train")
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(ds.column_names)
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
    trl_utils = pytest.importorskip("trl.data_utils")
    assert trl_utils.is_conversational(row)


def test_rerun_reads_every_judgment_from_the_cache(labeled):
    from workflows.driver import run_recipe

    d, recipe, first = labeled
    before = {r["pair_id"]: r["p_chosen"] for r in table(d / "run" / "preference" / "_judging" / "labels").to_pylist()}
    again = run_recipe(recipe, restart_from="preference")["preference"]  # deletes the stage dir, not the cache
    assert again["cache_misses"] == 0 and again["engine_calls"]["judging"] == 0
    assert again["cache_hits"] == first["judgments"] and again["engine_calls"]["sampling"] == 12
    after = {r["pair_id"]: r["p_chosen"] for r in table(d / "run" / "preference" / "_judging" / "labels").to_pylist()}
    assert after == pytest.approx(before)


def test_a_resumed_stage_does_not_finalize_sampling_again(labeled, capsys):
    """Judging cut short after sampling finished: the run goes straight to judging (the marker
    written last), and the stage ends with the same pairs and labels."""
    from workflows.driver import run_recipe

    d, recipe, first = labeled
    pref = d / "run" / "preference"
    pairs = sorted(table(pref / "pairs")["pair_id"].to_pylist())
    (pref / "_SUCCESS").unlink()
    for f in sorted((pref / "_judging" / "_raw").glob("b*.parquet"))[1:]:
        f.unlink()  # as if killed after one judged block
    torn = sorted((pref / "_raw").glob("b*.parquet"))[0]
    torn.write_bytes(b"cut short")  # finalizing sampling again would fail on it; resuming never reads it
    again = run_recipe(recipe)["preference"]
    out = capsys.readouterr().out
    assert f"sampling already finished ({len(pairs)} pairs from 5 prompts)" in out
    assert again["datasets"]["pairs"] == len(pairs) and again["outputs"] == first["outputs"]


def test_route_export_and_merge(tmp_path):
    from workflows.preference.cli import export_uncertain, merge_labels
    from workflows.judging.human import preference_row, to_table

    rows = [preference_row(PROMPT, f"answer {i}", f"other {i}", p, judge="j", order_agreement=True, source="ai")
            for i, p in enumerate([0.55, 0.95, 0.52])]
    (tmp_path / "stage" / "preferences").mkdir(parents=True)
    pq.write_table(to_table(rows), tmp_path / "stage" / "preferences" / "part-00000.parquet")
    out = tmp_path / "review.csv"
    assert export_uncertain(str(tmp_path / "stage"), str(out), threshold=0.1) == 2
    recs = list(csv.DictReader(out.open()))
    recs[0]["human_choice"], recs[1]["human_choice"] = "2", "tie"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    res = merge_labels(str(tmp_path / "stage"), str(out), str(tmp_path / "merged"))
    assert res == {"rows": 2, "human": 1, "ties": 1}
    merged = table(tmp_path / "merged" / "preferences").to_pylist()
    human = next(r for r in merged if r["source"] == "human")
    assert human["p_chosen"] == 1.0 and human["chosen"][0]["content"] == recs[0]["response_2"]


def test_cli_parsers_map_flags_to_label_main(monkeypatch):
    import argparse

    from workflows.preference import cli as preference_cli

    seen = {}
    monkeypatch.setattr(preference_cli, "label_main", lambda *a, **kw: seen.update(args=a, kw=kw) or 0)
    parser = argparse.ArgumentParser()
    preference_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["label", "--prompts", "p.jsonl", "--out", "runs/x", "--judge", "a,b", "--samples", "4",
                              "--principles", "3", "--cot", "--one-order", "--human", "h.jsonl"])
    assert args.fn(args) == 0
    assert seen["args"][:10] == ("p.jsonl", "runs/x", "embedded", "a,b", "default", 4, None, 3, True, None)
    assert seen["kw"]["both_orders"] is False and seen["kw"]["human"] == "h.jsonl"
    route = parser.parse_args(["route", "export", "--from", "runs/x/preference", "--out", "r.csv"])
    assert (route.action, route.source, route.threshold) == ("export", "runs/x/preference", 0.1)

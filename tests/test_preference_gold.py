"""The gold gate (judge the judge on human labels before labeling at scale) and labeling existing
pairs (``pairs_from``): the pure parts in milliseconds, then the preference stage on a local Ray
cluster with scripted engines (``engine_factory``), no model."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.base import Generation
from fakes import option
from workflows.core.errors import ConfigError
from workflows.core.typed import from_dict
from workflows.judging.config import PreferenceConfig
from workflows.judging.gold import GoldGateError, describe, gate, gold_figures
from workflows.judging.human import preference_row
from workflows.judging.pairs import chosen_first, load_pairs
from workflows.core.pairwise import pair_id
from workflows.prompt_sources import prompt_id
from workflows.stats import wilson

FACTORY = "tests.test_preference_gold:engine"  # Ray workers import it from the repository root


# ---------------------------------------------------------------- scripted engines

class AlwaysA:
    """Position-biased judge: P(A) = 0.9 whatever the options."""

    name = "always-a"

    def generate(self, convs, params):
        return [Generation(text="(A).", completion_tokens=2) for _ in convs]

    def choice_logprobs(self, convs, choices):
        return [[math.log(0.9), math.log(0.1)] for _ in convs]


class Prefers(AlwaysA):
    """A judge with taste: P(A) = 0.8 when option (A) contains ``word``, else 0.2."""

    def __init__(self, word: str):
        self.name, self.word = f"prefers-{word}", word

    def choice_logprobs(self, convs, choices):
        return [[math.log(p), math.log(1 - p)] for p in (0.8 if self.word in option(c, "A") else 0.2 for c in convs)]


class Policy:
    """Answers every prompt with distinct texts: ``Answer <k>: <prompt>``."""

    name = "policy"

    def generate(self, convs, params):
        seen: dict[str, int] = {}
        out = []
        for c in convs:
            k = seen[c[-1]["content"]] = seen.get(c[-1]["content"], -1) + 1
            out.append(Generation(text=f"Answer {k}: {c[-1]['content']}", completion_tokens=3))
        return out


def engine(cfg):
    """``engine_factory``: the model name picks the engine. ``no-policy`` must never be built."""
    if cfg.model == "no-policy":
        raise AssertionError("labeling existing pairs must not build the policy engine")
    if cfg.model.startswith("prefers-"):
        return Prefers(cfg.model.split("-", 1)[1])
    return {"always-a": AlwaysA, "policy": Policy}[cfg.model]()


# ---------------------------------------------------------------- files

def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def gold_file(tmp_path: Path) -> str:
    """Eight human choices: the kind answer over the rude one (the hash shows it as (A) in six, (B) in two)."""
    return write_jsonl(tmp_path / "gold.jsonl", [
        {"prompt": f"Gold question {i}?", "chosen": f"A kind answer {i}.", "rejected": f"A rude answer {i}."}
        for i in range(8)])


HH = "\n\nHuman: May I borrow your ladder?\n\nAssistant: {a}"
PAIRS = [
    {"prompt": "Q0?", "chosen": "A kind reply 0.", "rejected": "A rude reply 0."},                    # 0
    {"prompt": "Q1?", "chosen": "A kind reply 1.", "rejected": "A rude reply 1."},                    # 1
    {"prompt": "Q2?", "chosen": "A kind reply 2.", "rejected": "A rude reply 2."},                    # 2
    {"prompt": "Q3?", "chosen": "A rude reply 3.", "rejected": "A kind reply 3."},                    # 3: AI disagrees
    {"chosen": HH.format(a="Of course, kind neighbour."), "rejected": HH.format(a="Get lost.")},      # 4: HH
    {"prompt": "Q5?", "response_a": "First answer.", "response_b": "Second answer."},                # 5
    {"prompt": [{"role": "user", "content": "Q6?"}], "response_1": "One.", "response_2": "Two."},    # 6
    {"prompt": "Q7?", "response_a": "Only one answer."},                                              # 7: no response_b
    {"prompt": "Q8?", "response_a": "  ", "response_b": "Fine."},                                     # 8: empty
    {"prompt": "Q9?", "response_a": "Same.", "response_b": "Same."},                                  # 9: identical
    {"prompt": "Q0?", "chosen": "A rude reply 0.", "rejected": "A kind reply 0."},                    # 10: = row 0
    {"response_a": "No prompt.", "response_b": "At all."},                                            # 11: no prompt
    "{not json",                                                                                      # 12
]
BAD = {7: ("missing_field", "'response_b'"), 8: ("empty_response", "'response_a'"),
       9: ("identical_responses", "'response_a'"), 10: ("duplicate", "row 0"), 11: ("missing_field", "'prompt'"),
       12: ("bad_json", "row 12")}


# ---------------------------------------------------------------- pure

def human(i: int, chosen: str, rejected: str) -> dict:
    return preference_row([{"role": "user", "content": f"Q{i}?"}], chosen, rejected, 1.0, judge="human",
                          order_agreement=None, source="human")


def ai(gold: dict, agree: bool, p: float, order_agreement: bool | None) -> dict:
    c, r = gold["chosen"][0]["content"], gold["rejected"][0]["content"]
    return preference_row(gold["prompt"], c if agree else r, r if agree else c, p, judge="j",
                          order_agreement=order_agreement, source="ai")


def test_gold_figures_count_ties_and_missing_labels_as_disagreement():
    gold = [human(i, f"good {i}", f"bad {i}") for i in range(5)]
    labels = [ai(gold[0], True, 0.8, True), ai(gold[1], True, 0.9, True), ai(gold[2], False, 0.7, True),
              ai(gold[3], True, 0.5, False)]  # gold[3] a tie (position bias), gold[4] unlabeled
    f = gold_figures(labels, gold)
    ci = wilson(2, 5)
    assert (f["n"], f["agreed"], f["unparseable"], f["order_tested"]) == (5, 2, 1, 4)
    assert (f["agreement"], f["agreement_lo"], f["agreement_hi"]) == pytest.approx((0.4, ci.lo, ci.hi))
    assert f["position_bias"] == pytest.approx(0.25)
    one_order = gold_figures([ai(gold[0], True, 0.8, None)], gold[:1])
    assert one_order["agreement"] == 1.0 and one_order["position_bias"] is None
    assert gold_figures([], [])["agreement"] is None


def test_gate_passes_warns_or_stops_with_figures_and_fix(capsys):
    gold = [human(i, f"good {i}", f"bad {i}") for i in range(4)]
    biased = gold_figures([ai(g, True, 0.5, False) for g in gold], gold)
    assert "agreement 0.000 (95% CI 0.000–0.490) on n=4 gold pairs, position bias 1.000" in describe(biased)
    with pytest.raises(GoldGateError) as e:
        gate(biased, 0.6, "stop", "stage p: gold g.jsonl")
    msg = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in msg and msg.startswith("stage p: gold g.jsonl: ")
    assert "below min_agreement 0.6" in msg and "bigger judge" in msg and "on_gold_fail: warn" in msg
    assert gate(biased, 0.6, "warn", "stage p") is False
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: stage p: the judge fails the gold gate: agreement 0.000")
    good = gold_figures([ai(g, True, 0.8, True) for g in gold], gold)
    assert gate(good, 0.6, "stop", "stage p") is True
    # agrees often enough, but only by leaning: its two orders disagree on 3 of 4 pairs
    leaning = gold_figures([ai(g, True, 0.55, i == 0) for i, g in enumerate(gold)], gold)
    assert leaning["agreement"] == 1.0 and leaning["position_bias"] == 0.75
    assert gate(leaning, 0.6, "stop", "stage p", max_position_bias=None) is True
    with pytest.raises(GoldGateError, match="position bias above max_position_bias 0.4"):
        gate(leaning, 0.6, "stop", "stage p", max_position_bias=0.4)


def test_load_pairs_mixed_formats_and_bad_rows(tmp_path):
    pf = load_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIRS), stage="pref:pairs")
    assert pf.rows == [f"pairs.jsonl:{i}" for i in range(len(PAIRS))]
    assert pf.kept == [f"pairs.jsonl:{i}" for i in range(7)] and len(pf.pairs) == 7
    assert {e["id"]: e["reason"] for e in pf.errors} == {f"pairs.jsonl:{i}": r for i, (r, _) in BAD.items()}
    for e in pf.errors:  # the detail names the row and the field
        i = int(e["id"].rsplit(":", 1)[1])
        assert e["stage"] == "pref:pairs" and e["detail"].startswith(f"row {i}: ") and BAD[i][1] in e["detail"]
    two = pf.pairs[5]
    assert (two["response_a"], two["response_b"], two["messages"]) == ("First answer.", "Second answer.",
                                                                      [{"role": "user", "content": "Q5?"}])
    assert two["prompt_id"] == prompt_id(two["messages"])
    assert two["pair_id"] == pair_id(two["prompt_id"], "First answer.", "Second answer.")
    # chosen/rejected rows: the dataset's choice kept, shown as (A) or (B) by a hash of the pair id
    assert [label["judge"] for label in pf.labels] == ["dataset"] * 5
    firsts = []
    for row, label in zip(pf.pairs, pf.labels):
        first = row["response_a"] == label["chosen"][0]["content"]
        assert first == chosen_first(row["pair_id"]) and row["pair_id"] == label["pair_id"]
        firsts.append(first)
    assert set(firsts) == {True, False}
    assert pf.pairs[4]["messages"] == [{"role": "user", "content": "May I borrow your ladder?"}]


@pytest.mark.parametrize("bad, field", [
    ({"pairs_from": "no/such/pairs.jsonl"}, "pairs_from"), ({"gold": "no/such/gold.jsonl"}, "gold"),
    ({"gold": " "}, "gold"), ({"min_agreement": 1.5}, "min_agreement"), ({"on_gold_fail": "ignore"}, "on_gold_fail"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=f"^x.{field}: "):
        from_dict(PreferenceConfig, bad, "x")


def test_cli_maps_pairs_and_gold_flags(monkeypatch):
    from workflows.preference import cli as preference_cli

    real, seen = preference_cli.label_main, {}
    monkeypatch.setattr(preference_cli, "label_main", lambda *a, **kw: seen.update(args=a, kw=kw) or 0)
    parser = argparse.ArgumentParser()
    preference_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["label", "--pairs", "pairs.jsonl", "--out", "runs/x", "--gold", "gold.jsonl",
                              "--min-agreement", "0.7", "--on-gold-fail", "warn"])
    assert args.fn(args) == 0 and seen["args"][:2] == (None, "runs/x")
    assert {k: seen["kw"][k] for k in ("pairs", "gold", "min_agreement", "on_gold_fail")} == {
        "pairs": "pairs.jsonl", "gold": "gold.jsonl", "min_agreement": 0.7, "on_gold_fail": "warn"}
    with pytest.raises(SystemExit):
        parser.parse_args(["label", "--prompts", "p.jsonl", "--pairs", "pairs.jsonl", "--out", "runs/x"])
    with pytest.raises(ConfigError, match="--prompts/--pairs"):
        real(None, "runs/x")


# ---------------------------------------------------------------- the stage on Ray

def judge_cfg(model: str) -> dict:
    # backend openai: nothing to load or check on the driver; the factory builds the fake
    return {"backend": "openai", "model": model, "batch_size": 4, "concurrency": 1}


def recipe(run_dir: Path, stages: list[dict]):
    from workflows.driver import Recipe

    return Recipe(name="t", run_dir=str(run_dir), seed=0, stages=stages)


def prompts_dir(tmp_path: Path, n: int) -> str:
    """A prompts dataset as the prompts stage writes it (without running that stage)."""
    msgs = [[{"role": "user", "content": f"Question {i}?"}] for i in range(n)]
    (tmp_path / "prompts").mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt_id": prompt_id(m), "messages": m, "source": "t"} for m in msgs]),
                   tmp_path / "prompts" / "part-00000.parquet")
    return str(tmp_path / "prompts")


def table(path: Path) -> list[dict]:
    return pq.read_table(str(path)).to_pylist()


def test_existing_pairs_are_labeled_without_sampling_behind_a_passing_gate(tmp_path, ray_local):
    from workflows.driver import run_recipe

    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    pref = {"stage": "preference", "pairs_from": pairs_file, "gold": gold_file(tmp_path), "principles_per_pair": 2,
            "engine_factory": FACTORY, "policy": judge_cfg("no-policy"), "judges": [judge_cfg("prefers-kind")]}
    info = run_recipe(recipe(tmp_path / "run", [pref]))["preference"]
    st = tmp_path / "run" / "preference"
    # no sampling: the policy was never built (its factory raises), nothing was generated
    assert info["engine_calls"]["sampling"] == 0 and info["policy"] is None
    assert not (st / "_raw").exists() and not (st / "_engines").exists()
    pairs, errors = table(st / "pairs"), table(st / "errors")
    labels = table(st / "_judging" / "labels")
    by_stage = {s: [e for e in errors if e["stage"] == f"preference:{s}"] for s in ("pairs", "judging")}
    assert {e["id"]: e["reason"] for e in by_stage["pairs"]} == {f"pairs.jsonl:{i}": r for i, (r, _) in BAD.items()}
    assert len(pairs) + len(by_stage["pairs"]) == len(PAIRS) == info["inputs"]  # every row: a pair or an error
    assert sorted(r["pair_id"] for r in labels) + sorted(e["id"] for e in by_stage["judging"]) == \
        sorted(p["pair_id"] for p in pairs)  # reconcile: labels ∪ judging errors = pairs
    assert len(labels) == 7 and info["errors"] == len(BAD)
    # the judge prefers "kind": it agrees with the file on 4 of its 5 chosen/rejected rows
    d = info["dataset_agreement"]
    assert (d["n_matched"], d["n_correct"], d["accuracy"]) == (5, 4, pytest.approx(0.8))
    assert d["accuracy_lo"] < 0.8 < d["accuracy_hi"]
    g = info["gold"]
    assert g["passed"] and (g["n"], g["agreement"], g["position_bias"], g["unparseable"]) == (8, 1.0, 0.0, 0)
    assert json.loads((st / "_SUCCESS").read_text())["gold"]["agreement"] == 1.0
    gold_pairs = table(st / "_gold" / "pairs")
    assert {p["response_a"].startswith("A kind") for p in gold_pairs} == {True, False}  # chosen not always (A)
    report, summary = (st / "report.md").read_text(), (st / "summary.md").read_text()
    assert "Gold gate passed (min_agreement 0.6, max_position_bias 0.4)" in report and "Pairs read from" in report
    assert "Agreement with the dataset's own choice: 0.800" in report
    assert "position bias 0.000" in summary


def test_gold_gate_stops_a_position_biased_judge_before_sampling_and_warn_goes_on(tmp_path, ray_local, capsys):
    from workflows.driver import run_recipe

    pref = {"stage": "preference", "input": prompts_dir(tmp_path, 3), "gold": gold_file(tmp_path),
            "engine_factory": FACTORY, "policy": judge_cfg("policy"), "judges": [judge_cfg("always-a")]}
    st = tmp_path / "run" / "preference"
    with pytest.raises(GoldGateError) as e:
        run_recipe(recipe(tmp_path / "run", [pref]))
    msg = str(e.value)
    assert "agreement 0.000 (95% CI 0.000–0.324) on n=8 gold pairs, position bias 1.000" in msg
    assert "below min_agreement 0.6" in msg and "bigger judge" in msg
    assert not (st / "_raw").exists() and not (st / "pairs").exists()  # stopped before sampling
    assert json.loads((st / "_gold" / "gold.json").read_text())["agreement"] == 0.0

    capsys.readouterr()
    warned = run_recipe(recipe(tmp_path / "run", [{**pref, "on_gold_fail": "warn"}]))["preference"]
    assert "warning: stage preference: gold" in capsys.readouterr().out
    g = warned["gold"]
    assert not g["passed"] and (g["agreement"], g["position_bias"]) == (0.0, 1.0)
    assert g["cache_misses"] == 0 and g["cache_hits"] == 16  # the gold labels came from the label cache
    assert warned["engine_calls"]["sampling"] == 6 and warned["datasets"]["pairs"] == 3
    assert "Gold gate FAILED (min_agreement 0.6, max_position_bias 0.4; labeled anyway" in (st / "report.md").read_text()

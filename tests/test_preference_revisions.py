"""Revision pairs: an SL-CAI revision chosen over its initial answer. The pure row logic and the
three-way mix in milliseconds, then the ``revision_pairs`` stage and the ``preference`` stage mixing
them with AI labels by ratio, on a local Ray cluster with a scripted judge (no model)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_preference_gold import FACTORY, judge_cfg, recipe, table, write_jsonl
from workflows.core.errors import ConfigError, DataError
from workflows.core.typed import from_dict
from workflows.judging.config import PreferenceConfig
from workflows.judging.human import mix_plan
from workflows.preference.revisions import RevisionPairsConfig, revision_pair
from workflows.prompt_sources import prompt_id
from workflows.sl_cai.stage import SL_CAI_COLUMNS, route


def sl_row(i: int, initial: str | None, final: str | None, rounds: int = 1, source: str = "red_team") -> dict:
    msgs = [{"role": "user", "content": f"Harmful question {i}?"}]
    return {"prompt_id": prompt_id(msgs), "messages": msgs, "source": source, "initial_response": initial,
            "rounds": [{"principle_id": f"p{k}", "critique": "c", "revision": final} for k in range(rounds)],
            "final_response": final}


ROWS = [sl_row(0, "Sure, here is how.", "I can't help with that."),
        sl_row(1, "Step one: ...", "I won't help; here is a safe alternative.", rounds=2),
        sl_row(2, "Basil likes sun.", "Basil likes sun.", rounds=0, source="helpful"),  # not_revised
        sl_row(3, "Same answer.", "Same answer."),  # unchanged
        sl_row(4, "", "A revision of nothing.")]  # missing_response


def test_revision_is_chosen_and_the_initial_answer_rejected():
    good = revision_pair(ROWS[1], 0.9)
    assert good["_error"] is None and good["prompt_id"] == ROWS[1]["prompt_id"]
    assert good["chosen"] == [{"role": "assistant", "content": "I won't help; here is a safe alternative."}]
    assert good["rejected"] == [{"role": "assistant", "content": "Step one: ..."}]
    assert (good["p_chosen"], good["source"], good["judge"], good["principle_ids"]) == (0.9, "revision", "revision",
                                                                                        ["p0", "p1"])
    assert good["prompt"] == ROWS[1]["messages"] and good["order_agreement"] is None
    assert [revision_pair(r)["_error"] for r in ROWS] == [None, None, "not_revised", "unchanged", "missing_response"]
    assert "helpful" in revision_pair(ROWS[2])["_detail"]


def test_three_way_mix_keeps_the_scarcest_source_whole():
    # AI 100, human 10 at 0.2, revision 60 at 0.3: human is scarcest (10 / 0.2 = 50 rows in all)
    assert mix_plan(100, {"human": (10, 0.2), "revision": (60, 0.3)}) == {"ai": 25, "human": 10, "revision": 15}
    # revision only (AI share 0): every revision row, no AI row
    assert mix_plan(100, {"revision": (7, 1.0)}) == {"ai": 0, "revision": 7}
    assert mix_plan(5, {"revision": (7, 0.0)}) == {"ai": 5, "revision": 0}
    with pytest.raises(DataError, match="no revision rows"):
        mix_plan(5, {"revision": (0, 0.5)})
    with pytest.raises(ConfigError, match="add up"):
        mix_plan(5, {"human": (3, 0.6), "revision": (3, 0.6)})


@pytest.mark.parametrize("bad, field", [({"p_chosen": 0.5}, "p_chosen"), ({"input": " "}, "input")])
def test_revision_pairs_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        from_dict(RevisionPairsConfig, bad, "stages[2]")


def test_preference_revisions_ratios_are_checked():
    with pytest.raises(ConfigError, match="revisions.ratio"):
        from_dict(PreferenceConfig, {"human": {"path": __file__, "ratio": 0.6}, "revisions": {"ratio": 0.5}}, "s")


def write_sl_cai(tmp_path: Path) -> str:
    d = tmp_path / "sl_cai"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS, schema=route.schemas["sl_cai"]).select(SL_CAI_COLUMNS),
                   d / "part-00000.parquet")
    return str(d)


def test_revision_pairs_stage_reconciles_and_mixes_into_preferences(tmp_path, ray_local):
    from workflows.driver import run_recipe

    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Q{i}?", "response_a": f"A kind reply {i}.", "response_b": f"A rude reply {i}."} for i in range(6)])
    stages = [{"stage": "revision_pairs", "input": write_sl_cai(tmp_path)},
              {"stage": "preference", "pairs_from": pairs_file, "engine_factory": FACTORY,
               "policy": judge_cfg("no-policy"), "judges": [judge_cfg("prefers-kind")],
               "revisions": {"input": "revision_pairs", "ratio": 0.25}}]
    infos = run_recipe(recipe(tmp_path / "run", stages))
    rp = tmp_path / "run" / "revision_pairs"
    pairs, errors, skipped = table(rp / "revision_pairs"), table(rp / "errors"), table(rp / "skipped")
    # every sl_cai row is a pair, a skipped row (not revised, as the recipe said) or an error, by prompt id
    assert sorted(p["prompt_id"] for p in pairs) + sorted(e["id"] for e in skipped + errors) == \
        sorted(r["prompt_id"] for r in ROWS[:2]) + sorted(r["prompt_id"] for r in ROWS[2:])
    assert [e["reason"] for e in skipped] == ["not_revised"]
    assert sorted(e["reason"] for e in errors) == ["missing_response", "unchanged"]
    got = infos["revision_pairs"]
    assert (got["outputs"], got["skipped"], got["errors"], got["inputs"]) == (2, 1, 2, 5)
    assert got["skipped_by_reason"] == {"not_revised": 1} and "not_revised" not in got["errors_by_reason"]
    text = (rp / "summary.md").read_text()
    assert "skipped 1, errors 2" in text and "skipped by reason: not_revised 1" in text
    assert {p["source"] for p in pairs} == {"revision"} and all(p["p_chosen"] == 1.0 for p in pairs)
    # preference: 6 AI labels, 2 revision pairs at 0.25 → the 2 revision pairs and 6 AI rows
    info = infos["preference"]
    prefs = table(tmp_path / "run" / "preference" / "preferences")
    assert sorted(p["source"] for p in prefs) == ["ai"] * 6 + ["revision"] * 2
    m = info["mix"]
    assert (m["ai_kept"], m["revision_kept"], m["actual_revision_ratio"]) == (6, 2, 0.25)
    assert "2 of 2 revision rows" in (tmp_path / "run" / "preference" / "report.md").read_text()
    # the revision rows are the same rows the revision_pairs stage wrote
    assert sorted(p["pair_id"] for p in prefs if p["source"] == "revision") == sorted(p["pair_id"] for p in pairs)


def test_preference_makes_revision_pairs_from_an_sl_cai_dataset_itself(tmp_path, ray_local):
    from workflows.driver import run_recipe

    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Q{i}?", "response_a": f"A kind reply {i}.", "response_b": f"A rude reply {i}."} for i in range(2)])
    stages = [{"stage": "preference", "pairs_from": pairs_file, "engine_factory": FACTORY,
               "policy": judge_cfg("no-policy"), "judges": [judge_cfg("prefers-kind")],
               "revisions": {"input": write_sl_cai(tmp_path), "ratio": 0.5, "p_chosen": 0.8}}]
    info = run_recipe(recipe(tmp_path / "run", stages))["preference"]
    st = tmp_path / "run" / "preference"
    prefs, errors = table(st / "preferences"), table(st / "errors")
    assert sorted(p["source"] for p in prefs) == ["ai", "ai", "revision", "revision"]
    assert {p["p_chosen"] for p in prefs if p["source"] == "revision"} == {0.8}
    assert sorted(e["reason"] for e in errors if e["stage"] == "preference:revisions") == \
        ["missing_response", "not_revised", "unchanged"]
    assert info["mix"]["revision_errors"] == 3


def test_a_kept_first_answer_is_chosen_over_its_revision():
    row = sl_row(5, "Use `kill -9 PID` to stop the stuck process.", "Use `kill -9 PID` to stop the stuck process.",
                 source="benign_edgy")
    row["rounds"][0]["revision"] = "I can't help with killing, because it is violent."
    pair = revision_pair(row)
    assert pair["_error"] is None
    assert pair["chosen"][0]["content"].startswith("Use `kill -9") and pair["rejected"][0]["content"].startswith("I can't")

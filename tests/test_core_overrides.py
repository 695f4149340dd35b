"""``--set`` and ``cai config``: overrides typed and checked as the YAML is, typos named, the resolved
recipe printed with every default and loading back into the same recipe, and the resume hash
following an override."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.connect import REPO_ROOT
from workflows.core.errors import ConfigError
from workflows.core.overrides import apply_overrides, parse_set, parse_value
from workflows.driver import Recipe, load_recipe, plan, resolved, result_hash

RECIPES = sorted((REPO_ROOT / "workflows" / "recipes").glob("*.yaml"))
TOP = ["name", "run_dir", "seed", "ray", "bookkeeping", "stages", "overrides"]


def test_values_are_read_as_yaml_with_bare_exponents_as_numbers():
    assert parse_value("1e-5") == 1e-5 and isinstance(parse_value("1e-5"), float)
    assert parse_value("'1e-5'") == "1e-5" and parse_value("8") == 8 and parse_value("true") is True
    assert parse_value("[q_proj, v_proj]") == ["q_proj", "v_proj"] and parse_value("{r: 16}") == {"r": 16}
    assert parse_value("null") is None and parse_value("runs/x") == "runs/x"
    assert parse_set("preference.judges.0.model=embedded") == (["preference", "judges", "0", "model"], "embedded")
    for bad in ("sft.lr", "=3", "sft..lr=1"):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            parse_set(bad)


def test_overrides_walk_stages_lists_and_new_mappings():
    data = {"seed": 0, "stages": [{"stage": "sft", "lr": 1e-5},
                                  {"stage": "preference", "name": "prefs", "judges": [{"model": "a"}, {"model": "b"}]}]}
    out = apply_overrides(data, ["sft.lr=2e-5", "prefs.judges.1.model=embedded", "sft.lora.r=8", "seed=3",
                                 "ray.num_cpus=2"], TOP)
    assert out["stages"][0] == {"stage": "sft", "lr": 2e-5, "lora": {"r": 8}} and out["seed"] == 3
    assert out["stages"][1]["judges"] == [{"model": "a"}, {"model": "embedded"}] and out["ray"] == {"num_cpus": 2}
    assert data["stages"][0]["lr"] == 1e-5  # the recipe itself is left alone
    with pytest.raises(ConfigError, match="did you mean 'prefs'"):
        apply_overrides(data, ["pref.beta=1"], TOP)
    with pytest.raises(ConfigError, match="2 item"):
        apply_overrides(data, ["prefs.judges.5.model=x"], TOP)
    with pytest.raises(ConfigError, match="names a whole stage"):
        apply_overrides(data, ["sft=3"], TOP)


def test_a_typo_or_a_wrong_type_in_an_override_is_named(tmp_path):
    demo = REPO_ROOT / "workflows" / "recipes" / "demo.yaml"
    with pytest.raises(ConfigError, match=r"lrr.*did you mean 'lr'"):
        plan(load_recipe(demo, ["sft.lrr=1e-5"]))  # stage settings are checked as the stages are planned
    with pytest.raises(ConfigError, match=r"\.lr.*expected a number"):
        plan(load_recipe(demo, ["sft.lr=fast"]))
    with pytest.raises(ConfigError, match=r"seed.*expected an integer"):
        load_recipe(demo, ["seed=many"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_cai_config_prints_every_default_and_loads_back_into_the_same_recipe(path, tmp_path):
    recipe = load_recipe(path)
    text = yaml.safe_dump(resolved(recipe, str(path)), sort_keys=False)
    again = tmp_path / "resolved.yaml"
    again.write_text(text)
    back = load_recipe(again)
    assert [(s.name, s.kind, s.config) for s in plan(back)] == [(s.name, s.kind, s.config) for s in plan(recipe)]
    assert (back.seed, back.run_dir, back.ray, back.bookkeeping) == (recipe.seed, recipe.run_dir, recipe.ray,
                                                                     recipe.bookkeeping)
    first = yaml.safe_load(text)["stages"][0]
    assert {"stage", "name"} <= set(first) and len(first) > len(recipe.stages[0])  # defaults spelt out


def test_an_override_moves_only_its_stages_resume_hash_and_is_recorded(tmp_path):
    demo = REPO_ROOT / "workflows" / "recipes" / "demo.yaml"
    base, changed = load_recipe(demo), load_recipe(demo, ["sft.lr=1e-5"])
    hashes = [{s.name: result_hash(s.config, r.seed) for s in plan(r)} for r in (base, changed)]
    assert [n for n in hashes[0] if hashes[0][n] != hashes[1][n]] == ["sft"]
    assert changed.overrides == ["sft.lr=1e-5"] and base.overrides == []
    assert isinstance(changed, Recipe) and Path(demo).read_text() == demo.read_text()


def test_cai_config_command(capsys):
    from workflows.cli import main

    assert main(["config", str(REPO_ROOT / "workflows" / "recipes" / "demo.yaml"), "--set", "sft.epochs=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    sft = next(s for s in out["stages"] if s["name"] == "sft")
    assert sft["epochs"] == 3 and "warmup_steps" in sft and out["overrides"] == ["sft.epochs=3"]

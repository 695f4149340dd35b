"""Constitution loading and validation: pure unit tests (no Ray, no models)."""
from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import pytest
import yaml

from workflows.core.constitution import (
    Constitution,
    check_main,
    constitution_from_dict,
    describe,
    import_hf_json,
    load_constitution,
    resolve_constitution_path,
    sample_principles,
    shipped_names,
)
from workflows.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

VALID = {
    "name": "tiny",
    "version": 2,
    "description": "a test constitution",
    "principles": [
        {"id": "alpha", "critique": "Critique alpha.", "revision": "Revise alpha.",
         "comparison": "Which is more alpha?", "tags": ["harmless"]},
        {"id": "beta", "critique": "Critique beta.", "revision": "Revise beta.",
         "comparison": "Which is more beta?"},
        {"id": "gamma", "critique": "Critique gamma.", "revision": "Revise gamma.",
         "comparison": "Which is more gamma?"},
    ],
    "few_shot": [[
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Critique it."},
        {"role": "assistant", "content": "The critique."},
    ]],
}


def write_yaml(tmp_path: Path, data, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    return str(info.value)


def mutated(fn) -> dict:
    data = copy.deepcopy(VALID)
    fn(data)
    return data


# ----------------------------------------------------------------------------- shipped files

@pytest.mark.parametrize("name,version,min_principles,min_few_shot", [("default", "1", 14, 2),
                                                                       ("harmless", "2", 5, 3)])
def test_shipped_constitutions_load(name, version, min_principles, min_few_shot):
    c = load_constitution(name)
    assert c.name == name and c.version == version and c.description
    assert len(c.principles) >= min_principles
    assert len(c.few_shot) >= min_few_shot
    assert len(set(c.ids)) == len(c.ids)
    assert Path(c.source) == REPO / "constitutions" / f"{name}.yaml"
    for p in c.principles:
        assert p.comparison.startswith("Which") and "?" in p.comparison
        assert "assistant" in p.critique and "assistant" in p.revision
    for conv in c.few_shot:
        assert sum(len(m["content"].split()) for m in conv) < 250, "keep few-shot short for small models"


def test_shipped_names_and_paths():
    assert {"default", "harmless"} <= set(shipped_names())
    assert resolve_constitution_path("default") == REPO / "constitutions" / "default.yaml"
    by_path = load_constitution(REPO / "constitutions" / "harmless.yaml")
    assert by_path == load_constitution("harmless")


def test_valid_yaml_and_json_in_our_schema(tmp_path):
    c = load_constitution(write_yaml(tmp_path, VALID))
    assert c.ids == ["alpha", "beta", "gamma"] and c.version == "2"
    assert c.get("alpha").tags == ("harmless",) and c.get("beta").tags == ()
    assert c.few_shot[0][1] == {"role": "assistant", "content": "A"}
    j = tmp_path / "x.json"
    j.write_text(json.dumps(VALID), encoding="utf-8")
    assert load_constitution(j).principles == c.principles


def test_system_turn_first_is_allowed():
    data = mutated(lambda d: d["few_shot"][0].insert(0, {"role": "system", "content": "Be kind."}))
    assert constitution_from_dict(data, "mem.yaml").few_shot[0][0]["role"] == "system"


# ----------------------------------------------------------------------------- file-level errors

def test_missing_file_suggests_shipped_names(tmp_path):
    msg = load_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "file not found" in msg and "default" in msg and "harmless" in msg
    with pytest.raises(ConfigError, match="did you mean 'default'"):
        load_constitution("defualt")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("name: x", encoding="utf-8")
    assert "unsupported file type" in load_error(path)


def test_not_utf8_names_byte_offset(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    msg = load_error(path)
    assert "latin.yaml" in msg and "UTF-8" in msg and "offset 9" in msg


def test_bad_yaml_names_line_and_column(tmp_path):
    msg = load_error(write_yaml(tmp_path, "name: x\nprinciples:\n  - id: a\n   critique: [unclosed\n"))
    assert "x.yaml:" in msg and "invalid YAML" in msg
    assert ":4:" in msg or ":5:" in msg


def test_bad_json_names_line_and_column(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"name": "x",\n "principles": [}\n', encoding="utf-8")
    assert "c.json:2:" in load_error(path)


@pytest.mark.parametrize("data,where,problem", [
    ("- just\n- a list\n", "x.yaml", "top level must be a mapping"),
    ("", "x.yaml", "top level must be a mapping"),
    ({"name": "x", "principles": []}, "x.yaml: principles", "no principles"),
    ({"name": "x"}, "x.yaml: principles", "no principles"),
    ({"name": "x", "principle": []}, "x.yaml: top level.principle", "did you mean 'principles'"),
])
def test_top_level_errors(tmp_path, data, where, problem):
    msg = load_error(write_yaml(tmp_path, data))
    assert where in msg and problem in msg


# ----------------------------------------------------------------------------- principle errors

def _set(i, field, value):
    return lambda d: d["principles"][i].__setitem__(field, value)


@pytest.mark.parametrize("fn,where,problem", [
    (lambda d: d["principles"].__setitem__(1, "just text"), "principles[1]", "must be a mapping"),
    (lambda d: d["principles"][2].pop("comparison"), "principles[2] (id=gamma).comparison", "is missing"),
    (_set(1, "critique", "   "), "principles[1] (id=beta).critique", "is empty"),
    (_set(0, "revision", 3), "principles[0] (id=alpha).revision", "must be a string"),
    (_set(0, "revision", ["a"]), "principles[0] (id=alpha).revision", "must be a string"),
    (lambda d: d["principles"][1].pop("id"), "principles[1].id", "is missing"),
    (_set(1, "id", "Beta Principle"), "principles[1].id", "kebab-case"),
    (_set(2, "id", "alpha"), "principles[2] (id=alpha).id", "also used by principles[0]"),
    (_set(1, "critiqe", "typo"), "principles[1] (id=beta).critiqe", "did you mean 'critique'"),
    (_set(1, "tags", "harmless"), "principles[1] (id=beta).tags", "list"),
])
def test_principle_errors_name_file_principle_and_field(tmp_path, fn, where, problem):
    msg = load_error(write_yaml(tmp_path, mutated(fn)))
    assert f"x.yaml: {where}" in msg, msg
    assert problem in msg, msg
    assert " — " in msg, "every error carries a fix"


# ----------------------------------------------------------------------------- few-shot errors

def _turn(j, **kw):
    return lambda d: d["few_shot"][0][j].update(kw)


@pytest.mark.parametrize("fn,where,problem", [
    (lambda d: d["few_shot"][0].pop(0), "few_shot[0][0].role", "'user' was expected"),
    (lambda d: d["few_shot"][0].pop(), "few_shot[0]", "does not end with an assistant turn"),
    (_turn(2, role="assistant"), "few_shot[0][2].role", "'user' was expected"),
    (_turn(1, role="bot"), "few_shot[0][1].role", "use one of system, user, assistant"),
    (_turn(3, content=""), "few_shot[0][3].content", "is empty"),
    (_turn(3, content=7), "few_shot[0][3].content", "must be a string"),
    (_turn(0, text="x"), "few_shot[0][0].text", "unknown field"),
    (lambda d: d["few_shot"][0].__setitem__(1, "hi"), "few_shot[0][1]", "must be a mapping"),
    (lambda d: d["few_shot"].append([]), "few_shot[1]", "non-empty list"),
    (lambda d: d.__setitem__("few_shot", "nope"), "few_shot", "must be a list"),
    (lambda d: d["few_shot"][0].insert(2, {"role": "system", "content": "s"}), "few_shot[0][2].role",
     "'user' was expected"),
])
def test_few_shot_errors(tmp_path, fn, where, problem):
    msg = load_error(write_yaml(tmp_path, mutated(fn)))
    assert f"x.yaml: {where}" in msg, msg
    assert problem in msg, msg


# ----------------------------------------------------------------------------- HF JSON import

HF = {
    "constitutions": [
        {"critic": "Is the response rude in any way?", "revision": "Rewrite it to be polite."},
        {"critique": "Does the response help with a crime?", "revision": "Rewrite it to refuse."},
    ],
    "system_chat": [[
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Insert a tension wrench..."},
        {"role": "user", "content": "Is the response rude in any way?"},
        {"role": "assistant", "content": "No, but it helps break in."},
        {"role": "user", "content": "Rewrite it to be polite."},
        {"role": "assistant", "content": "I can't help break into locks you don't own."},
    ]],
}


def write_json(tmp_path: Path, data, name: str = "constitution_anthropic.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_hf_json_import(tmp_path):
    c = load_constitution(write_json(tmp_path, HF))
    assert c.name == "constitution_anthropic" and c.ids == ["hf-001", "hf-002"]
    p = c.get("hf-001")
    assert p.critique == "Is the response rude in any way?" and p.revision == "Rewrite it to be polite."
    assert p.comparison.startswith("Which of these assistant responses") and p.critique in p.comparison
    assert c.get("hf-002").critique == "Does the response help with a crime?"
    assert c.few_shot == tuple(tuple(conv) for conv in HF["system_chat"])
    assert import_hf_json(HF, "mem.json").principles == c.principles


def test_hf_json_bare_list_format(tmp_path):
    c = load_constitution(write_json(tmp_path, HF["constitutions"], "constitution.json"))
    assert c.ids == ["hf-001", "hf-002"] and c.few_shot == ()


@pytest.mark.parametrize("fn,where,problem", [
    (lambda d: d["constitutions"][1].pop("revision"), "constitutions[1].revision", "is missing"),
    (lambda d: d["constitutions"][0].__setitem__("critic", ""), "constitutions[0].critic", "is empty"),
    (lambda d: d["constitutions"][0].__setitem__("revison", "x"), "constitutions[0].revison", "did you mean"),
    (lambda d: d.__setitem__("constitutions", []), "constitutions", "no principles"),
    (lambda d: d["system_chat"][0][1].__setitem__("role", "user"), "system_chat[0][1].role", "'assistant' was expected"),
])
def test_hf_json_errors(tmp_path, fn, where, problem):
    data = copy.deepcopy(HF)
    fn(data)
    msg = load_error(write_json(tmp_path, data))
    assert f"constitution_anthropic.json: {where}" in msg, msg
    assert problem in msg, msg


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def default() -> Constitution:
    return load_constitution("default")


def test_sampling_is_reproducible(default):
    assert sample_principles(default, "row-1", 3, seed=7) == sample_principles(default, "row-1", 3, seed=7)
    picks = [tuple(sample_principles(default, f"row-{k}", 3, seed=7)) for k in range(50)]
    assert len(set(picks)) > 1
    assert picks != [tuple(sample_principles(default, f"row-{k}", 3, seed=8)) for k in range(50)]
    # independent of call order / other rows
    assert picks[::-1] == [tuple(sample_principles(default, f"row-{k}", 3, seed=7)) for k in reversed(range(50))]


def test_sampling_without_and_with_replacement(default):
    n = len(default.principles)
    same = sample_principles(default, "k", n, seed=0)
    assert sorted(same) == sorted(default.ids)
    many = sample_principles(default, "k", 3 * n, seed=0)
    assert len(many) == 3 * n and set(many) <= set(default.ids)
    assert sample_principles(default, "k", 0, seed=0) == []
    with pytest.raises(ValueError):
        sample_principles(default, "k", -1, seed=0)


def test_sampling_is_roughly_uniform(default):
    counts = collections.Counter(sample_principles(default, f"p{k}", 1, seed=1)[0] for k in range(2000))
    expected = 2000 / len(default.principles)
    assert set(counts) == set(default.ids)
    assert all(0.5 * expected < c < 1.5 * expected for c in counts.values()), counts


# ----------------------------------------------------------------------------- get / describe / CLI

def test_get_unknown_id(default):
    assert default.get("honesty").id == "honesty"
    with pytest.raises(KeyError, match="did you mean 'honesty'.*known ids"):
        default.get("honesti")


def test_describe(default):
    text = describe(default)
    assert "default" in text and f"{len(default.principles)} principles" in text
    assert "harmful-content" in text and "2 few-shot" in text


def test_check_main_ok(capsys):
    assert check_main(str(REPO / "constitutions" / "default.yaml")) == 0
    out = capsys.readouterr().out
    assert "default" in out and out.rstrip().endswith("OK")


def test_check_main_error(tmp_path, capsys):
    path = write_yaml(tmp_path, mutated(_set(1, "critique", "")))
    from workflows.cli import main

    assert main(["validate-constitution", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "principles[1] (id=beta).critique" in err and "is empty" in err
    assert "\n" not in err and "Traceback" not in err

"""Prompt sources: pure row logic (ids, HH parsing, normalization, config) and the
Ray reader over jsonl / csv / parquet / saved HF datasets / builtin sets."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import subprocess
import sys
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.core.errors import ConfigError, DataError, RowError
from workflows.core.typed import from_dict
from workflows.prompt_sources import (
    BUILTIN_DIR,
    RAW_SCHEMA,
    PromptsConfig,
    iter_prompt_rows,
    normalize_record,
    parse_hh_transcript,
    prompt_id,
    read_prompts,
    split_hh_prompt_response,
)

COLUMNS = ["prompt_id", "messages", "source", "_loc", "_error", "_detail"]
TEXTS = ["How do I bake bread?", "Tell me a joke.", "Café au lait, s'il vous plaît", "  spaced  "]


def cfg(**kw) -> PromptsConfig:
    return from_dict(PromptsConfig, kw, "recipe.yaml: prompts")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------- prompt_id

def test_prompt_id_known_value():
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi ☃"}]
    canon = '[["system","Be kind."],["user","Hi ☃"]]'
    assert prompt_id(msgs) == hashlib.sha256(canon.encode("utf-8")).hexdigest()[:24]


def test_prompt_id_stable_and_distinct():
    base = prompt_id(user("hello"))
    assert base == prompt_id([{"content": "hello", "role": "user", "extra": 1}])
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café" and prompt_id(user(decomposed)) == prompt_id(user("café"))
    others = [user("hello "), user("Hello"), [{"role": "system", "content": "hello"}],
              [{"role": "user", "content": "hel"}, {"role": "user", "content": "lo"}]]
    ids = {base} | {prompt_id(m) for m in others}
    assert len(ids) == 1 + len(others) and all(len(i) == 24 for i in ids)


def test_prompt_id_same_in_another_process():
    code = "from workflows.prompt_sources import prompt_id; print(prompt_id([{'role':'user','content':'hello'}]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".")
    assert out.stdout.strip() == prompt_id(user("hello"))


# ---------------------------------------------------------------- HH transcripts

def test_hh_single_and_trailing_assistant():
    assert parse_hh_transcript("\n\nHuman: How are you?\n\nAssistant:") == user("How are you?")
    assert parse_hh_transcript("Human: no leading newlines") == user("no leading newlines")


def test_hh_multi_turn():
    text = "\n\nHuman: a\n\nAssistant: b\nstill b\n\nHuman: c\n\nAssistant: d"
    assert parse_hh_transcript(text) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b\nstill b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    prompt, response = split_hh_prompt_response(text)
    assert [m["content"] for m in prompt] == ["a", "b\nstill b", "c"] and response == "d"
    assert split_hh_prompt_response(text + "\n\nHuman: e\n\nAssistant:")[1] == ""


@pytest.mark.parametrize("text", [
    "just some text", "", "\n\nAssistant: hi\n\nHuman: hello", "preamble\n\nHuman: hi",
    "\n\nHuman: a\n\nHuman: b", "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c",
])
def test_hh_malformed(text):
    with pytest.raises(RowError) as e:
        parse_hh_transcript(text)
    assert e.value.reason == "bad_hh_transcript"


# ---------------------------------------------------------------- normalize_record

def test_normalize_kinds():
    c = cfg()
    assert normalize_record({"prompt": " hi "}, c) == user(" hi ")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u", "name": "x"}]
    assert normalize_record({"prompt": msgs}, c) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert normalize_record({"prompt": json.dumps(msgs)}, cfg(kind="messages"))[1] == {"role": "user", "content": "u"}
    hh = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: a2"
    assert [m["content"] for m in normalize_record({"prompt": hh}, c)] == ["q1", "a1", "q2"]
    assert normalize_record({"prompt": hh}, cfg(kind="text")) == user(hh)


@pytest.mark.parametrize("record,kw,reason", [
    ({"question": "hi", "answer": "x"}, {}, "missing_field"),
    ({"prompt": ""}, {}, "empty_prompt"),
    ({"prompt": "   \n"}, {}, "empty_prompt"),
    ({"prompt": None}, {}, "empty_prompt"),
    ({"prompt": []}, {}, "empty_prompt"),
    ({"prompt": "x" * 11}, {"max_chars": 10}, "too_long"),
    ({"prompt": [{"role": "user", "content": "x" * 6}] * 2}, {"max_chars": 10}, "too_long"),
    ({"prompt": {"role": "user"}}, {}, "bad_messages"),
    ({"prompt": 42}, {}, "bad_messages"),
    ({"prompt": [{"content": "hi"}]}, {}, "bad_messages"),
    ({"prompt": [{"role": "robot", "content": "hi"}]}, {}, "bad_messages"),
    ({"prompt": [{"role": "user", "content": 3}]}, {}, "bad_messages"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {}, "bad_messages"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                 {"role": "user", "content": "c"}]}, {}, "bad_messages"),
    ({"prompt": "not json"}, {"kind": "messages"}, "bad_messages"),
    ({"prompt": "\n\nHuman: a\n\nHuman: b"}, {}, "bad_hh_transcript"),
    ({"prompt": "plain text"}, {"kind": "hh"}, "bad_hh_transcript"),
    ({"prompt": "\n\nHuman:   \n\nAssistant:"}, {}, "empty_prompt"),
])
def test_normalize_reasons(record, kw, reason):
    with pytest.raises(RowError) as e:
        normalize_record(record, cfg(**kw))
    assert e.value.reason == reason


def test_missing_field_detail_names_field_and_columns():
    with pytest.raises(RowError) as e:
        normalize_record({"question": "q", "answer": "a"}, cfg())
    assert "'prompt'" in e.value.detail and "question, answer" in e.value.detail


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("data,field", [
    ({"limit": 0}, "limit"), ({"limit": -3}, "limit"), ({"limit_per_file": 0}, "limit_per_file"),
    ({"max_chars": 0}, "max_chars"),
    ({"path": "builtin:nope"}, "path"), ({"path": ""}, "path"), ({"field": ""}, "field"),
    ({"path": "hf:x/y", "format": "csv"}, "format"), ({"path": "builtin:red_team", "format": "parquet"}, "format"),
    ({"source": " "}, "source"), ({"kind": "chat"}, "kind"), ({"limt": 3}, "limt"),
])
def test_config_errors(data, field):
    with pytest.raises(ConfigError) as e:
        cfg(**data)
    assert e.value.where == f"recipe.yaml: prompts.{field}"
    assert e.value.fix


def test_config_defaults():
    c = cfg()
    assert (c.path, c.field, c.kind, c.limit) == ("builtin:red_team", "prompt", "auto", None)


# ---------------------------------------------------------------- files (pure reader)

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_all_formats(tmp_path, texts):
    import datasets

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": t, "n": i} for i, t in enumerate(texts)])
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["n", "prompt"]] + [[i, t] for i, t in enumerate(texts)])
    pq.write_table(pa.table({"prompt": texts}), tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"prompt": texts}).save_to_disk(str(tmp_path / "hfdir"))
    return [tmp_path / "p.jsonl", tmp_path / "p.csv", tmp_path / "p.parquet", tmp_path / "hfdir"]


BAD_LINES = [
    '{"prompt": "good one"}', '{"prompt": ""}', 'this is not json', '{"other": "x"}',
    '', '{"prompt": "good two"}', '["a list"]', '{"prompt": "' + "x" * 50 + '"}',
    '{"prompt": [{"role": "assistant", "content": "hi"}]}', '{"prompt": "\\n\\nHuman: a\\n\\nHuman: b"}',
]
BAD_EXPECTED = {  # record index (blank line skipped) → reason
    0: None, 1: "empty_prompt", 2: "bad_json", 3: "missing_field", 4: None, 5: "bad_json",
    6: "too_long", 7: "bad_messages", 8: "bad_hh_transcript",
}


def reasons_by_record(rows) -> dict[int, str | None]:
    """``{record index in bad.jsonl: error reason or None}`` of the rows read."""
    return {int(r["_loc"].removeprefix("bad.jsonl:")): r["_error"] for r in rows}


def check_bad_row_fields(rows) -> None:
    """Bad rows keep a location id and no messages; good rows a content id; both the file's source."""
    for r in rows:
        assert r["source"] == "bad"
        if r["_error"]:
            assert r["prompt_id"] == f"row:{r['_loc']}" and r["messages"] == [] and r["_detail"], r
        else:
            assert r["_detail"] is None and r["prompt_id"] == prompt_id(r["messages"]), r


def test_iter_bad_rows(tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join(BAD_LINES) + "\n")
    rows = list(iter_prompt_rows(cfg(path=str(tmp_path / "bad.jsonl"), max_chars=40)))
    assert len(rows) == len(BAD_EXPECTED) and reasons_by_record(rows) == BAD_EXPECTED
    assert next(r for r in rows if r["_loc"] == "bad.jsonl:4")["messages"] == user("good two")
    check_bad_row_fields(rows)


def test_iter_formats_agree(tmp_path):
    paths = write_all_formats(tmp_path, TEXTS)
    want = [prompt_id(user(t)) for t in TEXTS]
    for p in paths:
        rows = list(iter_prompt_rows(cfg(path=str(p))))
        assert [r["prompt_id"] for r in rows] == want, p
        assert [r["_loc"] for r in rows] == [f"{p.name}:{i}" for i in range(len(TEXTS))]
        assert {r["source"] for r in rows} == {p.stem}


def test_iter_source_precedence(tmp_path):
    """``source:`` in the config, else the row's own ``source``, else the file's name — so a
    user's folder tags rows as ``builtin:all`` does, and a prompts dataset read back keeps its tags."""
    shipped = [r["source"] for r in iter_prompt_rows(cfg(path=str(BUILTIN_DIR), limit_per_file=3))]
    assert shipped == [r["source"] for r in iter_prompt_rows(cfg(path="builtin:all", limit_per_file=3))]
    assert sorted(set(shipped)) == ["benign_edgy", "helpful", "red_team"]
    rows = [{"prompt": "a", "source": "red_team"}, {"prompt": "b", "source": " "}, {"prompt": "c", "source": None},
            {"prompt": "d"}, {"prompt": "", "source": "helpful"}]
    write_jsonl(tmp_path / "mixed.jsonl", rows)
    got = [(r["source"], r["_error"]) for r in iter_prompt_rows(cfg(path=str(tmp_path / "mixed.jsonl")))]
    assert got == [("red_team", None), ("mixed", None), ("mixed", None), ("mixed", None), ("helpful", "empty_prompt")]
    assert {r["source"] for r in iter_prompt_rows(cfg(path=str(tmp_path / "mixed.jsonl"), source="mine"))} == {"mine"}
    pq.write_table(pa.table({"messages": [user("x"), user("y")], "source": ["helpful", "red_team"]}),
                   tmp_path / "part-0.parquet")
    assert [r["source"] for r in iter_prompt_rows(cfg(path=str(tmp_path / "part-0.parquet"), field="messages"))] \
        == ["helpful", "red_team"]


def test_iter_json_array_gzip_and_limit(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": t} for t in TEXTS]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"prompt": t}) + "\n" for t in TEXTS))
    want = [prompt_id(user(t)) for t in TEXTS]
    assert [r["prompt_id"] for r in iter_prompt_rows(cfg(path=str(tmp_path / "a.json")))] == want
    rows = list(iter_prompt_rows(cfg(path=str(tmp_path / "b.jsonl.gz"), limit=2, source="mine")))
    assert [r["prompt_id"] for r in rows] == want[:2] and rows[0]["source"] == "mine"
    assert rows[1]["_loc"] == "b.jsonl.gz:1"


def test_whole_input_errors(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="does not exist"):
        list(iter_prompt_rows(cfg(path=str(tmp_path / "missing.jsonl"))))
    with pytest.raises(ConfigError, match=r"notes\.txt.*prompts\.format"):
        list(iter_prompt_rows(cfg(path=str(tmp_path / "notes.txt"))))
    with pytest.raises(ConfigError, match="no .* files in directory"):
        list(iter_prompt_rows(cfg(path=str(tmp_path / "empty"))))
    with pytest.raises(ConfigError) as e:
        list(iter_prompt_rows(cfg(path=str(tmp_path / "data.jsonl"))))
    assert str(e.value) == ("prompts.field: column 'prompt' not in data.jsonl (columns: question, answer)"
                            " — set prompts.field: question")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        list(iter_prompt_rows(cfg(path=str(tmp_path / "broken.parquet"))))
    with pytest.raises(DataError, match="cannot load HF dataset"):
        list(iter_prompt_rows(cfg(path="hf:no-such-org/no-such-dataset")))


def test_forced_format_and_kind(tmp_path):
    (tmp_path / "p.txt").write_text(json.dumps({"chat": [{"role": "user", "content": "hey"}]}) + "\n")
    rows = list(iter_prompt_rows(cfg(path=str(tmp_path / "p.txt"), format="jsonl", field="chat", kind="messages")))
    assert rows[0]["messages"] == user("hey") and rows[0]["_error"] is None


# ---------------------------------------------------------------- Ray

def ray_rows(c: PromptsConfig) -> list[dict]:
    ds = read_prompts(c)
    rows = ds.take_all()
    assert ds.schema().names == COLUMNS
    return sorted(rows, key=lambda r: (r["_loc"].rsplit(":", 1)[0], int(r["_loc"].rsplit(":", 1)[1])))


def plain(rows):
    return [{**r, "messages": [dict(m) for m in r["messages"]]} for r in rows]


def test_ray_formats_same_ids(ray_local, tmp_path):
    texts = TEXTS + [f"prompt number {i}" for i in range(20)]
    want = [prompt_id(user(t)) for t in texts]
    for p in write_all_formats(tmp_path, texts):
        rows = ray_rows(cfg(path=str(p)))
        assert [r["prompt_id"] for r in rows] == want, p
        assert [r["_loc"] for r in rows] == [f"{p.name}:{i}" for i in range(len(texts))]
        assert plain(rows) == list(iter_prompt_rows(cfg(path=str(p))))


def test_ray_messages_columns_agree(ray_local, tmp_path):
    import datasets

    convs = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}] for i in range(3)]
    convs.append([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}])
    want = [prompt_id(c) for c in convs]
    write_jsonl(tmp_path / "m.jsonl", [{"messages": c} for c in convs])
    pq.write_table(pa.table({"messages": convs}), tmp_path / "m.parquet")
    datasets.Dataset.from_dict({"messages": convs}).save_to_disk(str(tmp_path / "mhf"))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["messages"]] + [[json.dumps(c)] for c in convs])
    for name, kind in [("m.jsonl", "auto"), ("m.parquet", "auto"), ("mhf", "auto"), ("m.csv", "messages")]:
        rows = ray_rows(cfg(path=str(tmp_path / name), field="messages", kind=kind))
        assert [r["prompt_id"] for r in rows] == want, name
        assert [[dict(m) for m in r["messages"]] for r in rows] == convs


def test_ray_bad_rows(ray_local, tmp_path):
    (tmp_path / "bad.jsonl").write_text("\n".join(BAD_LINES) + "\n")
    rows = plain(ray_rows(cfg(path=str(tmp_path / "bad.jsonl"), max_chars=40)))
    assert len(rows) == len(BAD_EXPECTED) and reasons_by_record(rows) == BAD_EXPECTED
    check_bad_row_fields(rows)


def test_ray_directory_and_hf_ranges(ray_local, tmp_path):
    import datasets

    (tmp_path / "dir" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "dir" / "a.jsonl", [{"prompt": f"a{i}"} for i in range(3)])
    write_jsonl(tmp_path / "dir" / "sub" / "b.jsonl", [{"prompt": f"b{i}"} for i in range(2)])
    (tmp_path / "dir" / "_SUCCESS").write_text("")
    rows = ray_rows(cfg(path=str(tmp_path / "dir")))
    assert [(r["_loc"], r["messages"][0]["content"], r["source"]) for r in rows] == \
        [(f"a.jsonl:{i}", f"a{i}", "a") for i in range(3)] + [(f"sub/b.jsonl:{i}", f"b{i}", "sub/b") for i in range(2)]
    n = 2500  # several HF read ranges: indices must stay exact across them
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": [f"p{i}" for i in range(n)]}),
                               "test": datasets.Dataset.from_dict({"prompt": ["t"]})})
    dd.save_to_disk(str(tmp_path / "hh"))
    rows = ray_rows(cfg(path=str(tmp_path / "hh")))
    assert [(r["_loc"], r["messages"][0]["content"]) for r in rows] == [(f"hh/train:{i}", f"p{i}") for i in range(n)]
    assert [r["_loc"] for r in ray_rows(cfg(path=str(tmp_path / "hh"), split="test"))] == ["hh/test:0"]
    with pytest.raises(ConfigError, match="no split 'dev'"):
        read_prompts(cfg(path=str(tmp_path / "hh"), split="dev"))


def test_ray_limit_is_first_rows_in_order(ray_local, tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "1.jsonl", [{"prompt": f"one {i}"} for i in range(3)])
    write_jsonl(tmp_path / "d" / "2.jsonl", [{"prompt": f"two {i}"} for i in range(3)])
    rows = ray_rows(cfg(path=str(tmp_path / "d"), limit=4))
    assert [r["_loc"] for r in rows] == ["1.jsonl:0", "1.jsonl:1", "1.jsonl:2", "2.jsonl:0"]
    rows = ray_rows(cfg(path=str(tmp_path / "d"), limit_per_file=2))
    assert sorted(r["_loc"] for r in rows) == ["1.jsonl:0", "1.jsonl:1", "2.jsonl:0", "2.jsonl:1"]
    rows = list(iter_prompt_rows(cfg(path="builtin:all", limit_per_file=2)))
    assert sorted(r["source"] for r in rows) == ["benign_edgy"] * 2 + ["helpful"] * 2 + ["red_team"] * 2


def test_ray_whole_input_errors_are_clear(ray_local, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match="set prompts.field: question"):
        read_prompts(cfg(path=str(tmp_path / "data.jsonl")))
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts(cfg(path=str(tmp_path / "nope")))


def test_ray_builtin_sets(ray_local):
    red, helpful = ray_rows(cfg(path="builtin:red_team")), ray_rows(cfg(path="builtin:helpful"))
    edgy, every = ray_rows(cfg(path="builtin:benign_edgy")), ray_rows(cfg(path="builtin:all"))
    assert len(red) >= 200 and len(helpful) >= 150 and len(edgy) >= 150
    assert len(every) == len(red) + len(helpful) + len(edgy)
    for rows in (red, helpful, edgy, every):
        assert all(r["_error"] is None for r in rows)
        assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert {r["source"] for r in every} == {"red_team", "helpful", "benign_edgy"}
    assert RAW_SCHEMA.names == COLUMNS

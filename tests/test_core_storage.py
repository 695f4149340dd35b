"""Run-directory files written whole or not at all, and torn markers as one-line errors."""
from __future__ import annotations

import os

import pytest

from workflows.core import stage, storage
from workflows.core.errors import CaiError


def test_a_write_replaces_the_file_whole_or_leaves_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "d" / "_SUCCESS"
    storage.write_json(str(target), {"outputs": 1, "config_hash": "a"})
    assert storage.read_json(str(target)) == {"outputs": 1, "config_hash": "a"}

    def crash(src, dst):  # the process dies between writing the new bytes and putting them in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        storage.write_json(str(target), {"outputs": 2, "config_hash": "b"})
    monkeypatch.undo()
    assert storage.read_json(str(target)) == {"outputs": 1, "config_hash": "a"}  # the old record, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["_SUCCESS"]  # no temporary file left behind


@pytest.mark.parametrize("text,problem", [('{"outputs": 3, "config_h', "not valid JSON"), ("", "is empty"),
                                          ('["a list"]', "not a stage's completion record"),
                                          ('{"outputs": 3}', "not a stage's completion record")])
def test_a_torn_success_marker_is_one_line_naming_the_file_and_the_fix(tmp_path, text, problem):
    d = tmp_path / "critique_revision"
    d.mkdir()
    (d / "_SUCCESS").write_text(text)
    with pytest.raises(CaiError) as e:
        stage.read_success(str(d))
    msg = str(e.value)
    assert "\n" not in msg and str(d / "_SUCCESS") in msg and problem in msg
    assert "--restart-from critique_revision" in msg and "delete it" in msg


def test_cai_run_reports_a_torn_marker_in_one_line(tmp_path, capsys, ray_local):
    from workflows.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: torn\nrun_dir: {tmp_path / 'run'}\nstages:\n  - stage: prompts\n    path: {prompts}\n")
    assert main(["run", str(recipe)]) == 0
    capsys.readouterr()
    marker = tmp_path / "run" / "prompts" / "_SUCCESS"
    marker.write_text(marker.read_text()[:25])  # cut short, as a crash mid-write on another filesystem would
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(marker) in err and "Traceback" not in err
    (tmp_path / "run" / "prompts" / "_SUCCESS").unlink()
    (tmp_path / "run" / "prompts" / "_config.json").write_text("{")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "_config.json" in err and "--restart-from prompts" in err and "\n" not in err


def test_list_files_of_a_file_is_the_file_and_judging_errors_are_appended(tmp_path):
    """The preference stage copies each judging error file into the stage's errors: found when a
    judge first left errors (vLLM judges on a random model), it had listed each file as a folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflows.core.stage import ERRORS_SCHEMA
    from workflows.preference.report import append_parts

    src = tmp_path / "judging-errors"
    src.mkdir()
    row = {"id": "p1", "stage": "preference:judging", "reason": "unparseable", "detail": "no letter"}
    pq.write_table(pa.Table.from_pylist([row], schema=ERRORS_SCHEMA), src / "part-00000.parquet")
    f = str(src / "part-00000.parquet")
    assert storage.list_files(f, ".parquet") == [f] and storage.list_files(f, ".json") == []
    (tmp_path / "errors").mkdir()
    assert append_parts(str(src), str(tmp_path / "errors"), "judging") == {"unparseable": 1}
    assert pq.read_table(tmp_path / "errors" / "judging-00000.parquet").to_pylist() == [row]

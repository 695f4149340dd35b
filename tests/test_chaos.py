"""Chaos cases that fit in CI (the full set with its table: ``python benchmarks/chaos.py``): real
``cai run`` processes with a tiny model, a fault injected mid-stage, and the run's outputs audited —
nothing lost, nothing duplicated, little redone, and the run finished. A killed driver, a torn raw
file and Ctrl-C are in ``test_stopping.py``."""
from __future__ import annotations

import pytest

from benchmarks import chaos
from actors.pool import block_rows

pytestmark = pytest.mark.chaos
ROWS = 16
CONCURRENCY, BATCH, CHECKPOINT_ROWS = 2, 2, 4  # benchmarks.chaos's SL-CAI settings


def _block() -> int:
    from actors import EngineConfig

    return block_rows(ROWS, CHECKPOINT_ROWS, EngineConfig(batch_size=BATCH, concurrency=CONCURRENCY))


def _accounted(row: dict) -> None:
    assert row["finished"], row["note"]
    assert row["lost"] == 0 and row["duplicated"] == 0, row
    assert row["out"] + row["errors"] == row["in"] == ROWS, row


def test_engine_actors_killed_starting_and_mid_stage(tiny_llama_dir, tmp_path):
    """One engine actor killed while it loads, another once the first block is saved: the stage
    finishes (Ray Data starts a replacement for the first, Ray restarts the second)."""
    row = chaos.fault_actor_sl_cai(tmp_path, str(tiny_llama_dir), ROWS, starting=True)
    _accounted(row)
    assert "killed while starting (engine loaded: False)" in row["note"], row["note"]
    # at most the block the killed actor was working on is done again (actors save each block themselves)
    assert row["redone"] <= _block(), row


def test_a_fault_not_survived_is_named_with_its_reasons_and_console(monkeypatch, capsys):
    """The benchmark names each fault it did not survive (as ``--faults`` takes it), every check that
    failed, and the last 30 lines of each console of its `cai` processes — so the case can be found and
    run alone; a fault that breaks the harness is reported so too. No Ray here: the faults are stubs."""
    def fine(work, model, n):
        return {"fault": "a fault survived", "in": n, "out": n, "errors": 0, "lost": 0, "duplicated": 0,
                "redone": 0, "finished": True, "checks": {"exit 0": True}, "note": "all well"}

    def broken(work, model, n):
        (work / "console-1.txt").write_text("".join(f"first run line {i}\n" for i in range(50)))
        (work / "console-2.txt").write_text("[prompts] already finished\nerror: something went wrong\n")
        return {"fault": "a fault not survived", "in": n, "out": n - 3, "errors": 0, "lost": 3, "duplicated": 0,
                "redone": 0, "finished": False, "checks": {"rerun exit 0": False, "rerun resumed": True},
                "note": "exit 2"}

    def crashed(work, model, n):
        raise RuntimeError("timed out after 300 s waiting for the first raw file\nmore detail")

    monkeypatch.setattr(chaos, "FAULTS", {"fine": fine, "broken": broken, "crashed": crashed})
    monkeypatch.setattr(chaos, "tiny_model", lambda out: str(out))
    assert chaos.main(["--faults", "fine,broken,crashed", "--prompts", "8"]) == 1
    out = capsys.readouterr().out
    report = out[out.index("NOT survived: --faults broken"):out.index("NOT survived: --faults crashed")]
    assert "check failed: rerun exit 0" in report and "rows lost: 3" in report
    assert "rerun resumed" not in report  # a check that passed is not a reason
    assert "--- console-1.txt: last 30 of 50 line(s) ---" in report
    assert "first run line 49" in report and "first run line 20" in report and "first run line 19" not in report
    assert "error: something went wrong" in report
    assert "check failed: the fault ran to its end (RuntimeError: timed out after 300 s waiting for the first " \
           "raw file)" in out
    assert "NOT survived: --faults fine" not in out
    lines = out.rstrip().splitlines()
    assert lines[-1].startswith("faults survived 1/3, rows lost 3"), lines[-1]
    assert any(x.startswith("NOT survived: broken (a fault not survived): check failed: rerun exit 0") for x in lines)

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

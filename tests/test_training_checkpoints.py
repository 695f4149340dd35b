"""Which checkpoint a restarted training job resumes from: the newest whole one on storage, whether
Ray Train recorded it or not; one cut short by a killed writer, or missing a rank's shard, is passed
over for an older one."""
from __future__ import annotations

import json
import zipfile

import pytest

from training import checkpoints


def _checkpoint(root, name: str, step: int, ranks: int = 2, torn: str | None = None, state: bool = True):
    d = root / "_ray" / "sft" / name
    tag = d / "deepspeed" / f"step{step}"
    tag.mkdir(parents=True)
    (d / "deepspeed" / "latest").write_text(f"step{step}")
    files = ["mp_rank_00_model_states.pt", *[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)]]
    for f in files:
        with zipfile.ZipFile(tag / f, "w") as z:  # torch's .pt format is a zip archive
            z.writestr("data.pkl", b"x" * 64)
    if torn:
        data = (tag / torn).read_bytes()
        (tag / torn).write_bytes(data[: len(data) // 2])
    if state:
        (d / checkpoints.STATE_FILE).write_text(json.dumps({"step": step}))
    return d


@pytest.fixture
def world_of_two(monkeypatch):
    monkeypatch.setattr(checkpoints.dist, "get_world_size", lambda: 2)


def _newest(tmp_path):
    ckpt = checkpoints.newest_checkpoint(str(tmp_path), "sft")
    return None if ckpt is None else ckpt.path.rsplit("/", 1)[1]


def test_the_newest_whole_checkpoint_wins(tmp_path, world_of_two):
    assert _newest(tmp_path) is None  # no storage yet: start from step 0
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01", 4)
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02", 8)
    assert _newest(tmp_path) == "checkpoint_2026-01-01_00-00-02"


@pytest.mark.parametrize("broken", [
    {"torn": "mp_rank_00_model_states.pt"},  # the writer was killed mid-file
    {"torn": "zero_pp_rank_1_mp_rank_00_optim_states.pt"},
    {"ranks": 1},  # rank 1's shard never arrived
    {"state": False},  # rank 0's train state never arrived
])
def test_a_checkpoint_cut_short_is_passed_over(tmp_path, world_of_two, broken):
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01", 4)
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02", 8, **broken)
    assert _newest(tmp_path) == "checkpoint_2026-01-01_00-00-01"

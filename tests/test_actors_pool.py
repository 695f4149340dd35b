import pytest

from actors import EngineConfig
from actors.pool import fit_cpus


def test_pool_leaves_a_cpu_for_reading_and_writing():
    assert fit_cpus(EngineConfig(concurrency=2, num_cpus=1), 2) == 0.5
    assert fit_cpus(EngineConfig(concurrency=1, num_cpus=1), 2) == 1  # already leaves one
    assert fit_cpus(EngineConfig(concurrency=4, num_cpus=2), 16) == 2  # fits
    assert fit_cpus(EngineConfig(concurrency=2, num_cpus=1, num_gpus=1), 2) == 1  # GPU pools are not capped
    assert fit_cpus(EngineConfig(concurrency=3, num_cpus=1), 1) == 1  # nothing sensible to do on 1 CPU


def test_stages_command_lists_every_setting(capsys):
    from workflows.cli import main

    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert "critique_revision:" in out and "rounds: 1" in out and "makes: sl_cai, sft" in out


def test_blocks_give_every_actor_several_but_stay_within_checkpoint_rows_and_one_batch():
    from actors import EngineConfig
    from actors.pool import BLOCKS_PER_ACTOR, block_rows

    two = EngineConfig(concurrency=2, batch_size=8)
    assert block_rows(505, 256, two) == 64  # 8 blocks: a slow one no longer idles the other actor
    assert -(-505 // block_rows(505, 256, two)) >= 2 * BLOCKS_PER_ACTOR
    assert block_rows(100_000, 256, two) == 256  # checkpoint_rows caps a block
    assert block_rows(20, 256, two) == 8  # never below one batch
    assert block_rows(3, 2, EngineConfig(concurrency=1, batch_size=8)) == 2


class Echo:
    """A stage worker that copies its rows and notes, in ``seen_dir``, which ids it was given."""

    def __init__(self, seen_dir: str, engines_dir=None):
        self.seen_dir = seen_dir

    def __call__(self, table):
        import uuid

        import pyarrow as pa

        ids = table["id"].to_pylist()
        with open(f"{self.seen_dir}/{uuid.uuid4().hex}.txt", "w") as f:
            f.write("\n".join(ids))
        return pa.table({"id": ids, "_error": pa.nulls(len(ids), pa.string()), "_detail": pa.nulls(len(ids), pa.string())})


def test_a_resumed_stage_sends_only_the_blocks_left(tmp_path, ray_local):
    """Blocks whose raw file exists are neither sent nor read: the actors get only the rows of
    the missing blocks (a killed run's), and finalize then accounts for every input row once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.pool import stream_through_pool
    from workflows.core import stage
    from workflows.core.stage import StageContext

    ids = [f"r{i:04d}" for i in range(100)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids}), tmp_path / "in" / "part-0.parquet", row_group_size=10)
    ctx = StageContext(str(tmp_path / "run"), "s")
    engine = EngineConfig(concurrency=2, batch_size=4, num_cpus=0.5)
    seen = tmp_path / "seen"
    seen.mkdir()
    kwargs = dict(seen_dir=str(seen))

    def seen_ids():
        got = [i for f in seen.glob("*.txt") for i in f.read_text().split("\n") if i]
        for f in seen.glob("*.txt"):
            f.unlink()
        return got

    assert stream_through_pool(ctx, str(tmp_path / "in"), "id", Echo, engine, kwargs, checkpoint_rows=16,
                               check=False) == 100
    assert sorted(seen_ids()) == ids
    raw = sorted(stage.raw_files(ctx.dir))
    assert len(raw) == 8  # blocks of 13 rows: four per actor (block_rows)
    lost = [raw[1], raw[4]]  # as if the run had been killed while two actors worked on these
    lost_rows = sorted(i for f in lost for i in pq.read_table(f)["id"].to_pylist())
    for f in lost:
        (tmp_path / "run" / "s" / stage.RAW / f.rsplit("/", 1)[1]).unlink()
    assert stream_through_pool(ctx, str(tmp_path / "in"), "id", Echo, engine, kwargs, checkpoint_rows=16,
                               check=False) == len(lost_rows)
    assert sorted(seen_ids()) == lost_rows  # no other row was read into a worker
    assert stream_through_pool(ctx, str(tmp_path / "in"), "id", Echo, engine, kwargs, checkpoint_rows=16,
                               check=False) == 0
    assert seen_ids() == []
    fin = stage.finalize(ctx.dir, "s", "id", stage.select_route("out", pa.schema([("id", pa.string())])), ["out"],
                         inputs=stage.ids_in(str(tmp_path / "in"), "id"))
    assert fin.rec.ok and fin.outputs == 100


def test_a_run_directory_from_before_numbered_blocks_still_resumes(tmp_path, ray_local):
    """Raw files of the old layout (``<uuid>.parquet``, no block number): their rows are filtered out
    by id and not done again; ids an older version computed differently are one clear line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.pool import stream_through_pool
    from workflows.core import stage
    from workflows.core.errors import DataError
    from workflows.core.stage import StageContext

    ids = [f"r{i:04d}" for i in range(40)]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ids}), tmp_path / "in" / "part-0.parquet")
    raw = tmp_path / "run" / "s" / stage.RAW
    raw.mkdir(parents=True)
    old = pa.table({"id": ids[5:15], "_error": pa.nulls(10, pa.string()), "_detail": pa.nulls(10, pa.string())})
    pq.write_table(old, raw / "0f1e2d3c4b5a69788796a5b4c3d2e1f0.parquet")
    seen = tmp_path / "seen"
    seen.mkdir()
    ctx = StageContext(str(tmp_path / "run"), "s")
    engine = EngineConfig(concurrency=2, batch_size=4, num_cpus=0.5)
    args = (ctx, str(tmp_path / "in"), "id", Echo, engine, dict(seen_dir=str(seen)))
    stream_through_pool(*args, checkpoint_rows=8, check=False)
    got = sorted(i for f in seen.glob("*.txt") for i in f.read_text().split("\n") if i)
    assert got == ids[:5] + ids[15:]  # the ten rows the old version saved are not done again
    fin = stage.finalize(ctx.dir, "s", "id", stage.select_route("out", pa.schema([("id", pa.string())])), ["out"],
                         inputs=ids)
    assert fin.rec.ok and fin.outputs == 40

    other = StageContext(str(tmp_path / "run2"), "s")
    (tmp_path / "run2" / "s" / stage.RAW).mkdir(parents=True)
    pq.write_table(old.set_column(0, "id", pa.array([f"{i:016x}" for i in range(10)])),
                   tmp_path / "run2" / "s" / stage.RAW / "00aa.parquet")
    with pytest.raises(DataError, match=r"stage s was half done by an earlier version .* --restart-from s"):
        stream_through_pool(other, *args[1:], checkpoint_rows=8, check=False)

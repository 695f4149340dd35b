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

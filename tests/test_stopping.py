"""Stopping a run, every way it happens, and starting it again with the same command:

1. the driver killed (SIGKILL, as the OOM killer does) mid SL-CAI, and one raw file it left cut in half;
2. rerun, then Ctrl-C as a terminal sends it (SIGINT to every process of the foreground group:
   the driver, its Ray cluster, the train workers) mid SFT: exit 130 within seconds, no traceback;
3. rerun: finished stages skipped, SFT resumes from its checkpoint, exit 0, no traceback.

At the end SL-CAI has every row exactly once (outputs ∪ errors = inputs), the torn file was
counted in its summary, and SFT's loss curve has one record per step. A second Ray cluster runs
on the machine throughout (this test session's), where Ray Train's helper threads once died
looking for "the" cluster."""
from __future__ import annotations

import json
import os
import signal
import time

from benchmarks import chaos_harness as chaos

ROWS, STEPS = 16, 40  # steps of a fraction of a second: enough that Ctrl-C lands mid-stage on a busy machine


def _recipe(work, model) -> str:
    prompts, _ = chaos.prompts_file(work, ROWS)
    return chaos.sl_cai_recipe(work, model, prompts, tokens=12, extra=f"""  - stage: sft
    model: {model}
    num_workers: 1
    micro_batch_size: 2
    epochs: 5
    max_steps: {STEPS}
    checkpoint_every: 2
    eval_fraction: 0.0
""")


def test_killed_then_interrupted_run_finishes_with_nothing_lost(tiny_llama_dir, tmp_path, ray_local):
    run = chaos.CaiRun(tmp_path, _recipe(tmp_path, str(tiny_llama_dir)))
    sl_cai, sft = tmp_path / "run" / "critique_revision", tmp_path / "run" / "sft"
    try:
        chaos.kill_driver_mid_stage(run, sl_cai, min_files=2)
        chaos.tear(chaos.raw_files(sl_cai)[0])

        run.start()
        chaos.wait_until(lambda: "[sft] step 4/" in run.text(), 600, "the fourth SFT step", run)
        pressed = time.time()
        os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = run.wait(120)
        print(f"Ctrl-C: `cai run` exited {code} after {time.time() - pressed:.1f} s")
        second = run.text()
        assert code == 130, second[-3000:]
        assert "[critique_revision] resuming:" in second
        assert "interrupted — run the same command again to resume" in second
        assert "Traceback" not in second, second[-3000:]
        assert not (sft / "_SUCCESS").exists()
        try:  # Ray's processes go down with the driver: give them a few seconds to exit
            chaos.wait_until(lambda: not run.processes(), 20, "the run's processes to exit")
        except RuntimeError:
            pass
        left = [" ".join(p.cmdline()[:3]) for p in run.processes()]
        assert run.end() == 0, left  # nothing of the run outlived it

        run.start()
        assert run.wait(600) == 0, run.console()[-3000:]
        third = run.text()
        assert "[prompts] already finished" in third and "[critique_revision] already finished" in third
        assert "Traceback" not in third, third[-3000:]
    finally:
        run.close()
    row = chaos.audit("killed, interrupted", sl_cai, "sl_cai", "prompt_id",
                      chaos.ids(tmp_path / "run" / "prompts" / "prompts", "prompt_id"), 0, True)
    assert row["lost"] == 0 and row["duplicated"] == 0 and row["out"] + row["errors"] == row["in"] == ROWS, row
    assert "repaired: 1 unreadable file" in (sl_cai / "summary.md").read_text()
    redone = chaos.attempts(run.log, "g", set(chaos.prompts_file(tmp_path, ROWS)[1]))
    assert sum(redone.values()) - ROWS < ROWS  # what the killed run saved was not done again
    training = json.loads((sft / "_SUCCESS").read_text())["training"]
    resumed = training["resumed_from_steps"][0]
    assert training["resumes"] == 1 and resumed % 2 == 0 and 2 <= resumed < STEPS  # the last checkpoint (every 2)
    steps = [json.loads(x)["step"] for x in (sft / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the curve goes on from the checkpoint, one record per step

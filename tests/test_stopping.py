"""Stopping a run as a user does: Ctrl-C in a terminal sends SIGINT to every process of the
foreground group (the driver, its Ray cluster, the train workers). `cai run` must stop within
seconds with exit code 130 and leave a run that the same command finishes; and a successful run
prints no traceback — here with a second Ray cluster on the machine (this test session's), where
Ray Train's helper threads used to die looking for "the" cluster."""
from __future__ import annotations

import json
import os
import signal
import time

from benchmarks import chaos

STEPS = 8


def _recipe(work, model) -> str:
    prompts, _ = chaos.prompts_file(work, 8)
    return chaos.sl_cai_recipe(work, model, prompts, tokens=12, extra=f"""  - stage: sft
    model: {model}
    num_workers: 1
    micro_batch_size: 1
    max_steps: {STEPS}
    checkpoint_every: 2
    eval_fraction: 0.0
""")


def test_ctrl_c_stops_a_training_run_promptly_and_the_same_command_resumes_it(tiny_llama_dir, tmp_path, ray_local):
    run = chaos.CaiRun(tmp_path, _recipe(tmp_path, str(tiny_llama_dir)))
    try:
        run.start()
        chaos.wait_until(lambda: "[sft] step 4/" in run.console(), 600, "the fourth SFT step", run)
        pressed = time.time()
        os.killpg(run.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = run.wait(120)
        print(f"Ctrl-C: `cai run` exited {code} after {time.time() - pressed:.1f} s")
        first = run.console()
        assert code == 130, first[-3000:]
        assert "interrupted — run the same command again to resume" in first
        assert "Traceback" not in first, first[-3000:]
        assert not (tmp_path / "run" / "sft" / "_SUCCESS").exists()
        assert run.end() == 0  # nothing of the run outlived it

        run.start()
        assert run.wait(600) == 0, run.console()[-3000:]
        second = run.outputs[-1].read_text()
        assert "[prompts] already finished" in second and "[critique_revision] already finished" in second
        assert "Traceback" not in second, second[-3000:]
        training = json.loads((tmp_path / "run" / "sft" / "_SUCCESS").read_text())["training"]
        assert training["resumes"] == 1 and training["resumed_from_steps"][0] in (2, 4)
        steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "sft" / "metrics.jsonl")
                 .read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))  # the curve goes on from the checkpoint, one record per step
    finally:
        run.close()

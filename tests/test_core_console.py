"""The quiet console: progress lines by hand, the redirect of a whole process (and its children)
to the log, and the stage-side progress reader. No Ray."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from workflows.core import console


def test_durations_and_progress_lines_by_hand():
    assert [console.duration(s) for s in (0, 42.4, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]
    assert console.progress_line("sft", 12, 48, "steps", 15) == "[sft] 12/48 steps · 0.80 steps/s · 15 s · 45 s left"
    assert console.progress_line("sft", 0, 48, "steps", 3) == "[sft] 0/48 steps · 3 s"  # no rate yet
    assert console.progress_line("ppo", 2, 4, "iterations", 50) == "[ppo] 2/4 iterations · 25.0 s per iteration · 50 s · 50 s left"
    assert console.progress_line("x", 5, None, "rows", 10) == "[x] 5 rows · 0.50 rows/s · 10 s"  # no total, no time left
    assert console.progress_line("x", 4, 4, "rows", 8) == "[x] 4/4 rows · 0.50 rows/s · 8 s"


def test_progress_off_a_terminal_prints_every_30_s_and_once_at_the_end(capsys):
    now = [100.0]
    p = console.Progress("critique_revision", 100, "rows", clock=lambda: now[0])
    p.update(done=0)  # as a pool starts it: the rows already done (none)
    for t, add in [(10, 10), (20, 10), (31, 10), (45, 10), (70, 20)]:
        now[0] = 100.0 + t
        p.update(add=add)
    now[0] = 175.0
    p.update(add=0)  # 45 s on, nothing new: no line
    now[0] = 180.0
    p.update(add=40)
    p.close()
    p.close()  # a second close prints nothing
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["[critique_revision] 30/100 rows · 0.97 rows/s · 31 s · 1 min 12 s left",
                     "[critique_revision] 60/100 rows · 0.86 rows/s · 1 min 10 s · 47 s left",
                     "[critique_revision] 100/100 rows · 1.25 rows/s · 1 min 20 s"]
    resumed = console.Progress("sft", 100, "steps", clock=lambda: now[0])
    resumed.update(done=40)  # a resumed job: 40 steps were done before this run
    now[0] += 10
    resumed.update(done=50)
    assert resumed.line() == "[sft] 50/100 steps · 1.00 steps/s · 10 s · 50 s left"  # 10 new steps in 10 s


def test_watching_shows_what_the_job_reports_and_its_last_state(capsys):
    reports = iter([None, {"done": 1, "total": 3, "unit": "rounds"}, {"done": 2, "total": 3, "unit": "rounds"}])
    last = {"done": 3, "total": 3, "unit": "rounds"}
    seen = []

    def read():
        seen.append(1)
        got = next(reports, last)
        if got is None:
            raise OSError("torn file")  # a read that fails is asked again, not fatal
        return got

    import time
    with console.watching(read, "online_dpo", every_s=0.01):
        while len(seen) < 5:
            time.sleep(0.01)
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("[online_dpo] 3/3 rounds · ") and len(out) == 1


def test_to_log_takes_every_writer_of_the_process_and_its_children(tmp_path):
    """Python prints, C-level writes to fd 2, warnings and a child process land in the log; only
    ``say`` reaches the terminal (stdout, or stderr for errors), and the log has those lines too."""
    log = tmp_path / "logs" / "run.log"
    code = textwrap.dedent(f"""
        import os, subprocess, sys, warnings
        from workflows.core import console
        print("before")
        console.to_log({str(log)!r})
        print("a library's line")
        os.write(2, b"core_worker.cc E a C++ log line\\n")
        warnings.warn("a library warning")
        subprocess.run([sys.executable, "-c", "print('a worker process line')"], check=True)
        console.say("[sft] 2/2 steps")
        console.say("error: one line", err=True)
        assert console.quiet() and console.log_path() == {str(log)!r}
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["before", "[sft] 2/2 steps"]
    assert out.stderr.splitlines() == ["error: one line"]
    text = log.read_text()
    for line in ("a library's line", "core_worker.cc E", "UserWarning: a library warning", "a worker process line",
                 "[sft] 2/2 steps", "error: one line"):
        assert line in text, line
    assert "before" not in text


@pytest.mark.parametrize("remote", [False, True])
def test_the_log_file_lives_in_the_run_directory_or_locally_for_object_storage(remote, tmp_path):
    from workflows.cli import log_file

    path = log_file("s3://bucket/runs/demo" if remote else str(tmp_path / "demo"), "demo")
    assert path.rsplit("/", 1)[1].startswith("run-") and path.endswith(".log")
    assert (not path.startswith("s3://") and "cai-logs/demo" in path) if remote else \
        path.startswith(str(tmp_path / "demo" / "logs"))


def test_engines_alike_share_one_summary_line():
    from workflows.core.summary import engine_lines

    cpu = {"device": "cpu", "dtype": "bfloat16", "dtype_reason": "auto: native bfloat16", "actors": 1}
    lines = engine_lines([{**cpu, "engine": "transformers:base", "load_s": 6.0},
                          {**cpu, "engine": "transformers:sft", "load_s": 8.5},
                          {**cpu, "engine": "vllm:judge", "actors": 2, "dtype": "float32", "backend_reason": "named"}])
    assert lines == ["engines transformers:base, transformers:sft on cpu, bfloat16 — auto: native bfloat16 "
                     "(2 actors; loaded in 6.0–8.5 s)",
                     "engine vllm:judge on cpu, float32 — auto: native bfloat16 (2 actors; backend: named)"]


def test_deepspeeds_cpu_notice_is_dropped_by_its_exact_message():
    """``quiet_libraries`` (every Ray worker and the driver): DeepSpeed's WARNING that it chose the
    CPU accelerator is gone; its other log lines are not."""
    code = ("import logging; from cluster.connect import quiet_libraries; quiet_libraries(); import deepspeed; "
            "from deepspeed.utils import logger; logger.warning('another DeepSpeed warning')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Setting accelerator to CPU" not in out.stderr + out.stdout
    assert "another DeepSpeed warning" in out.stderr + out.stdout

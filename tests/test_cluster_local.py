"""A local cluster's housekeeping (``cluster.local``): the import check before Ray starts, and the
processes a killed driver's cluster left, ended by the next run on the same run directory."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from benchmarks import chaos_harness as chaos
from cluster import local, upload
from cluster.connect import REPO_ROOT


def test_import_problem_names_the_package_and_the_fix(tmp_path):
    mine = {n: str(tmp_path / "a" / n) for n in local.PACKAGES}
    for n in local.PACKAGES:
        (tmp_path / "a" / n).mkdir(parents=True)
        (tmp_path / "a" / n / "__init__.py").write_text("")
    same = {n: str(tmp_path / "a" / n / "__init__.py") for n in local.PACKAGES}
    assert local.import_problem(mine, same) is None
    gone = dict(same, actors=str(tmp_path / "deleted" / "actors" / "__init__.py"))
    msg = local.import_problem(mine, gone)
    assert "'actors'" in msg and "is gone" in msg and f"pip install -e .` in {tmp_path / 'a'}" in msg
    assert "\n" not in msg
    assert "'training'" in local.import_problem(mine, dict(same, training=None))  # not found at all
    other = tmp_path / "b" / "workflows"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    msg = local.import_problem(mine, dict(same, workflows=str(other / "__init__.py")))
    assert f"from {other}, not from {mine['workflows']}" in msg


def test_a_driver_whose_workers_would_import_another_checkout_stops_before_ray(tmp_path):
    """The driver runs a copy of the project; Ray's workers would import the installed checkout: one
    line naming both and the fix, exit 2, and no Ray process started."""
    copy = upload.stage(upload.select(REPO_ROOT), tmp_path / "copy")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nrun_dir: {tmp_path / 'run'}\nstages:\n  - stage: prompts\n    path: builtin:helpful\n")
    code = f"import sys; sys.path.insert(0, {str(copy)!r}); from workflows.cli import main; sys.exit(main(['run', {str(recipe)!r}]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ""})
    err = out.stderr.strip()
    assert out.returncode == 2, out.stdout[-2000:] + err[-2000:]
    assert err.startswith("error: Ray's workers would import 'workflows' from") and "\n" not in err
    assert str(copy) in err and "pip install -e ." in err and not (tmp_path / "run" / local.RECORD).exists()


def test_a_live_run_on_the_same_directory_is_refused(tmp_path):
    me = psutil.Process()
    (tmp_path / local.RECORD).write_text(json.dumps({"host": socket.gethostname(), "driver_pid": me.pid,
                                                     "driver_created": me.create_time(), "temp_dir": "/nonexistent"}))
    with pytest.raises(local.LocalClusterError, match=f"another `cai run` \\(pid {me.pid}\\) is running"):
        local.end_leftovers(str(tmp_path))


def test_a_killed_drivers_leftovers_are_ended_by_the_next_run(tmp_path, tiny_llama_dir):
    prompts, _ = chaos.prompts_file(tmp_path, 12)
    run = chaos.CaiRun(tmp_path, chaos.sl_cai_recipe(tmp_path, str(tiny_llama_dir), prompts, tokens=16))
    stage = tmp_path / "run" / "critique_revision"
    record = tmp_path / "run" / local.RECORD
    try:
        run.start()
        chaos.wait_until(lambda: record.is_file() and chaos.raw_files(stage), 300, "a saved block", run)
        temp = json.loads(record.read_text())["temp_dir"]
        assert temp.startswith(run.ray_tmp) and local.cluster_processes(temp)  # the live cluster is found
        run.proc.send_signal(signal.SIGKILL)  # the driver alone, as the out-of-memory killer ends it
        run.proc.wait(30)
        left = local.cluster_processes(temp)
        run.start()
        assert run.wait(600) == 0, run.console()[-3000:]
        second = run.text()
        # some of Ray's processes exit once their driver is gone; its agents stay until someone ends them
        ended = re.search(r"ended (\d+) process\(es\) of this run's earlier local Ray cluster", second)
        assert left and ended and 1 <= int(ended.group(1)) <= len(left), second[-3000:]
        assert "Traceback" not in second
        assert local.cluster_processes(temp) == [] and os.path.isdir(temp)  # ended; its logs kept
        assert not record.exists()  # a clean exit forgets its cluster
    finally:
        run.close()

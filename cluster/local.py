"""A local Ray cluster's housekeeping, before and after ``ray.init`` starts one for ``cai``:

- **imports**: Ray's workers import our packages the way a fresh interpreter does, not the way the
  driver did (an editable install that points at a deleted or another checkout made Ray restart
  workers forever); ``worker_import_problem`` finds that before Ray starts;
- **leftovers**: each local cluster gets a temp dir of its own, recorded in the run directory
  (``_local_ray.json``). When a driver was killed (SIGKILL, out of memory) some of its Ray processes
  outlive it; the next ``cai run`` on that run directory ends them (the temp dir and its logs stay) — only processes that name that
  temp dir on their command line or hold a file open in it, and their children: never another Ray.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from workflows.core import storage
from workflows.core.errors import CaiError

RECORD = "_local_ray.json"
PACKAGES = ("workflows", "actors", "training", "cluster")


class LocalClusterError(CaiError):
    """The local cluster cannot start as things are (broken install, a live run on the same directory)."""


def package_dirs() -> dict[str, str]:
    """Where this process imports each of our packages from."""
    return {name: str(Path(importlib.util.find_spec(name).origin).parent) for name in PACKAGES}


_PROBE = ("import importlib.util, json, sys\n"
          "out = {}\n"
          "for n in sys.argv[1:]:\n"
          "    try:\n"
          "        s = importlib.util.find_spec(n)\n"
          "        out[n] = s.origin if s and s.origin else None\n"
          "    except Exception as e:\n"
          "        out[n] = None\n"
          "print(json.dumps(out))\n")


def fresh_interpreter_origins() -> dict[str, str | None]:
    """Where a fresh interpreter — what a Ray worker is: this environment, another working directory —
    finds each of our packages (None: not at all)."""
    with tempfile.TemporaryDirectory(prefix="cai-probe-") as neutral:
        out = subprocess.run([sys.executable, "-c", _PROBE, *PACKAGES], cwd=neutral, capture_output=True,
                             text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def import_problem(mine: dict[str, str], theirs: dict[str, str | None]) -> str | None:
    """The one-line problem and fix when ``theirs`` (origins a worker would import) do not match
    ``mine`` (the package folders this process imported), else None."""
    checkout = str(Path(mine["workflows"]).parent)
    for name, origin in theirs.items():
        if origin is None or not Path(origin).exists():
            return (f"Ray's workers cannot import the package {name!r} (this environment's cai-ray install "
                    f"points at a checkout that is gone) — run `pip install -e .` in {checkout}")
        if str(Path(origin).parent) != mine[name]:
            return (f"Ray's workers would import {name!r} from {Path(origin).parent}, not from {mine[name]} "
                    f"as this command does — run `pip install -e .` in {checkout} (or run from the checkout "
                    "that is installed)")
    return None


def worker_import_problem() -> str | None:
    """None when Ray's workers will import our packages from where this process did; else the problem."""
    try:
        theirs = fresh_interpreter_origins()
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as e:
        return f"could not check how Ray's workers import cai-ray ({type(e).__name__}: {e}) — is {sys.executable} intact?"
    return import_problem(package_dirs(), theirs)


def new_temp_dir() -> str:
    """A temp dir for one local cluster: short (Ray's socket paths have a length limit), its own."""
    return tempfile.mkdtemp(prefix="cai-ray-", dir=os.environ.get("RAY_TMPDIR") or "/tmp")


def _alive(pid: int, created: float):
    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 1.0 else None
    except psutil.Error:
        return None


def cluster_processes(temp_dir: str) -> list:
    """Processes of the local cluster living in ``temp_dir``: those naming it on their command line or
    holding a file open under it, and their descendants. Never this process."""
    found = {}
    prefix = temp_dir.rstrip("/") + "/"
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            hit = temp_dir in " ".join(p.info["cmdline"] or []) or \
                any(f.path.startswith(prefix) for f in p.open_files())
            if hit:
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def end_leftovers(run_dir: str, log=print) -> None:
    """Before a new local cluster for ``run_dir``: if the run's previous driver on this machine is
    gone, end the Ray processes its cluster left (by pid, saying so); if it is still running, stop."""
    uri = storage.join(run_dir, RECORD)
    if not storage.exists(uri):
        return
    try:
        rec = json.loads(storage.read_text(uri))
        host, pid, created, temp = rec["host"], int(rec["driver_pid"]), float(rec["driver_created"]), rec["temp_dir"]
    except (ValueError, KeyError, TypeError):
        storage.delete(uri)  # a torn record of a cluster that is gone: nothing to end by it
        return
    if host != socket.gethostname():
        return
    if _alive(pid, created) is not None:
        raise LocalClusterError(f"another `cai run` (pid {pid}) is running on {run_dir} — wait for it, stop it "
                                "(Ctrl-C in its terminal), or use another run_dir")
    procs = cluster_processes(temp)
    if procs:
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        log(f"ended {len(procs)} process(es) of this run's earlier local Ray cluster, left by a driver that "
            f"was killed (pid {pid}; its logs stay in {temp})")
    storage.delete(uri)


def record(run_dir: str, temp_dir: str) -> None:
    """Note in the run directory which local cluster this driver runs, for ``end_leftovers``."""
    me = psutil.Process()
    storage.write_json(storage.join(run_dir, RECORD), {"host": socket.gethostname(), "driver_pid": me.pid,
                                                       "driver_created": me.create_time(), "temp_dir": temp_dir})


def forget(run_dir: str | None) -> None:
    """At exit: Ray shut down and the run's record gone. The cluster's temp dir stays, with its logs,
    as Ray's own session directories do."""
    import ray

    try:
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 — best effort at exit
        pass
    if run_dir is None:
        return
    try:
        uri = storage.join(run_dir, RECORD)
        if storage.exists(uri) and json.loads(storage.read_text(uri)).get("driver_pid") == os.getpid():
            storage.delete(uri)
    except Exception:  # noqa: BLE001 — best effort at exit (storage gone, interpreter shutting down)
        pass

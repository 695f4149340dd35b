"""``cai submit``: run a recipe on a Ray cluster through the Ray Jobs API.

The project (``cluster.upload``) travels as the job's ``working_dir``; the entrypoint runs the
``cai`` command's module on the recipe, so the cluster needs Ray and our dependencies but not this
package. The submission id is derived from the recipe, the uploaded files and the arguments: the same
submission twice is recognised, and a rerun after a failure continues the same run directory.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from cluster import upload
from cluster.connect import REPO_ROOT, worker_env
from workflows.core.errors import CaiError
from workflows.driver import load_recipe
from workflows.driver import plan as plan_stages

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_ENV = "RAY_AUTH_TOKEN"  # Ray's own variable for clusters with token authentication
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOCAL_PATH_VARS = ("HF_HOME", "CAI_RAY_CACHE")


class SubmitError(CaiError):
    """The cluster cannot be reached, refused the job, or the job is unknown."""


def entrypoint(recipe: str, run_dir: str | None = None, restart_from: str | None = None) -> str:
    """The job's command: ``cai run`` as a module, so it works from the uploaded working_dir alone.
    KubeRay's RayJob manifest uses the same string (tested)."""
    cmd = ["python", "-m", "workflows.cli", "run", recipe]
    if run_dir:
        cmd += ["--run-dir", run_dir]
    if restart_from:
        cmd += ["--restart-from", restart_from]
    return shlex.join(cmd)


def address(given: str | None) -> str:
    """``--address``, else ``RAY_ADDRESS`` when it is a dashboard URL, else the local head's dashboard."""
    if given:
        return given
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def project_root(given: str | None = None) -> Path:
    """What travels with the job: ``--project``, else this source checkout (``pip install -e .``), else
    the current directory (then the cluster must have cai-ray installed)."""
    if given:
        root = Path(given).resolve()
        if not root.is_dir():
            raise SubmitError(f"--project {given}: no such directory")
        return root
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "workflows").is_dir():
        return REPO_ROOT
    return Path.cwd()


def git_revision(root: Path) -> str:
    """The commit the project is at, ``+dirty`` with uncommitted changes; empty outside git."""
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=20).stdout.strip()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return ""
    return rev + ("+dirty" if dirty else "")


def project_version() -> str:
    try:
        return version("cai-ray")
    except Exception:  # noqa: BLE001 — running from a source tree that was never installed
        return "source"


def submission_id(recipe_name: str, digest: str, cmd: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", recipe_name.lower()).strip("-")[:40] or "recipe"
    return f"cai-{slug}-{hashlib.sha256((digest + cmd).encode()).hexdigest()[:10]}"


@dataclass
class Submission:
    """Everything sent to the cluster, built before anything is sent (``plan``)."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    selection: upload.Selection
    notes: list[str] = field(default_factory=list)


def plan(recipe_path: str, run_dir: str | None = None, restart_from: str | None = None,
         root: Path | None = None) -> Submission:
    """Validate the recipe, select and measure the upload, and fix the id, entrypoint and metadata."""
    root = root or project_root()
    path = Path(recipe_path).resolve()
    recipe = load_recipe(path)
    plan_stages(recipe, str(recipe_path))  # a recipe that cannot run here will not run there either
    try:
        rel = path.relative_to(root.resolve()).as_posix()
    except ValueError:
        raise SubmitError(f"{recipe_path}: the recipe is outside the project {root} and would not be uploaded — "
                          "copy it into the project (e.g. recipes/) and submit that path") from None
    sel = upload.select(root)
    if rel not in sel.files:
        raise SubmitError(f"{recipe_path}: the recipe is git-ignored or excluded from the upload — "
                          "move it out of ignored folders (runs/, build/, ...) or un-ignore it")
    upload.check_size(sel)
    cmd = entrypoint(rel, run_dir, restart_from)
    target = run_dir or recipe.run_dir
    notes = []
    if not target.startswith(("s3://", "/", "gs://")):
        notes.append(f"run directory {target!r} is relative: it will live in the job's working directory on the "
                     "head node and go away with it — pass --run-dir s3://bucket/prefix (or a shared absolute path)")
    metadata = {"recipe": recipe.name, "recipe_path": rel, "cai_version": project_version(),
                "git_revision": git_revision(root), "run_dir": target}
    # settings, not this machine's paths (HF_HOME, CAI_RAY_CACHE): the cluster's nodes keep their own
    env = {"env_vars": {k: v for k, v in worker_env().items() if k not in LOCAL_PATH_VARS}}
    return Submission(submission_id(recipe.name, sel.digest(), cmd), cmd, env, metadata, sel, notes)


def client(addr: str | None = None):
    """A ``JobSubmissionClient``; the token of a cluster with token auth comes from ``RAY_AUTH_TOKEN``."""
    from ray.job_submission import JobSubmissionClient

    url = address(addr)
    headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"} if os.environ.get(TOKEN_ENV) else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # noqa: BLE001 — connection refused, wrong port, auth: one line
        raise SubmitError(_explain(url, e)) from None


def _explain(url: str, e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "401" in text or "403" in text or "authentication" in text.lower() or "Unauthorized" in text:
        return (f"the Ray cluster at {url} refused the request ({text}) — it uses token authentication: "
                f"set {TOKEN_ENV} to its token (`ray get-auth-token` on the head node)")
    return (f"cannot reach the Ray Jobs API at {url} ({text}) — is the cluster up (`ray start --head "
            "--dashboard-host 127.0.0.1`)? Pass --address http://HEAD:8265 or set RAY_ADDRESS")


def call(url: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # the SDK raises RuntimeError for HTTP errors, with the server's text
        text = str(e)
        if "does not exist" in text or "not found" in text.lower():
            raise SubmitError(f"no job {args[0] if args else ''} on {url} — `cai jobs list` shows the jobs") from None
        raise SubmitError(_explain(url, e)) from None
    except Exception as e:  # noqa: BLE001 — connection errors from requests/aiohttp
        raise SubmitError(_explain(url, e)) from None


def _free_id(c, url: str, base: str, force: bool) -> tuple[str, str | None]:
    """``(id to submit, None)``, or ``(existing id, its status)`` when this exact submission is live or done."""
    known = {j.submission_id: str(j.status.value if hasattr(j.status, "value") else j.status)
             for j in call(url, c.list_jobs) if j.submission_id}
    status = known.get(base)
    if status is None:
        return base, None
    if status in ("PENDING", "RUNNING") or (status == "SUCCEEDED" and not force):
        return base, status
    k = 2
    while f"{base}-r{k}" in known:
        if known[f"{base}-r{k}"] in ("PENDING", "RUNNING"):
            return f"{base}-r{k}", known[f"{base}-r{k}"]
        k += 1
    return f"{base}-r{k}", None


def submit(sub: Submission, addr: str | None = None, force: bool = False, log=print) -> tuple[str, bool]:
    """Upload and submit; ``(submission id, newly submitted?)``."""
    url = address(addr)
    c = client(url)
    job_id, status = _free_id(c, url, sub.submission_id, force)
    if status is not None:
        log(f"already submitted as {job_id} ({status}) — the same recipe, files and arguments"
            + ("; --force submits it again" if status == "SUCCEEDED" else ""))
        return job_id, False
    for note in sub.notes:
        log(f"note: {note}")
    if sub.selection.left_out:
        log(f"warning: {sub.selection.left_out_line()}")
    with tempfile.TemporaryDirectory(prefix="cai-upload-") as tmp:
        upload.stage(sub.selection, tmp)
        env = dict(sub.runtime_env, working_dir=tmp)
        log(f"uploading {len(sub.selection.files)} files ({sub.selection.total / 2**20:.1f} MiB) to {url}")
        call(url, c.submit_job, entrypoint=sub.entrypoint, runtime_env=env, metadata=sub.metadata,
              submission_id=job_id)
    log(f"submitted {job_id}: {sub.entrypoint}")
    return job_id, True


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(sub: Submission, addr: str | None = None) -> str:
    """What ``submit`` would send, for ``--dry-run``: every file with its size, what is left out and
    why, and the job (id, entrypoint, metadata, environment variables, address). Contacts nothing."""
    sel = sub.selection
    width = max((len(rel) for rel in sel.files), default=0)
    lines = [f"would upload {len(sel.files)} files, {_size(sel.total)} in all, from {sel.root}:"]
    lines += [f"  {rel:<{width}}  {_size(size):>10}" for rel, size in zip(sel.files, sel.sizes)]
    if sel.left_out:
        lines.append(f"left out ({len(sel.left_out)}), never sent:")
        lines += [f"  {rel}  — {why}" for rel, why in sel.left_out]
    else:
        lines.append("left out: nothing that looks like a secret or leaves the project")
    env = sub.runtime_env.get("env_vars", {})
    token = ("RAY_AUTH_TOKEN is set: sent as a bearer header, never uploaded" if os.environ.get(TOKEN_ENV)
             else "RAY_AUTH_TOKEN is not set: no token sent (a cluster with token auth will refuse the job)")
    lines += ["job (not submitted: --dry-run):",
              f"  address        {address(addr)}",
              f"  submission id  {sub.submission_id}",
              f"  entrypoint     {sub.entrypoint}",
              f"  metadata       {json.dumps(sub.metadata, sort_keys=True)}",
              f"  env_vars       {', '.join(f'{k}={v}' for k, v in sorted(env.items())) or '(none)'}",
              f"  auth           {token}"]
    lines += [f"note: {n}" for n in sub.notes]
    return "\n".join(lines)


def status(job_id: str, addr: str | None = None) -> str:
    url = address(addr)
    s = call(url, client(url).get_job_status, job_id)
    return str(s.value if hasattr(s, "value") else s)


def follow(job_id: str, addr: str | None = None, out=sys.stdout) -> str:
    """Stream the job's logs until it ends; returns its final status. Ctrl-C stops following, not the job."""
    url = address(addr)
    c = client(url)

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        call(url, asyncio.run, tail())
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} goes on on the cluster — `cai jobs stop {job_id}` stops it",
              file=sys.stderr)
        raise
    for _ in range(60):  # the log stream closes a moment before the status turns terminal
        st = status(job_id, url)
        if st in TERMINAL:
            return st
        time.sleep(0.5)
    return st


def exit_code(final_status: str) -> int:
    return 0 if final_status == "SUCCEEDED" else 1

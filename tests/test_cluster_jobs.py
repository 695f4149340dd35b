"""`cai submit` and plain `ray job submit` against a real `ray start --head` cluster (two nodes on this
machine), with the run directory on disk and on a local S3-compatible server."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from cluster import submit, upload
from cluster.connect import REPO_ROOT
from ray_cluster import LocalCluster
from workflows.cli import main
from workflows.core import stage, storage

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    """Two nodes with token authentication on, as the README's local cluster and the manifests run it;
    this process holds the token as a user would (``RAY_AUTH_TOKEN``), so `cai submit`/`cai jobs` send it."""
    token = secrets.token_hex(32)
    # cluster nodes hold their own storage credentials (an instance role on a real cluster); moto takes any
    c = LocalCluster(num_cpus=2, env={"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
                     auth_token=token)
    saved = os.environ.get(submit.TOKEN_ENV)
    os.environ[submit.TOKEN_ENV] = token
    try:
        c.add_node(num_cpus=2, resources='{"second_node": 1}')
        yield c
    finally:
        c.stop()
        if saved is None:
            os.environ.pop(submit.TOKEN_ENV, None)
        else:
            os.environ[submit.TOKEN_ENV] = saved


def test_without_the_token_the_cluster_refuses_and_says_how_to_fix_it(cluster, monkeypatch, capsys):
    monkeypatch.delenv(submit.TOKEN_ENV)
    assert main(["jobs", "list", "--address", cluster.dashboard]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "token authentication" in err and "RAY_AUTH_TOKEN" in err
    monkeypatch.setenv(submit.TOKEN_ENV, "not-the-token")
    assert main(["jobs", "list", "--address", cluster.dashboard]) == 2
    assert "Invalid authentication token" in capsys.readouterr().err


def _recipe(model: str, n: int, tokens: int, concurrency: int = 1, num_cpus: float = 1.0) -> str:
    return (f"name: tiny\nrun_dir: runs/tiny\nstages:\n"
            f"  - stage: prompts\n    path: data/prompts.jsonl\n"
            f"  - stage: critique_revision\n    sampling: {{max_new_tokens: {tokens}}}\n"
            f"    engine: {{model: {model}, batch_size: 2, max_model_len: 768, concurrency: {concurrency}, "
            f"num_cpus: {num_cpus}}}\n")


@pytest.fixture
def project(tmp_path, tiny_llama_dir):
    """A copy of this project (what `cai submit` would upload) plus a tiny recipe, its prompts and an
    ignored file."""
    root = upload.stage(upload.select(REPO_ROOT), tmp_path / "proj")
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Tell me fact {i}."}) + "\n"
                                                         for i in range(6)))
    (root / "tiny.yaml").write_text(_recipe(str(tiny_llama_dir), 6, 4))
    with open(root / ".gitignore", "a") as f:
        f.write("secret.txt\n")
    (root / "secret.txt").write_text("must not travel")
    return root


def _wait(cluster, job_id: str, timeout: float = 300) -> str:
    for _ in range(int(timeout)):
        st = submit.status(job_id, cluster.dashboard)
        if st in submit.TERMINAL:
            return st
        time.sleep(1)
    raise AssertionError(f"{job_id} still {st} after {timeout} s")


def test_submit_runs_the_recipe_and_reports_success(cluster, project, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["submit", str(project / "tiny.yaml"), "--project", str(project), "--address", cluster.dashboard,
               "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "SUCCEEDED" in out.splitlines()[-1]
    for name in ("prompts", "critique_revision"):
        assert stage.read_success(str(run_dir / name))["outputs"] == 6
    job_id = out.split("submitted ")[1].split(":")[0]
    info = submit.client(cluster.dashboard).get_job_info(job_id)
    assert info.metadata["recipe"] == "tiny" and info.metadata["cai_version"]
    assert main(["jobs", "logs", job_id, "--address", cluster.dashboard]) == 0
    assert "critique_revision" in capsys.readouterr().out  # the job's own output
    assert main(["jobs", "status", "cai-no-such-job", "--address", cluster.dashboard]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no job cai-no-such-job") and "\n" not in err
    # the same submission again is recognised, not run twice
    rc = main(["submit", str(project / "tiny.yaml"), "--project", str(project), "--address", cluster.dashboard,
               "--run-dir", str(run_dir), "--no-wait"])
    assert rc == 0 and "already submitted as " + job_id in capsys.readouterr().out


def test_stop_a_running_job(cluster, project, tmp_path, tiny_llama_dir, capsys):
    (project / "long.yaml").write_text(_recipe(str(tiny_llama_dir), 6, 4).replace("name: tiny", "name: long")
                                       .replace("max_new_tokens: 4", "max_new_tokens: 700"))
    (project / "data" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Write a story {i}."}) + "\n"
                                                            for i in range(200)))
    sub = submit.plan(str(project / "long.yaml"), str(tmp_path / "run"), root=project)
    job_id, new = submit.submit(sub, cluster.dashboard)
    assert new
    for _ in range(120):
        if submit.status(job_id, cluster.dashboard) == "RUNNING":
            break
        time.sleep(1)
    assert main(["jobs", "stop", job_id, "--address", cluster.dashboard]) == 0
    assert _wait(cluster, job_id) == "STOPPED"
    assert main(["jobs", "status", job_id, "--address", cluster.dashboard]) == 1
    assert "STOPPED" in capsys.readouterr().out
    assert not (tmp_path / "run" / "critique_revision" / "_SUCCESS").exists()


def test_plain_ray_job_submit_on_two_nodes_one_lost_mid_stage(cluster, project, tiny_llama_dir, s3_env):
    """The plain Ray way (README: `ray job submit --working-dir . -- <entrypoint>`; ignored files stay
    home) on two nodes, an engine actor on each, the run directory on S3. Once the first block is
    saved, the second node goes away at once (every process of it SIGKILLed): the stage finishes on
    the head with every row exactly once. Last in this module: it takes a node away from its cluster."""
    (project / "wide.yaml").write_text(_recipe(str(tiny_llama_dir), 6, 32, concurrency=2, num_cpus=1.0)
                                       .replace("name: tiny", "name: wide")
                                       .replace("  - stage: critique_revision\n",
                                                "  - stage: critique_revision\n    checkpoint_rows: 2\n"))
    (project / "data" / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Name a color {i}."}) + "\n"
                                                            for i in range(N_WIDE)))
    run_dir = "s3://cai/runs/wide"
    sub = submit.plan(str(project / "wide.yaml"), run_dir, root=project)
    assert sub.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == s3_env  # `cai submit` tells the workers of S3
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # the plain way: the user does
    # Ray Data starts the pool's blocks only once both engines are up: on a busy machine the second
    # node's engine could still be loading when the first had done every block, and no node loss
    # would then happen mid-stage.
    env_vars = {**aws, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600"}
    job_id = "cai-wide-plain"
    check = "test ! -e secret.txt && test -e wide.yaml && " + submit.entrypoint("wide.yaml", run_dir)
    out = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
                          cluster.dashboard, "--working-dir", ".", "--submission-id", job_id, "--no-wait",
                          "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "bash", "-c", check],
                         cwd=project, env=cluster.env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    client = submit.client(cluster.dashboard)
    stage_uri = storage.join(run_dir, "critique_revision")

    def pool() -> list[dict]:
        ray_job = client.get_job_info(job_id).job_id
        if not ray_job:
            return []
        # the state API over HTTP with the cluster's token (this process's Ray client runs with auth off)
        query = urllib.parse.urlencode({"filter_keys": "job_id", "filter_predicates": "=", "filter_values": ray_job,
                                        "detail": "true", "limit": 1000})
        req = urllib.request.Request(f"{cluster.dashboard}/api/v0/actors?{query}",
                                     headers={"Authorization": f"Bearer {os.environ[submit.TOKEN_ENV]}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            actors = json.loads(r.read())["data"]["result"]["result"]
        return [a for a in actors if "CritiqueRevise" in (a.get("repr_name") or "") + (a.get("class_name") or "")
                and a.get("state") == "ALIVE"]

    deadline = time.time() + 300
    while not (len(pool()) == 2 and storage.list_files(storage.join(stage_uri, "_raw"), ".parquet")):
        assert time.time() < deadline and submit.status(job_id, cluster.dashboard) not in submit.TERMINAL, \
            client.get_job_logs(job_id)[-3000:]
        time.sleep(0.25)
    actors = pool()
    assert len({a["node_id"] for a in actors}) == 2, actors  # one engine per node (SPREAD)
    saved = len(storage.list_files(storage.join(stage_uri, "_raw"), ".parquet"))
    assert cluster.remove_node(1) > 0
    assert not storage.exists(storage.join(stage_uri, "_SUCCESS")) and saved < N_WIDE // 2  # mid-stage
    st = _wait(cluster, job_id)
    assert st == "SUCCEEDED", client.get_job_logs(job_id)[-3000:]
    done = stage.read_success(stage_uri)
    assert done["outputs"] == N_WIDE and done.get("errors", 0) == 0, done
    ids = stage.ids_of(storage.join(stage_uri, "sl_cai"), "prompt_id")
    assert len(ids) == len(set(ids)) == N_WIDE  # every row once


N_WIDE = 32

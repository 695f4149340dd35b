"""What `cai submit` uploads and what it sends, without a cluster: selection, size preflight, staging,
ids, the entrypoint, and how a job's driver joins the job's runtime env."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import connect, submit, upload


def _project(tmp_path, git: bool):
    root = tmp_path / "proj"
    (root / "workflows").mkdir(parents=True)
    (root / "workflows" / "a.py").write_text("x = 1\n")
    (root / "recipe.yaml").write_text("name: t\nrun_dir: runs/t\nstages:\n  - stage: prompts\n    path: builtin:helpful\n")
    (root / ".gitignore").write_text("secret.txt\n/data/\n")
    (root / "secret.txt").write_text("do not upload")
    (root / "data").mkdir()
    (root / "data" / "big.jsonl").write_text("{}\n")
    (root / "runs" / "t").mkdir(parents=True)
    (root / "runs" / "t" / "out.parquet").write_bytes(b"x")
    (root / "model.safetensors").write_bytes(b"w" * 10)
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"c")
    (root / "pkg" / "m.py").write_text("y = 2\n")
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    return root


@pytest.mark.parametrize("git", [True, False], ids=["git", "no-git"])
def test_selection_honours_gitignore_and_leaves_out_runs_caches_and_weights(tmp_path, git):
    sel = upload.select(_project(tmp_path, git))
    assert sel.files == (".gitignore", "pkg/m.py", "recipe.yaml", "workflows/a.py")
    staged = upload.stage(sel, tmp_path / "staged")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == list(sel.files)
    assert not (staged / "secret.txt").exists()


def test_size_preflight_names_the_largest_files(tmp_path):
    root = _project(tmp_path, git=False)
    (root / "prompts_dump.jsonl").write_bytes(b"p" * 3000)
    (root / "notes.txt").write_bytes(b"n" * 2000)
    sel = upload.select(root)
    with pytest.raises(upload.UploadError) as e:
        upload.check_size(sel, limit=4000)
    msg = str(e.value)
    assert "over the Ray Jobs limit" in msg and msg.index("prompts_dump.jsonl") < msg.index("notes.txt")
    assert "\n" not in msg and ".gitignore" in msg
    upload.check_size(sel, limit=10_000)  # under the limit: no error


def test_submission_is_deterministic_and_follows_content(tmp_path):
    root = _project(tmp_path, git=False)
    a = submit.plan(str(root / "recipe.yaml"), "/shared/runs/t", root=root)
    b = submit.plan(str(root / "recipe.yaml"), "/shared/runs/t", root=root)
    assert a.submission_id == b.submission_id and a.submission_id.startswith("cai-t-")
    assert a.entrypoint == "python -m workflows.cli run recipe.yaml --run-dir /shared/runs/t"
    assert a.metadata["recipe"] == "t" and a.metadata["run_dir"] == "/shared/runs/t" and not a.notes
    assert "CAI_RAY_CACHE" not in a.runtime_env["env_vars"]  # a path on this machine, not the cluster's
    (root / "pkg" / "m.py").write_text("y = 3\n")
    assert submit.plan(str(root / "recipe.yaml"), "/shared/runs/t", root=root).submission_id != a.submission_id
    rel = submit.plan(str(root / "recipe.yaml"), root=root)  # the recipe's relative run_dir: a warning
    assert "relative" in rel.notes[0] and rel.submission_id != a.submission_id


def test_recipe_outside_the_project_or_ignored_is_refused(tmp_path):
    root = _project(tmp_path, git=False)
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((root / "recipe.yaml").read_text())
    with pytest.raises(submit.SubmitError, match="outside the project"):
        submit.plan(str(outside), root=root)
    (root / "data" / "r.yaml").write_text((root / "recipe.yaml").read_text())
    with pytest.raises(submit.SubmitError, match="git-ignored or excluded"):
        submit.plan(str(root / "data" / "r.yaml"), root=root)


def test_a_job_driver_adds_only_what_the_job_lacks(monkeypatch):
    ours = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/h"}, "worker_process_setup_hook": "x.y",
            "working_dir": "/repo"}
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    job = {"working_dir": "gcs://pkg.zip", "env_vars": {"TOKENIZERS_PARALLELISM": "true"}}
    assert connect.driver_runtime_env(ours, job) == {"worker_process_setup_hook": "x.y", "env_vars": {"HF_HOME": "/h"}}
    assert connect.driver_runtime_env(ours, None) == ours
    # what Ray itself does with the two: no conflict left to refuse
    from ray.runtime_env.runtime_env import _merge_runtime_env
    assert _merge_runtime_env(job, connect.driver_runtime_env(ours, job)) is not None
    assert _merge_runtime_env(job, ours) is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job}))
    assert connect.job_runtime_env() == job


def test_address_comes_from_flag_then_environment(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.address(None) == "http://head:8265" and submit.address("http://x:1") == "http://x:1"
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # not a dashboard URL
    assert submit.address(None) == submit.DEFAULT_ADDRESS


def test_a_program_that_started_ray_itself_gets_the_classic_parquet_reader(ray_local):
    """``connect()`` in a process already connected (a notebook's own ``ray.init``, then ``run_recipe``)
    starts nothing, but still reads parquet with the reader ``cai`` chose (``use_data_defaults``)."""
    ctx = ray_local.data.DataContext.get_current()
    ctx.use_datasource_v2 = True
    try:
        connect.connect()
        assert ray_local.is_initialized() and ctx.use_datasource_v2 is False
    finally:
        ctx.use_datasource_v2 = False


def test_worker_setup_hides_deepspeeds_deprecated_torch_call_only(monkeypatch):
    import warnings

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # the hook leaves an address that is set alone
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        connect.quiet_worker_logs()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


SECRETS = {  # a file of each kind that must never leave this machine, and the reason the submission gives
    ".env": "environment file", ".env.production": "environment file", "app/.env.local": "environment file",
    ".aws/credentials": "cloud credentials", ".aws/config": "cloud credentials", ".ssh/config": "SSH folder",
    ".kube/config": "Kubernetes", ".netrc": "credentials file", ".git-credentials": "credentials file",
    ".pypirc": "package-index", ".npmrc": "package-registry", "certs/server.pem": "key or certificate",
    "certs/tls.key": "key file", "certs/client.p12": "key store", "id_rsa": "SSH key", "id_rsa.pub": "SSH key",
    "keys/id_ed25519": "SSH key", "gcp/sa.json": "service-account key",
}


def _secret_project(tmp_path, git: bool):
    root = _project(tmp_path, git=False)
    for rel in SECRETS:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("SECRET-CANARY-1234\n")
    (root / "gcp" / "sa.json").write_text(json.dumps({"type": "service_account", "private_key_id": "x",
                                                      "private_key": "-----BEGIN PRIVATE KEY-----SECRET-CANARY-1234"}))
    (root / "gcp" / "settings.json").write_text(json.dumps({"lr": 1e-5}))  # ordinary JSON travels
    outside = tmp_path / "outside_secret.txt"
    outside.write_text("SECRET-CANARY-1234\n")
    (root / "escape.txt").symlink_to(outside)  # a link out of the project: its target's text must not travel
    (root / "escape_dir").symlink_to(tmp_path)  # a folder link out of the project
    (root / "shared").mkdir()
    (root / "shared" / "c.py").write_text("z = 3\n")
    (root / "shared" / "up").symlink_to("..")  # loops back to the project root
    (root / "alias.py").symlink_to("pkg/m.py")  # a link inside: followed (its content travels as a file)
    (root / "pkg_link").symlink_to("shared")  # a folder link inside: followed once
    if git:
        subprocess.run(["git", "init", "-q", str(root)], check=True)
        subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)  # tracked, all of them
    return root


@pytest.mark.parametrize("git", [True, False], ids=["git-tracked", "no-git"])
def test_secrets_and_links_out_of_the_project_are_never_uploaded(tmp_path, git):
    root = _secret_project(tmp_path, git)
    sel = upload.select(root)
    left = dict(sel.left_out)
    for rel, why in SECRETS.items():
        assert rel not in sel.files and why in left[rel], rel
    assert "link to outside the project" in left["escape.txt"] and "outside" in left["escape_dir"]
    assert "loop" in left["shared/up"] and "pkg_link/up" in left  # not followed a second time
    assert {"alias.py", "pkg_link/c.py", "shared/c.py", "gcp/settings.json", "pkg/m.py"} <= set(sel.files)
    staged = upload.stage(sel, tmp_path / "staged")
    assert _grep_tree(staged, b"SECRET-CANARY") == []
    assert (staged / "alias.py").read_text() == "y = 2\n" and not (staged / "alias.py").is_symlink()
    line = sel.left_out_line(shown=100)
    assert "\n" not in line and ".aws/credentials (cloud credentials folder)" in line and "escape.txt" in line


def _grep_tree(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_dry_run_prints_the_selection_and_the_job_and_contacts_nothing(tmp_path, monkeypatch):
    root = _secret_project(tmp_path, git=True)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    out = subprocess.run([sys.executable, "-m", "workflows.cli", "submit", str(root / "recipe.yaml"),
                          "--project", str(root), "--run-dir", "/shared/runs/t", "--dry-run",
                          "--address", "http://127.0.0.1:9"],  # nothing listens there: a contact would fail
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    sub = submit.plan(str(root / "recipe.yaml"), "/shared/runs/t", root=root)
    assert f"would upload {len(sub.selection.files)} files" in text
    assert "  recipe.yaml" in text and "workflows/a.py" in text
    for rel in SECRETS:
        assert f"  {rel}  — " in text  # listed as left out, with its reason
    assert sub.submission_id in text and sub.entrypoint in text and '"run_dir": "/shared/runs/t"' in text
    assert "RAY_AUTH_TOKEN is not set" in text and "SECRET-CANARY" not in text and "Traceback" not in out.stderr


def test_a_remote_ray_init_ships_the_same_selection(monkeypatch):
    """``ray.init(address=...)`` from a driver uploads this checkout: the staged selection, not the tree."""
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    args = connect.init_args(connect.RayConfig(address="ray://head:10001"))
    staged = args["runtime_env"]["working_dir"]
    files = sorted(p.relative_to(staged).as_posix() for p in Path(staged).rglob("*")
                   if p.is_file())
    assert files == list(upload.select(connect.REPO_ROOT).files)
    assert "excludes" not in args["runtime_env"]

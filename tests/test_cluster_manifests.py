"""The cluster manifests, validated offline: our JSON schema for the KubeRay fields we use, the
embedded runtime env and Serve config (with Ray's own Serve schema and our typed serve config), the
cluster-launcher YAML against the autoscaler schema shipped with Ray, and the RayJob entrypoint
equal to what `cai submit` builds."""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.connect import REPO_ROOT
from cluster.serve.config import ServeConfig
from cluster.submit import entrypoint

K8S = REPO_ROOT / "cluster" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_there_is_a_job_a_cluster_and_a_service():
    assert {_load(p)["kind"] for p in MANIFESTS} == {"RayJob", "RayCluster", "RayService"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_schema(path):
    schema = json.loads((K8S / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(_load(path))]
    assert errors == [], f"{path.name}: {errors}"


def test_schema_catches_a_typo():
    schema = json.loads((K8S / "schema.json").read_text())
    job = _load(K8S / "rayjob.yaml")
    job["spec"]["entrypiont"] = job["spec"].pop("entrypoint")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, schema)


def test_rayjob_runs_what_cai_submit_builds():
    spec = _load(K8S / "rayjob.yaml")["spec"]
    recipe, run_dir = "workflows/recipes/harmless.yaml", "/mnt/runs/harmless"
    workdir = re.search(r"^WORKDIR (\S+)$", (K8S / "Dockerfile").read_text(), re.M).group(1)
    assert spec["entrypoint"] == entrypoint(f"{workdir}/{recipe}", run_dir)  # the project sits in the image
    assert (REPO_ROOT / recipe).is_file()
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    from ray.runtime_env import RuntimeEnv
    RuntimeEnv(**env)  # Ray's own validation of the runtime env fields
    assert set(env) == {"env_vars"} and all(isinstance(v, str) for v in env["env_vars"].values())
    gpu = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == "1"


def _serve_configs():
    svc = _load(K8S / "rayservice.yaml")["spec"]["serveConfigV2"]
    return [("rayservice.yaml", yaml.safe_load(svc)),
            ("serve_config.yaml", _load(REPO_ROOT / "cluster" / "serve" / "serve_config.yaml"))]


@pytest.mark.parametrize("name,config", _serve_configs(), ids=lambda x: x if isinstance(x, str) else "")
def test_serve_configs_pass_rays_schema_and_ours(name, config):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    for app in config["applications"]:
        assert app["import_path"] == "cluster.serve.app:build"
        cfg = ServeConfig.from_args(app["args"], f"{name}: args")
        assert cfg.replicas >= 1


def test_the_service_serves_what_the_job_writes():
    job = _load(K8S / "rayjob.yaml")["spec"]["entrypoint"]
    run_dir = job.split("--run-dir ")[1].split()[0]
    app = yaml.safe_load(_load(K8S / "rayservice.yaml")["spec"]["serveConfigV2"])["applications"][0]
    assert app["args"]["model"].startswith(run_dir + "/")
    assert app["args"]["api_key_env"] and "key" not in {k.lower() for k in app["args"]}  # a name, never a key


def test_launcher_yaml_passes_the_autoscaler_schema():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(REPO_ROOT / "cluster" / "launcher" / "aws-gpu.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema that ships with Ray
    validate_config(prepare_config(config))  # and as `ray up` checks it, defaults filled in
    assert config["head_node_type"] in config["available_node_types"]


def test_launcher_installs_the_project_dependencies():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in deps} - {"torch", "ray"}  # both in the Ray image
    setup = " ".join(_load(REPO_ROOT / "cluster" / "launcher" / "aws-gpu.yaml")["setup_commands"])
    assert {n for n in names if f'"{n}>=' not in setup} == set()


# ---------------------------------------------------------------- the image's build context
def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """The repository's .dockerignore, read with Docker's own rules (moby's patternmatcher): each
    pattern is cleaned and unanchored from '/', ``**`` spans folders, ``*`` and ``?`` stay inside one,
    a pattern that matches a folder excludes everything in it, ``!`` re-includes, the last match wins."""
    rules = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:].strip() if negate else line
        pat = pat.strip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        rules.append((negate, re.compile(rx + "$")))
    return rules


def _docker_excludes(rel: str, rules) -> bool:
    parts = rel.split("/")
    candidates = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]  # the path and its parent folders
    excluded = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            excluded = not negate
    return excluded


def _sample_name(pattern: str) -> str:
    return pattern.replace("*", "x")


def test_dockerignore_keeps_out_every_secret_cai_submit_keeps_out():
    from cluster import upload

    rules = _dockerignore_rules()
    samples = [f"{d}/credentials" for d in upload.SECRET_DIRS] + [_sample_name(p) for p, _ in upload.SECRET_FILES]
    for sample in samples:  # the same rules at the top and deep inside the context
        for rel in (sample, f"workflows/data/{sample}"):
            assert upload.secret_reason(rel) is not None, rel
            assert _docker_excludes(rel, rules), f".dockerignore lets {rel} into the image"
    for rel in ("runs/demo/sft/model.safetensors", ".git/config", "workflows/__pycache__/x.pyc", "m.gguf",
                "gcp/my-service-account.json"):
        assert _docker_excludes(rel, rules), rel


def test_the_image_copies_only_the_job_and_all_of_it_gets_in():
    import subprocess

    docker = (K8S / "Dockerfile").read_text()
    sources = [s for ln in docker.splitlines() if ln.startswith("COPY")
               for s in ln.split()[1:-1] if not s.startswith("--")]  # COPY [--flags] SRC... DEST
    assert "." not in sources, "COPY . copies the whole context (runs/, secrets, .git) into the image"
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True,
                             check=True).stdout.split()
    rules = _dockerignore_rules()
    for pkg in ("workflows", "actors", "training", "cluster", "constitutions"):
        assert pkg in sources, f"the Dockerfile does not copy {pkg}/, which a job imports"
    shipped = [f for f in tracked if f.split("/")[0] in sources]
    assert shipped and [f for f in shipped if _docker_excludes(f, rules)] == []  # nothing the job needs is lost


# ---------------------------------------------------------------- authentication
def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_cluster_has_token_auth_and_an_in_cluster_dashboard(path):
    """The Jobs API is code execution: token auth on (the token from the Secret the header comments
    tell how to make), and the head's Service only inside the Kubernetes cluster."""
    doc = _load(path)
    spec = _cluster_spec(doc)
    assert spec["authOptions"] == {"mode": "token", "secretName": "cai-ray-auth"}
    head = spec["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP" and not head.get("enableIngress", False)
    text = path.read_text()
    assert "kubectl create secret generic cai-ray-auth --from-literal=auth_token=" in text
    for group in [head] + spec.get("workerGroupSpecs", []):
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token" and "value" not in \
                {k for e in c.get("env", []) if e["name"] == "RAY_AUTH_TOKEN" for k in e}  # never inline
    schema = json.loads((K8S / "schema.json").read_text())
    spec["authOptions"]["mode"] = "tokn"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


def test_launcher_cluster_has_token_auth_and_a_loopback_dashboard():
    config = _load(REPO_ROOT / "cluster" / "launcher" / "aws-gpu.yaml")
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert cmd.index("RAY_AUTH_MODE=token") < cmd.index("ray start"), cmd
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token, from outside the repo

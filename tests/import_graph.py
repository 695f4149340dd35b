"""The project's import graph, read from the source with ``ast`` (nothing is imported), and the rules
``docs/architecture.md`` sets for it: layers that stack, no cycles, stages apart, few deferred imports.

Used by ``tests/test_architecture.py`` on this repository and on small made-up trees (so each rule is
shown to fail when broken)."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("workflows", "actors", "training", "cluster", "constitutions")
# the layers, lowest first: a module may import its own layer and the ones below, never one above
LAYERS = ("foundation", "engines", "training", "stages", "commands")
# the packages of pipeline stages: none imports another's modules (what two share lives below both)
STAGE_PACKAGES = ("workflows.prompts", "workflows.sl_cai", "workflows.preference", "workflows.evaluate")


def layer_of(module: str) -> str:
    """The layer a module belongs to (see docs/architecture.md)."""
    parts = module.split(".")
    if parts[-1] == "cli" or module in ("cluster.submit",) or module.startswith("cluster.serve"):
        return "commands"  # the `cai` command's subcommands, job submission, the serving app
    if module.startswith("workflows.core") or module in ("workflows", "constitutions"):
        return "foundation"
    if parts[0] == "actors" or module in ("cluster", "cluster.connect", "cluster.local", "cluster.upload"):
        return "engines"
    if parts[0] == "training":
        return "training"
    return "stages"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the project module it imports
    line: int
    deferred: bool  # inside a function: runs when called, not when the module loads


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)

    def edges(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for i in self.imports:
            out[i.source].add(i.target)
        return out


def _module_name(root: Path, path: Path) -> str:
    name = ".".join(path.relative_to(root).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(x) for x in ast.walk(node) if isinstance(x, (ast.Import, ast.ImportFrom))}
    return skip


def build(root: Path, packages: tuple[str, ...] = PACKAGES) -> Graph:
    """Every module of ``packages`` under ``root`` and every import of one of them by another.
    ``from pkg import name`` counts the submodule ``pkg.name`` when there is one, else ``pkg``."""
    modules = {_module_name(root, p): p for pkg in packages if (root / pkg).is_dir()
               for p in sorted((root / pkg).rglob("*.py"))}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = Graph(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inside = {id(x) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for x in ast.walk(fn) if isinstance(x, (ast.Import, ast.ImportFrom))}
        skip = _type_checking_only(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                if name.split(".")[0] not in packages:
                    continue
                target = resolve(name)
                if target and target != module:
                    graph.imports.append(Import(module, target, node.lineno, id(node) in inside))
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), deferred imports included."""
    edges, index, low, stack, on, found = graph.edges(), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(graph: Graph) -> list[Import]:
    """Imports of a module in a higher layer than the importer's."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [i for i in graph.imports if rank[layer_of(i.target)] > rank[layer_of(i.source)]]


def _stage_package(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


def across_stages(graph: Graph) -> list[Import]:
    """Imports by one stage package of another stage package's modules."""
    return [i for i in graph.imports
            if _stage_package(i.source) and _stage_package(i.target)
            and _stage_package(i.source) != _stage_package(i.target)]


def deferred(graph: Graph) -> list[Import]:
    return [i for i in graph.imports if i.deferred]

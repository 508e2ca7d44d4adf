"""The shape of the package: dependencies point one way (issue 13 acceptance 2).

Imports are read from the source (module level and inside functions alike: a function-local import is
still a dependency), so a cycle hidden by a late import fails here too. Imports under
``if TYPE_CHECKING:`` are annotations only, never executed, and are not counted."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "bigtrain"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """bigtrain module -> the bigtrain modules it imports (``from bigtrain.x import y`` counts
    ``bigtrain.x.y`` when that is a module, else ``bigtrain.x``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If)
            and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("bigtrain"):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_is_read():
    graph = import_graph()
    assert "bigtrain.models.parallelize" in graph["bigtrain.registry"]
    assert "bigtrain.models.layout" in graph["bigtrain.checkpoint"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_detection_fails_on_a_cycle():
    """The control: a made-up back edge is reported."""
    graph = import_graph()
    graph["bigtrain.models.layout"].add("bigtrain.registry")
    assert any("bigtrain.registry" in c and "bigtrain.models.layout" in c for c in _cycles(graph))


def test_models_never_import_fine_tuning_or_the_root():
    """Fine-tuning builds on the base; the composition root builds on both; never the reverse."""
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("bigtrain.models"):
            bad = {
                t
                for t in targets
                if t.startswith(("bigtrain.finetune", "bigtrain.registry", "bigtrain.trainer"))
            }
            assert not bad, f"{name} imports {sorted(bad)}"

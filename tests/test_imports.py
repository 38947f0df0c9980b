"""The package's import graph: no module imports itself back through others at import time.

Only imports that run when a module is imported count (module and class bodies); an import
inside a function is a deliberate lazy step (``Result.plot`` importing the figures).
"""
from __future__ import annotations

import ast
from pathlib import Path

import shiftlab

PACKAGE = Path(shiftlab.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("shiftlab",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _eager_imports(tree: ast.Module):
    """Import nodes that run at import time: not inside a function or an
    ``if TYPE_CHECKING`` block."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _named(name: str, modules) -> set[str]:
    """The module an import names. Its parent packages run first too, but a package's
    ``__init__`` that re-exports its children is the one sanctioned loop, so parents are not
    counted: ``from ..models import load_model`` counts ``shiftlab.models`` itself."""
    return {name} & set(modules)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _eager_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    targets |= _named(alias.name, modules)
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = (f"{base}.{node.module}" if node.module else base) if node.level else \
                (node.module or "")
            for alias in node.names:  # `from pkg import module` names the module
                submodule = f"{source}.{alias.name}"
                targets |= _named(submodule if submodule in modules else source, modules)
        graph[name] = {t for t in targets if t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "shiftlab.equivariance.engine" in graph and graph["shiftlab.equivariance.engine"], \
        "the graph must see the engine's imports"
    assert cycles(graph) == []


def test_version_lives_in_its_own_module_and_nothing_imports_it_from_the_package_root():
    graph = import_graph()
    assert graph["shiftlab._version"] == set()
    upward = [name for name, path in _modules().items() if name != "shiftlab" and any(
        isinstance(node, ast.ImportFrom) and node.module is None and node.level >= 1
        and any(alias.name == "__version__" for alias in node.names)
        for node in ast.walk(ast.parse(path.read_text())))]
    assert upward == []


def test_no_public_name_hides_a_subpackage():
    """``shiftlab.measure`` is the function; a subpackage of that name would be unreachable
    by attribute (monkeypatch strings, ``shiftlab.x.y`` in docs)."""
    import importlib
    import types

    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    for name in subpackages:
        importlib.import_module(f"shiftlab.{name}")
        assert isinstance(getattr(shiftlab, name), types.ModuleType), name
    assert importlib.import_module("shiftlab.equivariance.engine").measure is shiftlab.measure
    assert callable(shiftlab.measure)

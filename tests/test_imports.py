"""The package graph points one way (issue 24): no import cycle among gateway's packages, nor among its
modules. Read from the source with ``ast``: every ``import`` counts, in a function body too (an import moved
into a function to dodge a cycle is still one: admin/api and admin/cloud did that). Between packages, those
under ``if TYPE_CHECKING:`` count too (a cycle there is still a layering that runs back up); between modules
they do not, nor does a module's import of its own package (Python initialises the package first anyway:
``gateway.routes.loki`` importing ``gateway.routes``)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"


def _module(path: Path) -> str:
    parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool, typing_only: bool) -> Iterator[str]:
    """The gateway modules a module imports (``from x import y`` may name a module), function bodies included;
    those under ``if TYPE_CHECKING:`` only with ``typing_only``."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("gateway"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            if base.startswith("gateway"):
                yield base
                yield from (f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.If) and _is_type_checking(node) and not typing_only:
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _graph(typing_only: bool) -> dict[str, set[str]]:
    """module -> the gateway modules it imports (``typing_only``: with those under ``if TYPE_CHECKING:``)."""
    files = {_module(p): p for p in GATEWAY.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[mod] = {n for n in _imports(tree, mod, path.name == "__init__.py", typing_only)
                      if n in files and n != mod and (typing_only or not mod.startswith(f"{n}."))}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between gateway's packages and top-level modules (``gateway.lbac``, ``gateway.state``)."""
    def unit(m: str) -> str:
        return ".".join(m.split(".")[:2])

    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        out.setdefault(unit(mod), set()).update(unit(d) for d in deps if unit(d) != unit(mod))
    return out


def test_the_reader_sees_imports() -> None:
    """The graph is not empty by mistake: known edges are in it."""
    graph = _graph(True)
    assert "gateway.proxy.plan" in graph["gateway.proxy.handler"]
    assert "gateway.errors" in graph["gateway.lbac.restrict"]
    assert "gateway.config" in graph["gateway.proxy.fastpath"]  # (under TYPE_CHECKING)
    assert "gateway.config" not in _graph(False)["gateway.proxy.fastpath"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_gateway_packages() -> None:
    assert _cycles(_packages(_graph(True))) == []


def test_no_import_cycle_among_gateway_modules() -> None:
    assert _cycles(_graph(False)) == []

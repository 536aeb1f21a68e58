"""The shape of the code: the engine imports no controller, and no module imports itself back.

The import graph is read from the source with ``ast`` (every ``import``, at the top of a module
or inside a function), so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "csdrafting"

# the engine: drafting, verification and what they run on
CORE = ("cascade", "step", "verify", "schedule", "tree", "config", "levels", "report", "planning", "sampling")
# what steers, measures or serves it
EDGE = ("autoplan", "tune", "bench", "server", "cli")


def module_names() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def imports_of(name: str, path: Path, is_package: bool, modules: dict) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from . import verify`` names a module; ``from .config import X`` names a member
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def in_group(module: str, group: tuple[str, ...]) -> bool:
    relative = module.removeprefix("csdrafting.")
    return any(relative == g or relative.startswith(g + ".") for g in group)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "csdrafting.autoplan" in graph["csdrafting"]  # imported inside a function of __init__
    assert "csdrafting.verify" in graph["csdrafting.step"]  # ``from . import verify``


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_engine_imports_no_controller():
    graph = import_graph()
    core = [m for m in graph if in_group(m, CORE)]
    assert "csdrafting.cascade" in core and "csdrafting.levels.llamacpp" in core
    offending = {m: sorted(e for e in reachable(graph, m) if in_group(e, EDGE)) for m in core}
    assert {m: e for m, e in offending.items() if e} == {}


def test_importing_the_engine_loads_no_tuning_code():
    code = "import csdrafting.cascade, sys; print([m for m in sys.modules if '.tune' in m or 'autoplan' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

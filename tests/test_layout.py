"""The package's layout is its architecture: tiers, lowest first, and every import goes down (or across one tier).

    core, pb -> kernels -> encoder, retrievers -> index -> search -> shard -> api, client -> cli, bench, demo

A request walks down these tiers once: api (validate, admit) -> search (cache, pipeline stages) -> retrievers /
encoder / kernels -> back up as return values. These tests read the installed package's sources.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rag_service

TIERS = {"core": 0, "pb": 0, "_native": 1, "kernels": 1, "encoder": 2, "retrievers": 2, "index": 3, "search": 4,
         "shard": 5, "api": 6, "client": 6, "cli": 7, "bench": 7, "demo": 7}
PACKAGE = Path(rag_service.__file__).parent


def _tier(module: str) -> int:
    parts = module.split(".")
    return TIERS[parts[1]] if len(parts) > 1 else 0


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parts[1] == "pb":
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def _imports(node: ast.AST, known: set[str]) -> list[tuple[str, int]]:
    """rag_service modules a statement imports (a `from pkg import module` names the module)."""
    found = []
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rag_service"):
        for alias in node.names:
            sub = f"{node.module}.{alias.name}"
            found.append((sub if sub in known else node.module, node.lineno))
    elif isinstance(node, ast.Import):
        found += [(a.name, node.lineno) for a in node.names if a.name.startswith("rag_service")]
    return found


def test_every_module_is_in_a_tier():
    for name in _modules():
        assert name == "rag_service" or name.split(".")[1] in TIERS, f"{name}: add its folder to the tiers"


def test_no_module_imports_from_a_higher_tier():
    modules = _modules()
    known = set(modules)
    upward = [f"{name}:{line} imports {target}"
              for name, tree in modules.items() for node in ast.walk(tree)
              for target, line in _imports(node, known) if _tier(target) > _tier(name)]
    assert not upward, "\n".join(upward)


def test_the_module_import_graph_has_no_cycles():
    modules = _modules()
    known = set(modules)
    # Import-time edges: statements at module level (function-level imports run later and cannot deadlock a load,
    # but they must still point down, which the test above checks).
    graph = {name: {t for node in tree.body for t, _ in _imports(node, known) if t in known and t != name}
             for name, tree in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The tests above can fail: a synthetic upward import is caught by the tier rule."""
    tree = ast.parse("from rag_service.api import server\n")
    (target, _), = _imports(tree.body[0], {"rag_service.api.server"})
    assert _tier(target) > _tier("rag_service.search.pipeline")

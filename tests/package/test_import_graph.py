"""The package's import graph, read from its source (ast): no cycle, short chains, few top-level
modules. Every import of a package module counts, lazy ones and ``TYPE_CHECKING`` ones too: a
cycle hidden behind either is still a cycle for the reader."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import coreset_optim

PACKAGE = Path(coreset_optim.__file__).parent
NAME = PACKAGE.name
MAX_CHAIN = 9  # modules in the longest import chain
MAX_TOP_LEVEL = 12  # modules directly in coreset_optim/ (the rest live in folders named for the parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from .x import y``: ``x.y`` when it is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in modules else root for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != me}
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    @cache
    def chain(node: str) -> tuple[str, ...]:
        return (node,) + max((chain(n) for n in edges[node]), key=len, default=())

    return list(max((chain(n) for n in edges), key=len))


def test_the_graph_is_read():
    edges = graph()
    assert "coreset_optim.config" in edges["coreset_optim.methods.registry"]
    assert "coreset_optim.records" in edges["coreset_optim.distributed"]


def test_no_import_cycle():
    assert find_cycle(graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_chains_are_short():
    chain = longest_chain(graph())
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_few_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top

"""The house rules, checked: the import graph of `peer/` and `protocol/` follows the layers, has no cycles, and
modules and functions stay small.

Why: a newcomer should know from a path alone what a file may depend on, and a wrong arrow (the config
importing the simulator, the algorithm importing the daemon) is how a codebase turns into one knot. The
layers, lowest first: `peer/core` (the algorithm), `peer/config.py`, `peer/swarm`, `peer/node`, `peer/lab`,
`peer/export` (the model outside murmur), `peer/cli`. A module may import its own layer and those below it;
everything may import `protocol/`, which imports nothing of `peer/`; `bootstrap/` (the bootstrap node) uses
`protocol/` only. Every import counts, including those inside functions, so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
"""A module over this says two things at once, a function over this does several (generated code excepted)."""
LAYERS = ("peer.core", "peer.config", "peer.swarm", "peer.node", "peer.lab", "peer.export", "peer.cli")
"""Lowest first: a module may import its own layer and those before it."""
PACKAGES = ("peer", "protocol", "bootstrap")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module of ours this file imports, anywhere in it (`from peer.cli import run` names peer.cli.run)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_generated" not in p.parts}
    return {name: {i for i in imports(path) if i in files and i != name} for name, path in files.items()}


def layer(module: str) -> int | None:
    """Index in LAYERS, or None for modules outside them (peer/__init__, protocol, bootstrap)."""
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return None


def wrong_arrows(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            top_source, top_target = source.split(".")[0], target.split(".")[0]
            if top_source in ("protocol", "bootstrap") and top_target == "peer":
                wrong.append(f"{source} -> {target}: {top_source}/ never imports peer/")
            elif top_source == "bootstrap" or top_target != "peer" or target == "peer":
                continue
            elif (s := layer(source)) is not None and (t := layer(target)) is not None and t > s:
                wrong.append(f"{source} -> {target}: {LAYERS[s]} may not import the layer above it ({LAYERS[t]})")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_imports_point_down_the_layers() -> None:
    assert wrong_arrows(graph()) == []


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(graph()) == []


def test_the_check_sees_a_wrong_arrow_and_a_cycle() -> None:
    """The check is not vacuous: a config importing the simulator, and two modules importing each other."""
    edges = {"peer.config": {"peer.lab.sim"}, "peer.lab.sim": set(), "peer.core.a": {"peer.core.b"},
             "peer.core.b": {"peer.core.a"}, "protocol.x": {"peer.core.a"}}  # fmt: skip
    assert wrong_arrows(edges) == [
        "peer.config -> peer.lab.sim: peer.config may not import the layer above it (peer.lab)",
        "protocol.x -> peer.core.a: protocol/ never imports peer/",
    ]
    assert cycles(edges) == [["peer.core.a", "peer.core.b"]]
    assert len(graph()) > 40


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "_generated" in path.parts:
                continue
            source = path.read_text()
            name = path.relative_to(ROOT)
            if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
                too_long.append(f"{name}: {lines} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if (length := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES:
                        too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []

"""The arrows point one way: `algorithms` (with the CLI and the demo) -> `rl_agents` -> `envs`, and no
module imports itself back through others. Read from the sources (every import statement, also the
ones inside functions), so that a lazy import cannot hide an upward arrow."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rl_agents", "envs", "algorithms", "examples")
LAYERS = {"envs": 0, "rl_agents": 1, "algorithms": 2, "examples": 2}


def _graph() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def test_no_module_imports_a_layer_above_it():
    upward = sorted((a, b) for a, targets in _graph().items() for b in targets
                    if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]])
    assert upward == []


def test_no_import_cycle():
    edges = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            raise AssertionError(" -> ".join(cycle))


def test_the_graph_sees_imports_inside_functions():
    """The checks above would pass vacuously if the parser missed lazy imports: it must see, e.g., that
    `algorithms.base` imports `rl_agents.train` inside `Algorithm.update`."""
    assert "rl_agents.train" in _graph()["algorithms.base"]

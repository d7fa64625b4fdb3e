"""The packages import each other in one direction only: no cycle between tandem's packages (engine,
runner, model, kv_transfer, ...) or its top-level modules, counting every import that runs at
import time (``if TYPE_CHECKING:`` imports are annotations only and do not count)."""

from __future__ import annotations

import ast
from pathlib import Path

import tandem

ROOT = Path(tandem.__file__).parent

# Leaf modules: shared types and helpers that import nothing of tandem but what is listed.
LEAVES = {
    "tandem.config": set(),
    "tandem.utils": set(),
    "tandem.version": set(),
    "tandem.h2d": set(),
    "tandem.outputs": set(),
    "tandem.sampling_params": set(),
    "tandem.scheduler_output": {"tandem.sampling_params"},
    "tandem.kv_transfer.stats": set(),
    "tandem.kv_offload.stats": set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """Absolute names of the tandem modules this file imports when it is imported or run."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in _nodes_run_at_import(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return {n for n in found if n == "tandem" or n.startswith("tandem.")}


def _nodes_run_at_import(tree: ast.AST):
    """Every node, function bodies included (a lazy import still couples two packages), except the
    bodies of ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _unit(module: str) -> str:
    """tandem.engine.scheduler -> tandem.engine; tandem.config -> tandem.config."""
    return ".".join(module.split(".")[:2])


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        src = _unit(_module_name(path))
        for target in _runtime_imports(path):
            if _unit(target) != src:
                edges.setdefault(src, set()).add(_unit(target))
    return edges


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    cycle = _find_cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_engine_sits_above_runner_model_and_kv_transfer():
    edges = _graph()
    for lower in ("tandem.runner", "tandem.model", "tandem.kv_transfer", "tandem.kernels"):
        assert "tandem.engine" not in edges.get(lower, set()), f"{lower} imports tandem.engine"
    assert "tandem.runner" not in edges.get("tandem.model", set())


def test_leaf_modules_import_only_their_leaves():
    for module, allowed in LEAVES.items():
        path = ROOT.parent / (module.replace(".", "/") + ".py")
        assert _runtime_imports(path) <= allowed, (module, _runtime_imports(path) - allowed)


def test_the_checker_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None

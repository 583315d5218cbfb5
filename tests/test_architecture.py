"""The package's shape: no import circle (lazy imports in functions included), no private
name imported across modules, and each rule in one place (the budget rule, the KV
arithmetic). Read from the source with ``ast``: nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "ggufllm"


def _modules() -> dict[str, tuple[Path, list[str]]]:
    """Module name -> (file, the package its relative imports start from)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        out[".".join(parts)] = (path, package)
    return out


MODULES = _modules()


def _imports(path: Path, package: list[str]) -> list[tuple[str, list[str]]]:
    """(module, names) of every import outside ``if TYPE_CHECKING:``, functions included."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, []) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package[:len(package) - child.level + 1] if child.level else []
                module = ".".join(base + ([child.module] if child.module else []))
                found.append((module, [a.name for a in child.names]))
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, (path, package) in MODULES.items():
        edges = set()
        for module, names in _imports(path, package):
            # `from pkg import sub` imports the submodule; `from mod import name`, the module
            subs = {f"{module}.{n}" for n in names} & MODULES.keys()
            edges |= subs or ({module} & MODULES.keys())
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert "ggufllm.native.runtime" in graph["ggufllm.engine.native"]  # the graph is read
    assert "ggufllm.gpu.placement" in graph["ggufllm.engine.native"]  # lazy imports too
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    offenders = [f"{name}: from {module} import {n}"
                 for name, (path, package) in MODULES.items()
                 for module, names in _imports(path, package)
                 if module.startswith("ggufllm") for n in names
                 if n.startswith("_") and not n.startswith("__")]
    assert offenders == []


def _defining(pattern: str) -> list[str]:
    return sorted(name for name, (path, _) in MODULES.items()
                  if pattern in path.read_text(encoding="utf-8"))


def test_each_rule_is_written_once():
    # the budget rule: prompt + max_tokens within the window
    assert _defining("def check_budget(") == ["ggufllm.engine.fit"]
    # the KV arithmetic: bytes per cell and cells per layer
    assert _defining("def kv_cache_bytes(") == ["ggufllm.kvlayout"]
    # the engine's step policy, apart from the thread that drives it
    assert _defining("def step(self)") == ["ggufllm.engine.stepper"]

"""The package's import graph: no module of calibrl_kernels imports itself back through others (no circle),
and ``import calibrl_kernels`` loads neither triton nor the C++ build.

The graph is read from the source (every ``import`` / ``from ... import`` of a package module, at module
level or inside a function), with an edge to each parent package a submodule import runs.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import calibrl_kernels

PACKAGE = Path(calibrl_kernels.__file__).resolve().parent
NAME = "calibrl_kernels"


def _modules():
    """Module name -> (path, is a package __init__)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = (NAME,) + path.relative_to(PACKAGE).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported(module: str, is_package: bool, node, modules) -> list:
    """Package modules an import statement of ``module`` names (the longest existing prefix of each)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1] if node.level else []
        stem = ".".join(base + ([node.module] if node.module else []))
        targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
    found = []
    for target in targets:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != module:
            found.append(target)
    return found


def import_graph() -> dict:
    modules = _modules()
    graph = {}
    for module, (path, is_package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_imported(module, is_package, node, modules))
        for target in list(edges):  # importing a.b.c runs a.b's __init__ too
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in modules and not module.startswith(parent + "."):
                    edges.add(parent)
        graph[module] = edges
    return graph


def circles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert {"calibrl_kernels.ops", "calibrl_kernels.triton.loss", "calibrl_kernels.cpu.loss"} <= set(graph)
    assert "calibrl_kernels.triton._loss_terms" in graph["calibrl_kernels.triton.loss"]
    assert "calibrl_kernels.reference.coefficients" in graph["calibrl_kernels.cpu.loss"]


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_loads_neither_triton_nor_the_cpp_build():
    code = (
        "import sys, calibrl_kernels\n"
        "from calibrl_kernels.cpu import build\n"
        "print('triton' in sys.modules, build.attempted())\n"
    )
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert out.stdout.split() == ["False", "False"]

"""The import contract in pyproject.toml holds (import-linter): the math stays pure, the models know no loop or
method, the loop knows no method, the writers know no method, the core never imports a face, and no module imports
itself through others. A change that breaks a layer fails here, in CI, not in review."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the 'test' extra)")

from tests.helpers import ROOT  # noqa: E402


def _lint_imports() -> str:
    found = Path(sys.executable).with_name("lint-imports")
    if found.exists():
        return str(found)
    path = shutil.which("lint-imports")
    if path is None:
        pytest.skip("import-linter not installed (it comes with the 'test' extra)")
    return path


def test_the_import_contract_holds():
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout and "Contracts: 6 kept" in done.stdout, done.stdout[-2000:]


def test_the_contract_catches_a_math_module_importing_a_model_module(tmp_path):
    """The contract can fail: a copy of the package whose math imports the model adapters is refused."""
    copy = tmp_path / "tree"
    shutil.copytree(ROOT / "comp_core", copy / "comp_core", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "ui", copy / "ui", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    linalg = copy / "comp_core" / "math" / "linalg.py"
    linalg.write_text(linalg.read_text() + "\nfrom ..models import adapters  # noqa: E402,F401\n")
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=copy, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "comp_core.math.linalg -> comp_core.models" in done.stdout, done.stdout[-3000:]


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (Tarjan's strongly connected
    components of more than one module, and modules that import themselves)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for target in edges.get(module, ()):
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in edges.get(module, ()):
                cycles.append(sorted(group))

    for module in sorted(edges):
        if module not in order:
            visit(module)
    return cycles


def _edges(graph) -> dict[str, set[str]]:
    modules = set(graph.modules)
    return {m: set(graph.find_modules_directly_imported_by(m)) & modules for m in modules}


def test_no_module_imports_itself_through_others():
    """Imports inside functions count too: a lazy import that hides a cycle is still a cycle."""
    assert import_cycles(_edges(grimp.build_graph("comp_core", "ui"))) == []


def test_the_cycle_finder_sees_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_cycles(edges) == [["a", "b", "c"], ["e"]]

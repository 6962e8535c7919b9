"""The import contract in pyproject.toml holds (import-linter): the math stays pure, the models know no loop or
method, the loop knows no method, and the core never imports a face. A change that breaks a layer fails here, in CI, not in review."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    assert "0 broken" in done.stdout and "Contracts: 4 kept" in done.stdout, done.stdout[-2000:]


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

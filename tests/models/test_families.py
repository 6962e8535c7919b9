"""The decoder families beyond Llama/OPT: Gemma 2, Gemma 3 (text), Phi-3 (also Phi-4), GPT-NeoX (Pythia),
OLMo 2 and Falcon — each registered by ``config.model_type``, pruned by COMP at 20 %, saved and reloaded
exactly; the fused projections' index maps checked against zeroed weights; layer-only pruning saving the
stock architecture; the structural fallback and the message for what stays unsupported.

Tiny random models (vocab 512, hidden 64, MLP 256, 6 blocks): the blocks outweigh the embedding, so a 20 %
ratio is reachable. These families are deliberately not in conftest's ``ARCHS`` (that would multiply the
whole suite).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from comp_core import CompConfig, UnsupportedModelError, count_parameters, get_adapter, prune
from comp_core.export.folder import load_pruned, read_report, save_pruned
from comp_core.methods.registry import get_method, make_settings
from comp_core.models.pruned import head_dim_of
from comp_core.models.structure import attention_units
from comp_core.models.surgery import apply_cuts, prune_inputs, remove_attention_units, replace_submodule

VOCAB = 512
TOL = 1e-4
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
               max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=0)
_MLP = dict(intermediate_size=256)

# model_type -> (config class, causal-LM class, config values); each exercises its family's traps
FAMILIES = {
    # extra norms, soft capping, scaled embeddings, query_pre_attn_scalar, sliding-window layer_types
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(**_MLP, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    # + per-head q_norm/k_norm, per-layer-type rotary embeddings
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(**_MLP, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    # fused qkv_proj and gate_up_proj, partial rotary
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(**_MLP, num_key_value_heads=2, partial_rotary_factor=0.5)),
    # fused query_key_value interleaved per head, parallel residual, partial rotary, biases, LayerNorm
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(**_MLP, rotary_pct=0.5)),
    # q_norm/k_norm over all heads together
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(**_MLP, num_key_value_heads=2)),
    # multi-query fused query_key_value, parallel attention
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(ffn_hidden_size=256)),
    # Llama layout with their own classes: scaled embeddings (Gemma), NoPE layers (SmolLM3)
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(**_MLP, num_key_value_heads=2, head_dim=16)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(**_MLP, num_key_value_heads=2, no_rope_layer_interval=2)),
}
# Falcon's other two fused layouts, to check their index maps too
FALCON_LAYOUTS = {
    "falcon-mha": dict(multi_query=False),
    "falcon-grouped": dict(new_decoder_architecture=True, num_kv_heads=2),
}
# alibi slopes are built for the config's head count: heads stay, exactly
FALCON_ALIBI = dict(alibi=True)


def make_family(name: str, seed: int = 0, **changes) -> transformers.PreTrainedModel:
    config_name, model_name, values = FAMILIES[name]
    config = getattr(transformers, config_name)(**{**_COMMON, **values, **changes})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))


def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def max_diff(a, b) -> float:
    x = tokens()
    return (a(input_ids=x).logits - b(input_ids=x).logits).abs().max().item()


def same_generation(a, b) -> bool:
    prompt = tokens()[:1, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=0)
    return torch.equal(a.generate(prompt, **kwargs), b.generate(prompt, **kwargs))


def run_method(name: str, model, ratio: float = 0.2):
    return get_method(name).method.prune(model, calib(), make_settings(name, ratio=ratio))


def save_and_reload(model, path):
    save_pruned(model, None, path)
    return load_pruned(path)[0]


# ------------------------------------------------------------------------------------------ the registry

@pytest.mark.parametrize("name", FAMILIES)
def test_registry_recognises_the_model_type(name):
    model = make_family(name)
    adapter = get_adapter(model)
    assert adapter.matched == "model_type"
    assert adapter.model_class == FAMILIES[name][1]
    assert len(adapter.blocks(model)) == 6
    # the blocks outweigh the embedding enough for a 20 % ratio
    assert model.get_input_embeddings().weight.numel() < 0.2 * count_parameters(model)


def test_unregistered_type_matched_by_structure_but_not_exported(tmp_path, caplog):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4))
    model.config.model_type = "my_llama"
    with caplog.at_level("INFO", logger="comp_core.models.adapters"):
        adapter = get_adapter(model)
    assert adapter.matched == "structure: llama layout"
    assert "my_llama" in caplog.text and "llama layout" in caplog.text
    with pytest.raises(UnsupportedModelError, match="supported for llama, .*gemma2.*phi3.*gpt_neox.*falcon"):
        save_pruned(model, None, tmp_path / "x")


def test_unsupported_architecture_names_what_is_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, bos_token_id=0,
                                      eos_token_id=1))
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(gpt2)
    message = str(err.value)
    assert "'gpt2'" in message
    for model_type in ("llama", "opt", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "falcon"):
        assert model_type in message


# --------------------------------------------------------------------- prune 20 %, save, reload exactly

@pytest.mark.parametrize("kinds", ["default", "all"])
@pytest.mark.parametrize("name", FAMILIES)
def test_comp_prunes_saves_and_reloads_exactly(name, kinds, tmp_path):
    """COMP's default (down + o inputs) and every dense (fused qkv / gate_up inputs too) at 20 %."""
    model = make_family(name)
    before = count_parameters(model)
    settings = {} if kinds == "default" else {"dense_kinds": None}
    pruned, result = prune(model, calib(), CompConfig(ratio=0.2, **settings))
    assert count_parameters(pruned) <= 0.8 * before + 8
    reloaded = save_and_reload(pruned, tmp_path / name)
    assert type(reloaded).__name__ == "Comp" + FAMILIES[name][1]
    assert reloaded.config.model_type == "comp_" + name
    assert count_parameters(reloaded) <= count_parameters(pruned)  # dead heads go at export
    assert max_diff(pruned, reloaded) <= TOL
    assert same_generation(pruned, reloaded)


def test_stale_config_is_refused(tmp_path):
    model = make_family("phi3")
    pruned, _ = prune(model, calib(), CompConfig(ratio=0.2))
    folder = save_pruned(pruned, None, tmp_path / "phi3")
    config = json.loads((folder / "config.json").read_text())
    config["comp_layers"][3]["mlp_width"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match="does not match its config|ignore_mismatched_sizes"):
        load_pruned(folder)  # transformers' own size check, never a silent re-initialisation


# ------------------------------------------------------------------------------ index maps, checked exactly

def _block_io(model, layer: int = 2):
    """(block, its input hidden states, its kwargs) captured from one forward."""
    adapter = get_adapter(model)
    block = adapter.blocks(model)[layer]
    seen = {}

    def hook(_module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs.pop("hidden_states")).detach()
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=tokens(), use_cache=False)
    handle.remove()
    return block, seen["hidden"], seen["kwargs"]


@torch.no_grad()
def _run(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", FAMILIES)
def test_mlp_coupling_map_equals_zeroed_columns(name):
    """Removing down inputs (and, through the index map, the producers' rows — both halves of a fused
    gate_up) computes what zeroing those down columns computes."""
    model = make_family(name)
    adapter = get_adapter(model)
    block, hidden, kwargs = _block_io(model)
    consumer = next(d for d in adapter.denses if d.coupled_producers)
    down = adapter.dense(block, consumer.name)
    removed = torch.tensor([0, 5, 17, 200])
    keep = torch.nonzero(~torch.isin(torch.arange(down.in_features), removed)).flatten()
    down.weight.data[:, removed] = 0
    expected = _run(block, hidden, kwargs)
    apply_cuts(block, adapter, {consumer.name: keep})
    assert adapter.dense(block, consumer.name).in_features == down.in_features - removed.numel()
    assert torch.allclose(_run(block, hidden, kwargs), expected, atol=1e-5)


def _head_case(name: str):
    if name == "falcon-alibi":
        return make_family("falcon", **FALCON_ALIBI)
    return make_family("falcon", **FALCON_LAYOUTS[name]) if name in FALCON_LAYOUTS else make_family(name)


HEAD_FAMILIES = [n for n in FAMILIES if n not in ("phi3", "olmo2")] + list(FALCON_LAYOUTS)


# multi-query Falcon has a single kv group, so no unit to remove: its dead single heads go at export
@pytest.mark.parametrize("name", [n for n in HEAD_FAMILIES if n != "falcon"])
def test_attention_unit_removal_equals_zeroed_o_columns(name):
    """Removing an attention unit through the layout's index map (q/k/v rows wherever a fused linear keeps
    them) computes what zeroing its o columns computes."""
    model = _head_case(name)
    adapter = get_adapter(model)
    block, hidden, kwargs = _block_io(model)
    units = attention_units(block, adapter, head_dim_of(model.config))
    o = adapter.dense(block, adapter.attention.o)
    keep = torch.arange(1, units.count)
    o.weight.data[:, units.q_rows(torch.tensor([0]))] = 0
    expected = _run(block, hidden, kwargs)
    remove_attention_units(block, adapter, units, keep)
    assert adapter.head_counts(block, units.head_dim)[0] == keep.numel() * units.query_heads_per_unit
    assert torch.allclose(_run(block, hidden, kwargs), expected, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_FAMILIES + ["phi3", "olmo2", "falcon-alibi"])
def test_export_removes_dead_heads_through_the_layout(name, tmp_path):
    """o reading no column of some heads: the export drops those heads' q/k/v rows (where the family allows
    it exactly) and the reload computes the same logits."""
    model = _head_case(name)
    adapter = get_adapter(model)
    head_dim = head_dim_of(model.config)
    heads, kv_heads = adapter.head_counts(adapter.blocks(model)[0], head_dim)
    dead = [0, 1] if kv_heads < heads else [1]  # a whole kv group where grouped (heads 0, 1: group 0)
    for layer in (1, 3):
        block = adapter.blocks(model)[layer]
        o = adapter.dense(block, adapter.attention.o)
        alive = torch.tensor([c for c in range(o.in_features) if c // head_dim not in dead])
        replace_submodule(block, adapter.attention.o, prune_inputs(o, alive))
    reloaded = save_and_reload(model, tmp_path / name)
    report = read_report(tmp_path / name)["export"]
    if adapter.head_removal_refused(adapter.blocks(model)[1]) is None:
        assert report["removed_heads"] > 0
        assert report["layers"][1]["heads"] < heads
    else:
        assert report["removed_heads"] == 0
    assert max_diff(model, reloaded) <= TOL
    assert same_generation(model, reloaded)


# ------------------------------------------------------------------- layer-only pruning and other methods

@pytest.mark.parametrize("name, per_layer", [("gemma2", "layer_types"), ("smollm3", "no_rope_layers"),
                                             ("gpt_neox", None)])
def test_layer_only_pruning_saves_the_stock_architecture(name, per_layer, tmp_path):
    model = make_family(name)
    pruned, result = prune(model, calib(), CompConfig(ratio=0.2, granularity="layers"))
    assert pruned.config.num_hidden_layers < 6
    if per_layer:  # sliced with the blocks
        assert len(getattr(pruned.config, per_layer)) == pruned.config.num_hidden_layers
    reloaded = save_and_reload(pruned, tmp_path / name)
    assert type(reloaded) is getattr(transformers, FAMILIES[name][1])
    assert reloaded.config.model_type == name
    assert max_diff(pruned, reloaded) <= TOL
    assert same_generation(pruned, reloaded)


def test_shortgpt_on_a_fused_family_saves_stock(tmp_path):
    model = make_family("falcon")
    pruned, _ = run_method("shortgpt", model)
    assert pruned.config.num_hidden_layers < 6
    reloaded = save_and_reload(pruned, tmp_path / "falcon")
    assert type(reloaded) is transformers.FalconForCausalLM
    assert max_diff(pruned, reloaded) <= TOL


@pytest.mark.parametrize("name", ["gpt_neox", "falcon", "gemma3_text"])
def test_flap_prunes_fused_and_gemma_layouts_and_reloads(name, tmp_path):
    model = make_family(name)
    pruned, _ = run_method("flap", model)
    reloaded = save_and_reload(pruned, tmp_path / name)
    assert max_diff(pruned, reloaded) <= TOL


@pytest.mark.parametrize("name", ["phi3", "olmo2"])
def test_flap_refuses_families_whose_heads_cannot_go(name):
    model = make_family(name)
    with pytest.raises(UnsupportedModelError, match="cannot lose exactly"):
        run_method("flap", model)


@pytest.mark.parametrize("name", ["gpt_neox", "falcon-grouped", "gemma2"])
def test_comp_whole_unit_o_pruning_through_fused_layouts(name, tmp_path):
    """``o_granularity='units'``: o_proj loses whole attention units with their q/k/v rows, wherever the
    layout keeps them; the export reloads exactly."""
    model = _head_case(name)
    pruned, _ = prune(model, calib(), CompConfig(ratio=0.2, o_granularity="units"))
    adapter = get_adapter(pruned)
    heads = [adapter.head_counts(b, head_dim_of(pruned.config))[0] for b in adapter.blocks(pruned)]
    if name != "gemma2":  # measured: units go in blocks 2-4 (gemma2 keeps every unit at 20 %)
        assert min(heads) < 4
    reloaded = save_and_reload(pruned, tmp_path / name)
    assert max_diff(pruned, reloaded) <= TOL
    assert same_generation(pruned, reloaded)

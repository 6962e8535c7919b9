"""comp_core.models.surgery: pruned linears compute what the masked dense computes, with fewer parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from comp_core.math.magnitude import cumulative_scales
from comp_core.models.adapters import REGISTRY, UnsupportedModelError, get_adapter
from comp_core.models.surgery import (IndexedInputLinear, add_output_bias, check_stream_rescale, input_index_of,
                                      prune_inputs, prune_outputs, rescale_outputs)

from tests.helpers import ARCHS, make_calib, make_tiny_model


def _linear(d_in: int = 12, d_out: int = 5, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def _x(d_in: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False])
def test_pruned_inputs_give_the_masked_dense_output(bias):
    dense = _linear(bias=bias)
    keep = torch.tensor([0, 2, 3, 7, 11])
    pruned = prune_inputs(dense, keep)
    assert isinstance(pruned, IndexedInputLinear)
    assert pruned.weight.shape == (5, 5) and pruned.in_features == 12 and pruned.out_features == 5
    mask = torch.zeros(12)
    mask[keep] = 1.0
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), F.linear(x * mask, dense.weight, dense.bias), rtol=1e-6, atol=1e-6)
    assert sum(p.numel() for p in pruned.parameters()) == 5 * 5 + (5 if bias else 0)


def test_a_scale_is_folded_into_the_kept_columns_and_a_new_weight_replaces_them():
    dense = _linear()
    keep = torch.tensor([1, 4, 5, 9])
    scale = torch.tensor([0.5, 2.0, -1.0, 1.5])
    x = _x()
    full_scale = torch.zeros(12)
    full_scale[keep] = scale
    with torch.no_grad():
        torch.testing.assert_close(prune_inputs(dense, keep, scale=scale)(x),
                                   F.linear(x * full_scale, dense.weight, dense.bias), rtol=1e-6, atol=1e-6)
        new_weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(prune_inputs(dense, keep, new_weight=new_weight)(x),
                                   F.linear(x[..., keep], new_weight, dense.bias), rtol=1e-6, atol=1e-6)


def test_pruning_twice_composes_the_index_and_keeping_everything_stays_a_plain_linear():
    dense = _linear()
    once = prune_inputs(dense, torch.tensor([0, 3, 4, 6, 8, 10]))
    twice = prune_inputs(once, torch.tensor([1, 2, 5]))  # positions in ``once``'s weight: originals 3, 4, 10
    assert torch.equal(input_index_of(twice), torch.tensor([3, 4, 10]))
    mask = torch.zeros(12)
    mask[[3, 4, 10]] = 1.0
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(twice(x), F.linear(x * mask, dense.weight, dense.bias), rtol=1e-6, atol=1e-6)
    whole = prune_inputs(dense, torch.arange(12))
    assert type(whole) is nn.Linear and torch.equal(whole.weight, dense.weight)


def test_pruned_outputs_are_the_kept_rows_and_an_output_bias_is_added():
    dense = _linear(bias=False)
    keep = torch.tensor([0, 3, 4])
    x = _x()
    rows = prune_outputs(dense, keep)
    with torch.no_grad():
        full = dense(x)
        torch.testing.assert_close(rows(x), full[..., keep], rtol=1e-6, atol=1e-6)
        delta = torch.tensor([0.25, -1.0, 2.0])
        add_output_bias(rows, delta)
        torch.testing.assert_close(rows(x), full[..., keep] + delta, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- Prune&Comp's fold (rescale_outputs)

def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _close(a, b, rel=1e-5):
    """max |a − b| within ``rel`` of max |b|: the logits agree up to the norms' eps."""
    assert float((a - b).abs().max()) <= rel * float(b.abs().max())


def _tiny(arch: str):
    """The tiny model with its norms' eps shrunk to 1e-12: its random residual stream is only ~0.02 wide, where
    the default eps (1e-6 / 1e-5 against a mean square of ~4e-4) would itself shift the logits by ~1e-3 under
    a rescaled stream; trained models' streams are orders of magnitude wider."""
    model = make_tiny_model(arch)
    for module in model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 1e-12)
    return model


def _folded(model, scales: dict[int, float]):
    """Our form: kept block k's output projections divided by the product of the scales of the gaps before it."""
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    kept = [i for i in range(len(blocks)) if i not in scales]
    for k, factor in cumulative_scales(kept, scales).items():
        rescale_outputs(blocks[k], adapter, 1.0 / factor)
    adapter.keep_blocks(model, kept)
    return model


def _paper_form(model, scales_in_order: list[tuple[int, float]]):
    """Prune&Comp's own fold (``magcomp.fuse_scale``), one removal at a time: embeddings and the o/down
    projections of every block before the removed one multiplied by its scale."""
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    with torch.no_grad():
        for removed, s in scales_in_order:
            model.model.embed_tokens.weight.mul_(s)
            for block in blocks[:removed]:
                block.self_attn.o_proj.weight.mul_(s)
                block.mlp.down_proj.weight.mul_(s)
    adapter.keep_blocks(model, [i for i in range(len(blocks)) if i not in dict(scales_in_order)])
    return model


@pytest.mark.parametrize("removals", [[(3, 1.37)], [(2, 1.2), (4, 0.8)], [(4, 1.5), (1, 1.1), (2, 1.3)]])
def test_folding_one_over_s_into_later_blocks_gives_the_logits_of_the_papers_form(removals):
    """On an untied pre-norm Llama, multiplying the embeddings and every earlier o/down by s (the paper) and
    dividing every later o/down by the scales before it (ours, which leaves tied embeddings alone) agree, also
    with several gaps found in any order."""
    ids = make_calib()[:2]
    assert not make_tiny_model("llama").config.tie_word_embeddings
    paper = _paper_form(_tiny("llama"), removals)
    ours = _folded(_tiny("llama"), dict(removals))
    _close(_logits(ours, ids), _logits(paper, ids))
    plain = _tiny("llama")
    get_adapter(plain).keep_blocks(plain, [i for i in range(6) if i not in dict(removals)])
    assert float((_logits(plain, ids) - _logits(paper, ids)).abs().max()) > 1e-3  # the scales do change it


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_scale_equals_multiplying_the_stream_at_the_gap(arch):
    """Every tiny architecture: block 2 removed and the stream entering block 3 multiplied by s (a pre-hook)
    gives the logits of the folded model (biases scaled too: OPT)."""
    ids, s = make_calib()[:2], 1.6
    hooked = _tiny(arch)
    adapter = get_adapter(hooked)
    next_block = adapter.blocks(hooked)[3]

    def scale(_module, args, kwargs):
        if args:
            return (args[0] * s, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}

    next_block.register_forward_pre_hook(scale, with_kwargs=True)
    adapter.keep_blocks(hooked, [0, 1, 3, 4, 5])
    _close(_logits(_folded(_tiny(arch), {2: s}), ids), _logits(hooked, ids))


def test_rescale_outputs_scales_weights_and_biases_of_pruned_writers_too():
    model = make_tiny_model("opt")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    block.fc2 = prune_inputs(block.fc2, torch.arange(0, 128, 2))
    before = {n: (adapter.dense(block, n).weight.clone(), adapter.dense(block, n).bias.clone())
              for n in ("self_attn.out_proj", "fc2")}
    others = block.fc1.weight.clone()
    rescale_outputs(block, adapter, 0.5)
    for name, (w, b) in before.items():
        assert torch.equal(adapter.dense(block, name).weight, w * 0.5)
        assert torch.equal(adapter.dense(block, name).bias, b * 0.5)
    assert torch.equal(block.fc1.weight, others)


def test_rescaling_is_refused_where_the_stream_is_not_read_through_scale_invariant_norms():
    for model_type in ("gemma2", "gemma3_text", "olmo2"):
        with pytest.raises(UnsupportedModelError, match="layer_rescale.*normalises the attention and MLP outputs"):
            check_stream_rescale(nn.Module(), REGISTRY[model_type])
    post_norm = make_tiny_model("opt", do_layer_norm_before=False)
    adapter = get_adapter(post_norm)
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before=False"):
        rescale_outputs(adapter.blocks(post_norm)[0], adapter, 2.0)
    for arch in ARCHS:  # the pre-norm ones pass
        model = make_tiny_model(arch)
        check_stream_rescale(get_adapter(model).blocks(model)[0], get_adapter(model))

"""comp_core.models.surgery: pruned linears compute what the masked dense computes, with fewer parameters."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from comp_core.models.surgery import (IndexedInputLinear, add_output_bias, input_index_of, prune_inputs,
                                      prune_outputs)


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

"""comp_core.models.structure: attention units (whole heads, or KV groups under GQA), their rows and columns,
and which dense is which in a block."""
from __future__ import annotations

import pytest
import torch

from comp_core import get_adapter
from comp_core.models.structure import (AttentionUnits, attention_unit_params, attention_units, dense_by_kind,
                                        mlp_consumer, mlp_width)

from tests.helpers import make_tiny_model


def test_grouped_units_are_kv_groups_with_their_query_heads():
    units = AttentionUnits(heads=4, kv_heads=2, head_dim=3)
    assert units.grouped and units.group == 2 and units.count == 2 and units.query_heads_per_unit == 2
    assert units.column_units().tolist() == [0] * 6 + [1] * 6  # heads 0, 1 → unit 0; heads 2, 3 → unit 1
    assert units.q_rows(torch.tensor([1])).tolist() == list(range(6, 12))
    assert units.kv_rows(torch.tensor([1])).tolist() == [3, 4, 5]


def test_ungrouped_units_are_single_heads():
    units = AttentionUnits(heads=4, kv_heads=4, head_dim=2)
    assert not units.grouped and units.count == 4 and units.query_heads_per_unit == 1
    assert units.column_units().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert units.q_rows(torch.tensor([0, 3])).tolist() == [0, 1, 6, 7]
    assert units.kv_rows(torch.tensor([0, 3])).tolist() == [0, 1, 6, 7]


@pytest.mark.parametrize("arch, heads, kv_heads", [("llama", 4, 2), ("opt", 4, 4)])
def test_a_tiny_block_has_the_units_and_sizes_of_its_config(arch, heads, kv_heads):
    model = make_tiny_model(arch)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    units = attention_units(block, adapter, head_dim=16)
    assert (units.heads, units.kv_heads, units.head_dim) == (heads, kv_heads, 16)
    kinds = dense_by_kind(adapter)
    assert {"q", "k", "v", "o", "down"} <= set(kinds)
    assert mlp_consumer(adapter) == kinds["down"]
    assert mlp_width(block, adapter) == 128
    # one unit: q rows and o columns of its query heads, k and v rows of its KV head (biases included)
    q_heads = heads // units.count
    bias = 1 if arch == "opt" else 0
    expected = q_heads * 16 * (64 + bias) + 2 * 16 * (64 + bias) + q_heads * 16 * 64
    assert attention_unit_params(block, adapter, units) == expected

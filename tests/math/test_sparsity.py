"""comp_core.math.sparsity: sparsity patterns (a fraction or N:M) and the masks that hold them."""
from __future__ import annotations

import pytest
import torch

from torch import nn

from comp_core.math.sparsity import SparsityPattern, holds_pattern, matrix_mask, nm_mask, row_mask, zero_counts


def test_pattern_parsing():
    assert SparsityPattern.parse("2:4") == SparsityPattern(0.5, 2, 4)
    assert SparsityPattern.parse("0.6").fraction == 0.6 and not SparsityPattern.parse("0.6").is_nm
    for bad in ("4:2", "1.5", "x", "2:x", "0:4"):
        with pytest.raises(ValueError):
            SparsityPattern.parse(bad)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_hold_exactly_n_of_every_m(n, m):
    scores = torch.rand(7, 32, generator=torch.Generator().manual_seed(n * m))
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(7, 32 // m, m).sum(-1) == n).all()
    # the pruned ones are the lowest of their group
    groups, pruned = scores.reshape(7, -1, m), mask.reshape(7, -1, m)
    assert (groups.masked_fill(~pruned, -1).amax(-1) <= groups.masked_fill(pruned, 2).amin(-1)).all()
    assert holds_pattern(mask, SparsityPattern(n / m, n, m))


def test_row_and_matrix_masks():
    scores = torch.arange(24.0).reshape(4, 6).flip(1)
    assert (row_mask(scores, 0.5).sum(1) == 3).all()
    assert row_mask(scores, 0.5)[:, 3:].all()
    mask = matrix_mask(torch.arange(24.0).reshape(4, 6), 0.25)
    assert mask.sum() == 6 and mask[0].all()


def test_zero_counts_of_all_parameters_and_of_the_blocks():
    embedding, block = nn.Embedding(10, 4), nn.Linear(4, 4, bias=False)  # 40 outside the block, 16 inside
    model = nn.ModuleDict({"embedding": embedding, "block": block})
    with torch.no_grad():
        embedding.weight.fill_(1.0)
        block.weight.fill_(1.0)
        block.weight[:2] = 0.0  # 8 of the block's 16 weights
    counts = zero_counts(model, [block], [block])
    assert counts["linear_sparsity"] == 0.5 and counts["zeros"] == 8 and counts["params"] == 56
    assert counts["zero_share"] == pytest.approx(8 / 56) and counts["block_zero_share"] == 0.5
    assert "block_zero_share" not in zero_counts(model, [block])  # no blocks named: not measured

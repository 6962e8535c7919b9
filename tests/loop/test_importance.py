"""comp_core.loop.importance: block importances (mean 1 − cos between a block's input and output), measured
during the capture forward or by replaying the blocks, and how many blocks a ratio removes."""
from __future__ import annotations

import pytest
import torch

from comp_core import get_adapter
from comp_core.loop.capture import calibration_context
from comp_core.loop.importance import ImportanceTally, capture_with_importances, cosine_importance, layer_importances

from tests.helpers import ARCHS, N_LAYERS

by_arch = pytest.mark.parametrize("arch", ARCHS)


@by_arch
def test_capture_measures_the_layer_importances_a_replay_would(arch, tiny_model, calib):
    """The capture forward's importances (no pass of their own) equal those of replaying every block."""
    adapter = get_adapter(tiny_model)
    blocks = list(adapter.blocks(tiny_model))
    with calibration_context(tiny_model):
        inputs, fused = capture_with_importances(tiny_model, adapter, calib, batch_size=3)
        replayed = layer_importances(blocks, list(range(len(blocks))), inputs)
    assert sorted(fused) == list(range(N_LAYERS))
    for i in range(N_LAYERS):
        assert 0.0 < fused[i] < 2.0
        assert fused[i] == pytest.approx(replayed[i], rel=1e-6, abs=1e-9), i
    assert len(set(round(v, 9) for v in fused.values())) > 1  # real, layer-specific measurements
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_model.modules())



def test_cosine_importance_is_the_summed_one_minus_cosine_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)  # (batch, seq, d): 6 tokens
    assert cosine_importance(x, x)[1] == 6 and cosine_importance(x, x)[0] == pytest.approx(0.0, abs=1e-5)
    assert cosine_importance(x, -x)[0] == pytest.approx(12.0, rel=1e-6)  # 1 − (−1) per token
    assert cosine_importance(x, 3.0 * x)[0] == pytest.approx(0.0, abs=1e-5)  # scale-free
    y = torch.randn(2, 3, 8, generator=g)
    flat_x, flat_y = x.reshape(-1, 8).double(), y.reshape(-1, 8).double()
    expected = float((1 - (flat_x * flat_y).sum(1) / (flat_x.norm(dim=1) * flat_y.norm(dim=1))).sum())
    assert cosine_importance(x, y)[0] == pytest.approx(expected, rel=1e-5)


def test_importance_tally_averages_over_every_token_of_every_batch():
    g = torch.Generator().manual_seed(1)
    tally = ImportanceTally()
    a, b = torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)
    tally.add(3, a, a)  # 4 tokens, 0 each
    tally.add(3, b, -b)  # 2 tokens, 2 each
    tally.add(1, a, -a)
    importances = tally.importances()
    assert list(importances) == [1, 3]
    assert importances[3] == pytest.approx(4.0 / 6, rel=1e-6) and importances[1] == pytest.approx(2.0, rel=1e-6)

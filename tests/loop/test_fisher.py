"""comp_core.loop.fisher: the Fisher score reads the denses of an already pruned source in their own coordinates."""
from __future__ import annotations

import pytest
import torch

from comp_core import CompConfig, prune
from comp_core.models.adapters import get_adapter


def test_fisher_scores_a_model_that_is_already_pruned(pruned_once):
    from comp_core.loop.fisher import collect_fisher

    pruned, calib, indexed = pruned_once
    adapter = get_adapter(pruned)
    scores = collect_fisher(pruned, adapter, calib[:2], sorted(indexed))
    for (layer, name), value in scores.items():
        assert value.numel() == adapter.dense(adapter.blocks(pruned)[layer], name).weight.shape[1], (layer, name)
    again, result = prune(pruned, calib, CompConfig(ratio=0.1, remove_layers=0, score="fisher"))
    assert result.realised_ratio == pytest.approx(0.1, abs=0.01)
    with torch.no_grad():
        assert torch.isfinite(again(calib[:1]).logits).all()

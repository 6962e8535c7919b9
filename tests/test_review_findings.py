"""Review findings of issue 19 on an already pruned source: the Fisher score and the neuron maps read its
denses in the right coordinates (the mask path's damping is covered in tests/test_properties.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comp_core import CompConfig, analyze, prune
from comp_core.models.adapters import get_adapter
from comp_core.models.surgery import IndexedInputLinear
from comp_core.methods.comp.whatif import neuron_maps

from tests.helpers import make_calib, make_tiny_model


@pytest.fixture(scope="module")
def pruned_once():
    model, calib = make_tiny_model("llama"), make_calib()
    pruned, _ = prune(model, calib, CompConfig(ratio=0.2, remove_layers=0))
    indexed = {i: block.self_attn.o_proj for i, block in enumerate(get_adapter(pruned).blocks(pruned))
               if isinstance(block.self_attn.o_proj, IndexedInputLinear)}
    assert indexed, "the first pruning should leave o_proj reading only some of its inputs"
    return pruned, calib, indexed


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


def test_neuron_map_puts_scores_and_cuts_of_a_pruned_source_in_original_coordinates(pruned_once):
    pruned, calib, indexed = pruned_once
    plan = analyze(pruned, calib, CompConfig(ratio=0.1, remove_layers=0))
    scores, cut = neuron_maps(plan)["o"]
    for layer, o_proj in indexed.items():
        kept = np.zeros(scores.shape[1], dtype=bool)
        kept[o_proj.input_index.numpy()] = True
        assert np.isfinite(scores[layer, kept]).all()  # every input it still reads has its score there
        assert np.isnan(scores[layer, ~kept]).all()  # the inputs the first pruning removed have none
        assert not cut[layer, ~kept].any()  # and cannot be cut again
        assert cut[layer].sum() == next(d.n_removed for d in plan.dense_reports if d.layer == layer and d.kind == "o")

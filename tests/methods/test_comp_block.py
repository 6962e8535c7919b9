"""COMP's block step in its named parts (``comp_core.methods.comp.block``): one ``DenseStep`` record per measured
dense, the cuts placed on them, the compensation's reports, and ``prune_block`` as their composition."""
from __future__ import annotations

import pytest
import torch

from comp_core import CompConfig, get_adapter
from comp_core.loop.blocks import block_loop
from comp_core.loop.capture import calibration_context, capture_block_inputs
from comp_core.loop.stats import own_gram
from comp_core.math.mask_tuning import coefficient_matrix
from comp_core.math.linalg import damped
from comp_core.methods.comp.block import (DenseStep, choose_block_cuts, compensate, dense_shapes, max_cuts,
                                          place_cuts, prunable_denses, prune_block, score_denses)

from tests.helpers import make_calib, make_tiny_model

LAYER = 2


def _block_stats(cfg: CompConfig):
    """A tiny llama, its block ``LAYER`` and that block's input statistics for the prunable denses."""
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    seen = {}

    def visit(v):
        if v.index == LAYER:
            seen.update(v.stats)
        return None

    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=4)
        block_loop(blocks, inputs, range(LAYER + 1), visit, adapter=adapter, with_stats=lambda i: i == LAYER,
                   stat_denses=prunable_denses(adapter, cfg))
    return model, adapter, blocks[LAYER], seen


def test_score_denses_keeps_one_record_per_prunable_dense():
    cfg = CompConfig(ratio=0.3, score="diag")
    _, adapter, block, stats = _block_stats(cfg)
    shapes = dense_shapes(block, adapter)
    caps = max_cuts(shapes, adapter, cfg)
    steps = score_denses(block, adapter, stats, cfg, budget=10_000, caps=caps, units=None, fisher=None)
    assert list(steps) == ["self_attn.o_proj", "mlp.down_proj"]  # the default dense kinds, in block order
    for name, step in steps.items():
        assert isinstance(step, DenseStep)
        d_in = adapter.dense(block, name).weight.shape[1]
        assert step.scores.shape == (d_in,) and step.gram.shape == (d_in, d_in)
        assert torch.equal(torch.sort(step.order).values, torch.arange(d_in))  # a permutation, least important first
        assert torch.all(step.scores[step.order].diff() >= 0)
        cap = caps[[d.name for d in adapter.denses].index(name)]
        assert step.path is not None and step.path.variance.numel() == cap + 1
        # the "diag" score is the diagonal of the damped mask-tuning matrix C = (WᵀW) ⊙ G + εI
        module = adapter.dense(block, name)
        coeff = damped(coefficient_matrix(module.weight, own_gram(module, stats[name].gram)), cfg.damp)
        torch.testing.assert_close(step.scores, coeff.diagonal())
        assert step.n_removed == 0 and step.keep is None and step.cross is None and step.target is None


def test_cuts_and_compensation_fill_the_records_and_prune_block_composes_them():
    cfg = CompConfig(ratio=0.3, refit="never")
    _, adapter, block, stats = _block_stats(cfg)
    params = sum(p.numel() for p in block.parameters())
    shapes = dense_shapes(block, adapter)
    caps = max_cuts(shapes, adapter, cfg)
    budget = int(round(0.3 * params))
    steps = score_denses(block, adapter, stats, cfg, budget=budget, caps=caps, units=None, fisher=None)
    cut = choose_block_cuts(steps, shapes, budget, caps, cfg, adapter, None)
    removed = place_cuts(steps, cut, adapter, shapes, None)
    assert set(removed) == {d.name for d in adapter.denses}
    assert sum(removed.values()) > 0
    for name, step in steps.items():
        d_in = adapter.dense(block, name).weight.shape[1]
        assert step.n_removed == removed[name]
        assert step.keep.numel() == d_in - step.n_removed
        assert not set(step.keep.tolist()) & set(step.order[:step.n_removed].tolist())
    reports = [compensate(s, steps, removed, shapes, adapter, stats, cfg, LAYER) for s in steps.values()]
    for report in reports:
        if report.n_removed:
            assert report.compensation == "mask" and report.mask.numel() == report.d_in - report.n_removed
            assert report.mask_variance == pytest.approx(float(report.mask.double().var(unbiased=False)), rel=1e-5)
            assert report.error_tuned <= report.error_no_tuning + 1e-12
        else:
            assert report.mask_variance is None and report.mask is None

    layer, composed = prune_block(block, adapter, stats, 0.3, cfg, layer_index=LAYER, apply=True)
    assert [(d.name, d.n_removed, d.pruned_index.tolist()) for d in composed] == \
        [(d.name, d.n_removed, d.pruned_index.tolist()) for d in reports]
    assert layer.removed_params == cut.removed_params == params - sum(p.numel() for p in block.parameters())
    assert layer.tau == cut.tau and layer.sparsity is None

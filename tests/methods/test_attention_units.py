"""COMP with o_proj pruned in whole attention units (``CompConfig.o_granularity="units"``, issue 15's heads
lever): heads, or KV groups under grouped-query attention, go with their q/k/v rows, and the layer still lands
on its budget because the fine denses take the rest (``allocation.choose_cuts_with_units``)."""
from __future__ import annotations

import itertools

import pytest
import torch

from comp_core import CompConfig, count_parameters, get_adapter, prune
from comp_core.math.allocation import DenseShape, choose_cuts_with_units, removed_parameters
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.methods.comp import analyze, apply_plan
from comp_core.methods.comp.block import _unit_order
from comp_core.models.structure import AttentionUnits, dense_by_kind

from tests.helpers import make_calib, make_tiny_model


def _curve(generator: torch.Generator, n: int) -> torch.Tensor:
    v = torch.rand(n, generator=generator, dtype=torch.float64).cumsum(0)
    v[0] = 0.0
    return v


@pytest.mark.parametrize("seed", range(8))
def test_units_then_fine_neurons_land_on_the_smallest_threshold(seed):
    generator = torch.Generator().manual_seed(seed)
    # dense 0: 3 units of 100 parameters each; dense 1: 40 neurons of 7 parameters (no coupling)
    shapes = [DenseShape(d_out=100, d_in=3, has_bias=False), DenseShape(d_out=7, d_in=40, has_bias=False)]
    variances = [_curve(generator, 3), _curve(generator, 31)]  # caps: 2 units, 30 neurons
    budget = int(torch.randint(50, 400, (1,), generator=generator))
    cut = choose_cuts_with_units(variances, shapes, budget, unit_dense=0)
    assert cut.removed_params == removed_parameters(shapes, cut.removed_inputs) >= budget
    # brute force over every feasible pair whose units fit in the budget (a unit never overshoots it):
    # the smallest threshold max(runmax_u[k_u], runmax_f[k_f])
    run = [torch.cummax(v, 0).values for v in variances]
    feasible = [(max(float(run[0][ku]), float(run[1][kf])), ku, kf)
                for ku, kf in itertools.product(range(3), range(31))
                if removed_parameters(shapes, [ku, kf]) >= budget and 100 * ku <= budget]
    best = min(t for t, _, _ in feasible)
    assert cut.tau == pytest.approx(best)
    # and it does not overshoot by a unit: within one fine neuron, unless the fine denses cannot take the rest
    if removed_parameters(shapes, [cut.removed_inputs[0], 30]) >= budget:
        assert cut.removed_params - budget < 7


def test_unit_order_puts_whole_units_first_by_their_summed_score():
    units = AttentionUnits(heads=4, kv_heads=2, head_dim=3)  # 2 units of 6 columns
    scores = torch.tensor([5.0, 5, 5, 5, 5, 5, 1, 9, 1, 1, 1, 1])  # unit 1 sums to 14 < 30
    order = _unit_order(scores, units)
    assert sorted(order[:6].tolist()) == list(range(6, 12))
    assert order[5].item() == 7  # inside a unit: least important column first, the strongest last


def _attention(model):
    adapter = get_adapter(model)
    names = dense_by_kind(adapter)
    return [(adapter.dense(b, names["q"]).out_features, adapter.dense(b, names["k"]).out_features,
             adapter.dense(b, names["o"]).in_features) for b in adapter.blocks(model)]


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_units_prune_whole_heads_with_their_rows_and_reload_exactly(arch, tmp_path):
    model, calib = make_tiny_model(arch), make_calib()
    cfg = CompConfig(ratio=0.2, o_granularity="units", refit="never")
    pruned, result = prune(model, calib, cfg)
    realised = 1 - count_parameters(pruned) / count_parameters(model)
    assert realised == pytest.approx(0.2, abs=0.003)
    head_dim, heads = 16, 4
    unit_width = head_dim * (2 if arch == "llama" else 1)  # a KV group of 2 heads (GQA) / one head (MHA)
    shapes = _attention(pruned)
    for q_rows, k_rows, o_cols in shapes:
        assert q_rows == o_cols and q_rows % unit_width == 0
        assert k_rows == (q_rows // 2 if arch == "llama" else q_rows)  # the grouping stays uniform
    assert any(q < heads * head_dim for q, _, _ in shapes), "no block lost a unit: the test proves nothing"
    x = calib[:2]
    with torch.no_grad():
        expected = pruned(x).logits
    folder = save_pruned(pruned, None, tmp_path / "m", result)
    reloaded, _ = load_pruned(folder)
    with torch.no_grad():
        assert float((reloaded(x).logits - expected).abs().max()) <= 1e-5
    # the analysis applied later gives the same model
    again, _ = apply_plan(model, analyze(model, calib, cfg))
    with torch.no_grad():
        assert float((again(x).logits - expected).abs().max()) == 0.0


def test_units_need_the_variance_allocation():
    with pytest.raises(ValueError, match="variance"):
        CompConfig(o_granularity="units", allocation="uniform")
    with pytest.raises(ValueError, match="o_granularity"):
        CompConfig(o_granularity="heads")

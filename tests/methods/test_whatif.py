"""comp_core.methods.comp.whatif: one analysis, instant re-planning — checked against the core's own plans on a tiny Llama."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comp_core import CompConfig, analyze, count_parameters
from comp_core.methods import prune_with
from comp_core.methods.comp.whatif import (analyze_nearest, changed_settings, feasible_ratio, measure_deeper, neuron_maps,
                                          removal_path,
                              stale_reasons, what_if)
from tests.helpers import make_calib, make_tiny_model


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def samples():
    return make_calib()[:4]


@pytest.fixture(scope="module")
def plan(model, samples):
    torch.set_num_threads(1)
    plan, ratio = analyze_nearest(model, samples, CompConfig(ratio=0.3, remove_layers=1), depth=3)
    assert ratio == 0.3
    return plan


def test_analysis_leaves_the_model_untouched(model, samples):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = count_parameters(model)
    analyze_nearest(model, samples, CompConfig(ratio=0.3, remove_layers=1), depth=2)
    assert count_parameters(model) == n_params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_plan_matches_the_core_and_the_removal_order_goes_deeper(plan, model, samples):
    core = analyze(model, samples, CompConfig(ratio=0.3, remove_layers=1))
    assert plan.removed_layers == core.removed_layers
    assert plan.layer_ratios == pytest.approx(core.layer_ratios)
    assert plan.planned_params_after == core.planned_params_after
    assert len(plan.removal.removal_order) == 3 and plan.removal.removal_order[:1] == core.removal_order
    assert len(plan.removal.history) == 4


def test_what_if_at_the_analysed_settings_is_the_plan(plan):
    w = what_if(plan, 0.3, 1)
    assert not w.message and w.exact
    assert w.removed == plan.removed_layers
    assert w.layer_ratios == pytest.approx(plan.layer_ratios)
    assert w.planned_ratio == pytest.approx(0.3, abs=1e-5)  # within a parameter or two


@pytest.mark.parametrize("n_remove", [0, 2, 3])
def test_what_if_other_layer_counts_match_fresh_core_plans(plan, model, samples, n_remove):
    ratio = 0.45
    w = what_if(plan, ratio, n_remove)
    if w.message:  # e.g. every prunable layer removed: the core refuses too
        with pytest.raises(ValueError):
            analyze(model, samples, CompConfig(ratio=ratio, remove_layers=n_remove))
        return
    core = analyze(model, samples, CompConfig(ratio=ratio, remove_layers=n_remove))
    assert w.removed == core.removed_layers
    assert w.layer_ratios == pytest.approx(core.layer_ratios)


def test_what_if_explains_instead_of_raising(plan):
    deeper = what_if(plan, 0.6, 4)
    assert "cannot remove 4" in deeper.message and not deeper.layer_ratios  # 4 > the 3 unprotected layers
    impossible = what_if(plan, 0.79, 1)
    assert "impossible" in impossible.message and not impossible.layer_ratios
    first = plan.removal.removal_order[0]
    changed = what_if(plan, 0.3, 1, [0, 5, first])
    assert not changed.exact and "Analyse" in changed.message


def test_what_if_needs_a_measured_removal_order(model, samples):
    _, result = prune_with("comp", model, samples, ratio=0.2)
    result.plan.removal = None
    with pytest.raises(ValueError, match="removal"):
        what_if(result.plan, 0.2, 1)


def test_removal_path_replays_compatible_protected_sets(plan):
    removal = plan.removal  # measured with layers 0, 1 and 5 protected
    order = removal.removal_order
    assert removal_path(removal, 3, {0, 1, 5}) == (order, True)
    # protecting a layer that is not among the first n victims leaves those victims unchanged
    assert removal_path(removal, 1, {0, 1, 5, order[1]}) == (order[:1], True)
    # unprotecting layer 1 changes the path exactly when layer 1 would have been the least important
    first = removal.history[0]
    would_pick = min((i for i in first if i not in {0, 5}), key=first.get)
    victims, exact = removal_path(removal, 1, {0, 5})
    assert exact == (would_pick == order[0])


def test_unreachable_ratio_is_moved_to_the_nearest_reachable_plan(model, samples):
    plan, ratio = analyze_nearest(model, samples, CompConfig(ratio=0.79, remove_layers=1), depth=2)
    assert 0.1 < ratio < 0.79  # down + o inputs capped at 90 % cannot reach 79 %
    assert plan.config["ratio"] == ratio and plan.planned_ratio == pytest.approx(ratio, abs=1e-3)
    assert plan.removed_layers == plan.removal.removal_order[:1]
    assert "impossible" in what_if(plan, 0.79, 1).message
    assert feasible_ratio(0.5, [1], [], [10] * 3, 100, [0.9] * 3) == pytest.approx(0.1, abs=1e-6)
    assert feasible_ratio(0.99, [], [1, 2], [10] * 3, 100, [0.5] * 3) < 0.1  # capped neuron pruning


def test_what_if_removes_no_more_layers_than_the_target_holds(plan, model, samples):
    w = what_if(plan, 0.05, 2)  # one block of this tiny model is ~13 % of it
    core = analyze(model, samples, CompConfig(ratio=0.05, remove_layers=2))
    assert w.removed == core.removed_layers
    assert w.layer_ratios == pytest.approx(core.layer_ratios)
    assert (w.n_remove < 2) == ("holds only" in w.note)


def test_stale_reasons_name_what_what_if_cannot_cover():
    analysed = CompConfig(ratio=0.3, remove_layers=1)
    same = CompConfig(ratio=0.5, remove_layers=3, protected=(0, 5))
    assert stale_reasons(analysed, same) == []
    other = CompConfig(ratio=0.3, remove_layers=1, score="obs", mask_tuning=False)
    assert stale_reasons(analysed, other) == ["importance score", "mask tuning"]
    assert stale_reasons(None, other) == []


def test_changed_settings_decide_whether_a_plan_applies():
    analysed = CompConfig(ratio=0.3, remove_layers=1, auto_max_layers=4)
    assert changed_settings(analysed, CompConfig(ratio=0.3, remove_layers=1, auto_max_layers=6)) == []
    assert changed_settings(analysed, CompConfig(ratio=0.3, remove_layers=1, dense_kinds=("o", "down"))) == []
    assert changed_settings(analysed, CompConfig(ratio=0.3, remove_layers=1, dense_kinds=None)) == [
        "prunable denses"]
    explicit = CompConfig(ratio=0.3, remove_layers=1, protected=(0, 1, 5))
    assert changed_settings(analysed, explicit) == ["protected layers"]
    assert changed_settings(analysed, explicit, n_layers=6) == []  # None means layers 0, 1 and 5 of six
    assert changed_settings(analysed, CompConfig(ratio=0.25, remove_layers=1, protected=(0, 5))) == [
        "target ratio", "protected layers"]
    assert changed_settings(analysed, CompConfig(ratio=0.3, remove_layers="auto")) == [
        "layers to remove", "auto sweep depth"]


def test_neuron_maps_shape_every_analysed_dense(plan):
    maps = neuron_maps(plan)
    assert set(maps) == {d.kind for d in plan.dense_reports}
    scores, pruned = maps["down"]
    assert scores.shape == (plan.n_layers, 128) and pruned.dtype == bool
    for layer in plan.removed_layers + plan.protected:
        assert np.isnan(scores[layer]).all() and not pruned[layer].any()
    report = plan.dense(next(iter(plan.layer_ratios)), "down")
    assert int(pruned[report.layer].sum()) == report.n_removed
    assert np.isfinite(scores[report.layer]).all()


# an already pruned source: the neuron maps read its denses in original coordinates


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


def test_measuring_deeper_goes_on_from_the_analysis_and_equals_a_deep_analysis(model, samples):
    """An analysis measures only its own plan's removals; a what-if over more layers measures the rest on demand,
    and gets the order and importances a deep analysis would have measured, without re-measuring the first steps."""
    cfg = CompConfig(ratio=0.3, remove_layers=1)
    shallow, _ = analyze_nearest(model, samples, cfg, depth=1)
    assert len(shallow.removal.removal_order) == 1
    assert what_if(shallow, 0.3, 3).message  # not measured yet: says so instead of guessing
    events = []
    deeper = measure_deeper(model, samples, shallow, 3, on_event=events.append)
    deep, _ = analyze_nearest(model, samples, cfg, depth=3)
    assert deeper.removal.removal_order == deep.removal.removal_order
    for got, want in zip(deeper.removal.history, deep.removal.history):
        assert got == pytest.approx(want, rel=1e-5)
    assert deeper.removal.history[:2] == shallow.removal.history  # the measured steps are kept as they were
    measured_steps = [e.step for e in events if e.stage == "layer-removal" and e.step < e.total]
    assert measured_steps == [2, 3]  # only the two new removals ran
    w = what_if(deeper, 0.5, 3)
    assert w.exact and w.removed == sorted(deep.removal.removal_order)  # the order is known now
    assert deeper.dense_reports is shallow.dense_reports  # neuron maps stay the analysed ones
    assert measure_deeper(model, samples, deeper, 2) is deeper  # already deep enough: nothing measured
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

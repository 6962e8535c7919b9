"""ui.whatif: one analysis, instant re-planning — checked against the core's own plans on a tiny Llama."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comp_core import CompConfig, analyze, count_parameters
from ui.whatif import feasible_ratio, removal_path, run_analysis, stale_reasons, what_if


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def samples():
    return torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def analysis(model, samples):
    return run_analysis(model, samples, CompConfig(ratio=0.3, remove_layers=1), depth=3)


def test_analysis_leaves_the_model_untouched(model, samples):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = count_parameters(model)
    run_analysis(model, samples, CompConfig(ratio=0.3, remove_layers=1), depth=2)
    assert count_parameters(model) == n_params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_plan_matches_the_core_and_the_removal_order_goes_deeper(analysis, model, samples):
    core = analyze(model, samples, CompConfig(ratio=0.3, remove_layers=1))
    assert analysis.plan.removed_layers == core.removed_layers
    assert analysis.plan.layer_ratios == pytest.approx(core.layer_ratios)
    assert analysis.plan.planned_params_after == core.planned_params_after
    assert analysis.depth == 3 and analysis.removal.removal_order[:1] == core.removal_order
    assert len(analysis.removal.history) == 4


def test_what_if_at_the_analysed_settings_is_the_plan(analysis):
    plan = what_if(analysis, 0.3, 1, None)
    assert not plan.message and plan.exact
    assert plan.removed == analysis.plan.removed_layers
    assert plan.layer_ratios == pytest.approx(analysis.plan.layer_ratios)
    assert plan.planned_ratio == pytest.approx(0.3, abs=1e-5)  # within a parameter or two


@pytest.mark.parametrize("n_remove", [0, 2, 3])
def test_what_if_other_layer_counts_match_fresh_core_plans(analysis, model, samples, n_remove):
    ratio = 0.45
    plan = what_if(analysis, ratio, n_remove, None)
    if plan.message:  # e.g. every prunable layer removed: the core refuses too
        with pytest.raises(ValueError):
            analyze(model, samples, CompConfig(ratio=ratio, remove_layers=n_remove))
        return
    core = analyze(model, samples, CompConfig(ratio=ratio, remove_layers=n_remove))
    assert plan.removed == core.removed_layers
    assert plan.layer_ratios == pytest.approx(core.layer_ratios)


def test_what_if_explains_instead_of_raising(analysis):
    deeper = what_if(analysis, 0.3, 4, None)
    assert deeper.message and not deeper.layer_ratios  # 4 > the 3 unprotected layers
    impossible = what_if(analysis, 0.79, 1, None)
    assert "impossible" in impossible.message and not impossible.layer_ratios
    first = analysis.removal.removal_order[0]
    changed = what_if(analysis, 0.3, 1, [0, 5, first])
    assert not changed.exact and "Analyse" in changed.message


def test_removal_path_replays_compatible_protected_sets(analysis):
    order = analysis.removal.removal_order  # measured with layers 0, 1 and 5 protected
    assert removal_path(analysis, 3, {0, 1, 5}) == (order, True)
    # protecting a layer that is not among the first n victims leaves those victims unchanged
    assert removal_path(analysis, 1, {0, 1, 5, order[1]}) == (order[:1], True)
    # unprotecting layer 1 changes the path exactly when layer 1 would have been the least important
    first = analysis.removal.history[0]
    would_pick = min((i for i in first if i not in {0, 5}), key=first.get)
    victims, exact = removal_path(analysis, 1, {0, 5})
    assert exact == (would_pick == order[0])


def test_unreachable_ratio_is_moved_for_the_neuron_maps(model, samples):
    analysis = run_analysis(model, samples, CompConfig(ratio=0.05, remove_layers=2), depth=2)
    assert analysis.plan_ratio > 0.05  # two removed layers alone exceed 5 %
    assert analysis.plan.removed_layers == sorted(analysis.removal.removal_order[:2])
    assert "impossible" in what_if(analysis, 0.05, 2, None).message
    assert feasible_ratio(0.5, [1], [], [10] * 3, 100, [0.9] * 3) == pytest.approx(0.1, abs=1e-6)


def test_stale_reasons_name_what_what_if_cannot_cover(analysis):
    same = CompConfig(ratio=0.5, remove_layers=3, protected=(0, 5))
    assert stale_reasons(analysis, same) == []
    other = CompConfig(ratio=0.3, remove_layers=1, score="obs", mask_tuning=False)
    assert stale_reasons(analysis, other) == ["importance score", "mask tuning"]

"""What-if re-allocation from a plan equals what a fresh analysis decides."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comp_core import CompConfig, ImpossibleRatioError, analyze, prune, reallocate


@pytest.fixture(scope="module")
def model_and_plan():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    samples = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    plan = analyze(model, samples, CompConfig(ratio=0.45, remove_layers=3, dense_kinds=None))
    return model, samples, plan


@pytest.mark.parametrize("ratio, n_remove", [(0.3, 0), (0.3, 1), (0.4, 2), (0.45, 3)])
def test_reallocate_matches_fresh_analysis(model_and_plan, ratio, n_remove):
    model, samples, plan = model_and_plan
    removed, ratios = reallocate(plan, ratio, n_remove)
    fresh = analyze(model, samples, CompConfig(ratio=ratio, remove_layers=n_remove, dense_kinds=None))
    assert removed == fresh.removed_layers
    assert ratios.keys() == fresh.layer_ratios.keys()
    for layer, value in ratios.items():
        assert value == pytest.approx(fresh.layer_ratios[layer], rel=1e-9)
    budget = ratio * plan.params_total - sum(plan.layer_params[i] for i in removed)
    assert sum(r * plan.layer_params[i] for i, r in ratios.items()) == pytest.approx(budget, rel=1e-9)


def test_reallocate_errors(model_and_plan):
    _, _, plan = model_and_plan
    with pytest.raises(ValueError, match="only 3 removals"):
        reallocate(plan, 0.3, 4)
    with pytest.raises(ImpossibleRatioError):
        reallocate(plan, 0.95, 0)
    with pytest.raises(ImpossibleRatioError):
        reallocate(plan, 0.01, 3)  # three removed layers alone exceed 1 %


def test_unknown_dense_kind_is_named(model_and_plan):
    model, samples, _ = model_and_plan
    with pytest.raises(ValueError, match="fc9.*q, k, v, o, gate, up, down"):
        analyze(model, samples, CompConfig(ratio=0.2, dense_kinds=("down", "fc9")))


def test_fisher_analysis_runs_on_the_layer_removed_model_and_restores_it(model_and_plan):
    model, samples, _ = model_and_plan
    blocks_before = list(model.model.layers)
    plan = analyze(model, samples, CompConfig(ratio=0.3, remove_layers=2, score="fisher", dense_kinds=None))
    assert list(model.model.layers) == blocks_before and model.config.num_hidden_layers == 8
    assert all(p.grad is None for p in model.parameters())
    scored = [d for d in plan.dense_reports if d.kind == "down"]
    assert scored and all(d.scores.shape == (128,) and bool((d.scores >= 0).all()) for d in scored)
    assert all(float(d.scores.sum()) > 0 for d in scored)


@pytest.mark.parametrize("refit, n_samples, expected", [("always", 6, "refit"), ("auto", 64, "refit"),
                                                          ("auto", 2, "mask"), ("never", 64, "mask")])
def test_refit_policy_follows_calibration_size(model_and_plan, refit, n_samples, expected):
    model, _, _ = model_and_plan
    samples = torch.randint(0, 512, (n_samples, 32), generator=torch.Generator().manual_seed(3))
    _, result = prune(model, samples, CompConfig(ratio=0.2, remove_layers=0, refit=refit, refit_tokens_per_input=8))
    pruned = [d for d in result.plan.dense_reports if d.n_removed > 0]
    assert pruned and all(d.compensation == expected for d in pruned)
    assert all(d.error_tuned <= d.error_no_tuning + 1e-9 for d in pruned)
    assert abs(result.realised_ratio - 0.2) <= 0.01

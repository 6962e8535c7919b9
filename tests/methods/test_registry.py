"""comp_core.methods.registry: what holds for every registered structured method through ``prune_with``."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import ARCHS, make_calib, make_tiny_model


@settings(max_examples=8, deadline=None, database=None)
@given(st.sampled_from(ARCHS), st.integers(0, 1000), st.sampled_from(["comp", "wanda-sp", "flap", "magnitude-sp"]))
def test_ratio_zero_is_the_identity(arch, seed, method):
    from comp_core.methods import make_settings, prune_with

    model = make_tiny_model(arch, seed=seed)
    calib = make_calib(seed)
    with torch.no_grad():
        before = model(calib[:2]).logits
    pruned, result = prune_with(method, model, calib, make_settings(method, ratio=0.0))
    with torch.no_grad():
        after = pruned(calib[:2]).logits
    assert result.realised_ratio == 0.0 and math.isclose(result.params_after, result.params_before)
    assert torch.equal(before, after)


# ------------------------------------------------------------------------------------ a ratio of the blocks

def _counts(model) -> tuple[int, int]:
    from comp_core.models.adapters import count_block_parameters
    from comp_core.runtime import count_parameters

    return count_parameters(model), count_block_parameters(model)


@pytest.mark.parametrize("method", ["comp", "wanda-sp", "flap", "shortgpt"])
def test_a_ratio_of_the_blocks_removes_that_share_of_the_blocks(method):
    from comp_core.methods import prune_with

    model, calib = make_tiny_model("llama"), make_calib()
    total, blocks = _counts(model)  # 287 552 and 221 952: 30 % of the blocks is 23.2 % of all
    pruned, result = prune_with(method, model, calib, ratio=0.3, ratio_of="blocks")
    assert result.plan.config["requested"] == {"ratio": 0.3, "ratio_of": "blocks"}
    assert result.plan.config["ratio"] == pytest.approx(0.3 * blocks / total)  # what the method ran with
    assert (result.block_params_before, result.block_params_after) == (blocks, _counts(pruned)[1])
    # everything removed was in the blocks: the two shares are one count over two totals
    assert result.realised_ratio * total == pytest.approx(result.realised_block_ratio * blocks, abs=1e-6)
    # within the method's granularity: a few parameters for the neuron methods, half a block for ShortGPT
    tolerance = 0.01 if method != "shortgpt" else result.plan.layer_params[0] / blocks / 2 + 1e-9
    assert abs(result.realised_block_ratio - 0.3) <= tolerance
    assert abs(result.realised_ratio - 0.3 * blocks / total) <= tolerance * blocks / total


def test_a_ratio_of_all_stays_the_default_and_the_blocks_share_is_reported_beside_it():
    from comp_core.methods import prune_with

    model, calib = make_tiny_model("llama", vocab_size=4096), make_calib()  # the embedding dominates, as in Gemma 3
    total, blocks = _counts(model)
    assert blocks / total == pytest.approx(221_952 / (221_952 + 2 * 4096 * 64 + 64))  # 30 % of the model
    _, result = prune_with("wanda-sp", model, calib, ratio=0.1)
    assert result.plan.config["requested"] == {"ratio": 0.1, "ratio_of": "all"} and result.plan.config["ratio"] == 0.1
    assert abs(result.realised_ratio - 0.1) < 0.01
    assert result.realised_block_ratio == pytest.approx(result.realised_ratio * total / blocks)
    assert result.realised_block_ratio > 0.3  # 10 % of all is a third of the blocks
    assert result.to_dict()["realised_block_ratio"] == result.realised_block_ratio


def test_analyse_and_apply_a_plan_over_the_blocks():
    from comp_core.methods import analyze_with
    from comp_core.methods.comp import apply_plan

    model, calib = make_tiny_model("llama"), make_calib()
    total, blocks = _counts(model)
    plan = analyze_with("comp", model, calib, ratio=0.3, ratio_of="blocks", remove_layers=0)
    assert plan.config["requested"] == {"ratio": 0.3, "ratio_of": "blocks"}
    assert abs(plan.planned_block_ratio - 0.3) < 0.01 and plan.block_params == blocks
    assert plan.planned_ratio * total == pytest.approx(plan.planned_block_ratio * blocks)
    pruned, result = apply_plan(model, plan)
    assert result.realised_block_ratio == pytest.approx(plan.planned_block_ratio)
    assert result.block_params_after == _counts(pruned)[1]


def test_masks_and_composed_methods_report_the_blocks_share():
    from comp_core.methods import prune_with

    model, calib = make_tiny_model("llama"), make_calib()
    total, blocks = _counts(model)
    masked, result = prune_with("wanda", model, calib, ratio_of="blocks")  # no ratio: nothing to convert
    assert "requested" not in result.plan.config and result.realised_block_ratio == 0.0
    layers = list(masked.model.layers)
    zeros = sum(int((p == 0).sum()) for block in layers for p in block.parameters())
    assert result.extra["block_zero_share"] == pytest.approx(zeros / blocks)
    assert result.extra["block_zero_share"] == pytest.approx(result.extra["zero_share"] * total / blocks)
    _, composed = prune_with("comp+nm", model, calib, ratio=0.3, ratio_of="blocks")
    assert composed.plan.config["requested"] == {"ratio": 0.3, "ratio_of": "blocks"}  # the outer request, once
    assert abs(composed.realised_block_ratio - 0.3) < 0.01


def test_a_ratio_basis_the_library_does_not_know_is_refused_before_any_work():
    from comp_core.methods import analyze_with, prune_with
    from comp_core.settings import SettingsError

    model = make_tiny_model("llama")
    for call in (prune_with, analyze_with):
        with pytest.raises(SettingsError, match="ratio_of='layers': a ratio is a share of 'all'"):
            call("comp", model, None, ratio=0.2, ratio_of="layers")

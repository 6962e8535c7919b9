"""comp_core.results: what a plan and a result say they removed, as a share of all parameters and of the decoder
blocks' parameters."""
from __future__ import annotations

import pytest

from comp_core.results import Plan, PruneResult


def _plan(**fields) -> Plan:
    # 1000 parameters, 600 of them in three blocks of 200; the rest is embedding, final norm and head
    return Plan(config={}, n_layers=3, params_total=1000, layer_params=[200, 200, 200], protected=[],
                initial_importance=[], removal_order=[], importance_history=[], removed_layers=[], layer_ratios={},
                **fields)


def test_a_plan_gives_its_removal_as_a_share_of_all_and_of_the_blocks():
    plan = _plan(planned_params_after=850)
    assert plan.block_params == 600
    assert plan.planned_ratio == pytest.approx(0.15) and plan.planned_block_ratio == pytest.approx(0.25)
    assert plan.to_dict()["planned_block_ratio"] == pytest.approx(0.25)
    assert Plan(config={}, n_layers=0, params_total=10, layer_params=[], protected=[], initial_importance=[],
                removal_order=[], importance_history=[], removed_layers=[], layer_ratios={}).planned_block_ratio is None


def test_a_result_gives_both_shares_and_says_when_the_blocks_were_not_measured():
    result = PruneResult(plan=_plan(planned_params_after=850), params_before=1000, params_after=850, seconds=1.0,
                         peak_rss_mb=1.0, block_params_before=600, block_params_after=450)
    assert result.realised_ratio == pytest.approx(0.15) and result.realised_block_ratio == pytest.approx(0.25)
    out = result.to_dict()
    assert (out["realised_ratio"], out["realised_block_ratio"]) == (pytest.approx(0.15), pytest.approx(0.25))
    assert (out["block_params_before"], out["block_params_after"]) == (600, 450)
    unmeasured = PruneResult(plan=_plan(), params_before=1000, params_after=850, seconds=1.0, peak_rss_mb=1.0)
    assert unmeasured.realised_block_ratio is None and unmeasured.to_dict()["realised_block_ratio"] is None

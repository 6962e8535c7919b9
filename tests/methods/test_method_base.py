"""What every method shares (``comp_core.methods.base``, ``registry``): one protected-layer check with one message,
the run scaffold, honest plans (mask methods: per-layer sparsity, none of COMP's τ / mask variance), one word
for the next block's calibration inputs with the old one accepted, and the score table."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from comp_core import CompPlan, Plan, count_parameters, get_adapter
from comp_core.cli import _settings, build_parser
from comp_core.math.scoring import SCORE_TABLE, SCORES, score_neurons
from comp_core.methods import REGISTRY, make_settings, parse_setting, prune_with
from comp_core.methods.base import Run, protected_layers

from tests.helpers import N_LAYERS, make_calib, make_tiny_model


def _with_protected() -> list[str]:
    return [n for n, e in REGISTRY.items() if "protected" in {f.name for f in dataclasses.fields(e.settings_class)}]


def test_every_method_with_protected_layers_refuses_a_missing_one_with_the_same_message():
    names = _with_protected()
    assert {"comp", "flap", "wanda-sp", "magnitude", "wanda", "ria", "shortgpt"} <= set(names)
    message = f"protected layers [99] do not exist: the model has layers 0..{N_LAYERS - 1}"
    model, calib = make_tiny_model("llama"), make_calib()
    for name in names:
        with pytest.raises(ValueError) as err:
            prune_with(name, model, calib, make_settings(name, protected=(99,)))
        assert str(err.value) == message, name


def test_protected_layers_wraps_negative_indices_and_refuses_all_protected_only_when_pruning():
    assert protected_layers((-1, 0), 6) == {0, 5}
    assert protected_layers(range(6), 6) == set(range(6))
    with pytest.raises(ValueError, match="every layer is protected"):
        protected_layers(range(6), 6, ratio=0.1)


def test_run_begins_on_a_copy_and_finishes_with_the_registry_accounting():
    model = make_tiny_model("llama")
    run = Run.begin(model, inplace=False)
    assert run.model is not model and run.params_before == count_parameters(model)
    assert len(run.blocks) == N_LAYERS and sum(run.layer_params) < run.params_before
    assert run.layer_params[0] == sum(p.numel() for p in get_adapter(model).blocks(model)[0].parameters())
    assert Run.begin(model, inplace=True).model is model


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_mask_plans_report_per_layer_sparsity_and_no_comp_dummies(method):
    model = make_tiny_model("llama")
    pruned, result = prune_with(method, model, make_calib(), sparsity="0.5")
    plan = result.plan
    assert CompPlan is Plan and isinstance(plan, Plan)
    blocks = get_adapter(pruned).blocks(pruned)
    assert len(plan.layer_reports) == N_LAYERS
    for r in plan.layer_reports:
        zeros = sum(int((p == 0).sum()) for p in blocks[r.index].parameters())
        assert r.sparsity == pytest.approx(zeros / r.params) and 0.4 < r.sparsity < 0.5
        assert r.tau is None and r.removed_params == 0
        assert r.to_dict()["sparsity"] == r.sparsity
    for d in plan.dense_reports:
        assert d.mask_variance is None and 0.49 <= d.sparsity <= 0.51
        assert "mask_variance" not in d.to_dict()


def test_structured_peers_leave_tau_and_mask_variance_unset_unless_they_solve_a_mask():
    model = make_tiny_model("llama")
    _, plain = prune_with("wanda-sp", model, make_calib(), ratio=0.2)
    assert all(r.tau is None and r.sparsity is None for r in plain.plan.layer_reports)
    assert all(d.mask_variance is None for d in plain.plan.dense_reports)
    _, masked = prune_with("wanda-sp+mask", model, make_calib(), ratio=0.2)
    cut = [d for d in masked.plan.dense_reports if d.n_removed]
    assert cut and all(d.mask_variance == pytest.approx(float(d.mask.double().var(unbiased=False)), rel=1e-5)
                       for d in cut)


def test_inputs_is_the_one_word_and_propagation_stays_accepted():
    for name in ("comp", "flap", "wanda-sp", "wanda", "ria"):
        fields = {f.name for f in dataclasses.fields(REGISTRY[name].settings_class)}
        assert "inputs" in fields and "propagation" not in fields, name
    assert make_settings("wanda-sp", propagation="identical").inputs == "identical"
    assert make_settings("flap").inputs == "identical"
    assert parse_setting("sparsegpt", "propagation", "identical") == "identical"
    with pytest.raises(ValueError, match="inputs must be"):
        make_settings("wanda", propagation="sideways")
    # the command line: --set propagation=… still reaches the setting
    args = build_parser().parse_args(["prune", "--method", "wanda-sp", "--set", "propagation=identical"])
    assert _settings("wanda-sp", args, 0.2, args.settings).inputs == "identical"


def test_the_score_table_covers_every_score_and_dispatches_to_it():
    assert set(SCORE_TABLE) == set(SCORES)
    torch.manual_seed(0)
    weight = torch.randn(5, 6, dtype=torch.float64)
    x = torch.randn(40, 6, dtype=torch.float64)
    gram = x.T @ x
    coeff = (weight.T @ weight) * gram + 1e-3 * torch.eye(6, dtype=torch.float64)
    fisher = torch.arange(6, dtype=torch.float32)
    for name in SCORES:
        scores = score_neurons(name, coeff, weight, gram, damp=1e-3, fisher=fisher)
        assert scores.shape == (6,) and torch.isfinite(scores).all(), name
    torch.testing.assert_close(score_neurons("diag", coeff, weight, gram), coeff.diagonal())
    torch.testing.assert_close(score_neurons("activation", coeff, weight, gram), gram.diagonal())
    torch.testing.assert_close(score_neurons("magnitude", coeff, weight, gram), weight.pow(2).sum(0))
    torch.testing.assert_close(score_neurons("fisher", coeff, weight, gram, fisher=fisher), fisher.double())
    with pytest.raises(ValueError, match="gradients"):
        score_neurons("fisher", coeff, weight, gram)
    with pytest.raises(ValueError, match="unknown importance score 'nope'"):
        score_neurons("nope", coeff, weight, gram)

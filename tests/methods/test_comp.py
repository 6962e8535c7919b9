"""COMP (comp_core.methods.comp.run) end to end on tiny random models of every supported architecture: prune,
analyze, configuration variants, regressions, and reallocating a plan to another ratio."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from torch import nn

from comp_core import (CompConfig, ImpossibleRatioError, analyze, count_parameters, get_adapter, prune,
                       reallocate)
from comp_core.loop.capture import calibration_context
from comp_core.loop.importance import capture_with_importances
from comp_core.loop.similarity import LayerDistanceTally
from comp_core.methods.comp import apply_plan
from comp_core.models.surgery import IndexedInputLinear

from tests.helpers import ARCHS, N_LAYERS, make_calib, make_tiny_model


by_arch = pytest.mark.parametrize("arch", ARCHS)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].shape == v.shape, k
        assert torch.equal(after[k], v), k


def _final_norm(model: nn.Module) -> nn.Module:
    return model.model.decoder.final_layer_norm if model.config.model_type == "opt" else model.model.norm


def _block_position(plan, layer: int) -> int:
    """Position in the pruned model's block list of original layer ``layer``."""
    active = [i for i in range(plan.n_layers) if i not in plan.removed_layers]
    return active.index(layer)


def _complement(d_in: int, pruned: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(d_in, dtype=torch.bool)
    keep[pruned] = False
    return torch.nonzero(keep).squeeze(1)


def _signature(plan) -> list[tuple]:
    return [(r.layer, r.name, r.n_removed, tuple(r.pruned_index.tolist())) for r in plan.dense_reports]


@functools.cache
def _pruned(arch: str, **changes) -> tuple:
    """(original, its state before, pruned copy, result) for ratio 0.3 with one removed layer; cached."""
    model = make_tiny_model(arch)
    before = _state(model)
    cfg = CompConfig(**{"ratio": 0.3, "remove_layers": 1, "dense_kinds": None, **changes})
    pruned, result = prune(model, make_calib(), cfg)
    return model, before, pruned, result


# ---------------------------------------------------------------------------------------------------------
# prune: ratio 0
# ---------------------------------------------------------------------------------------------------------

@by_arch
def test_ratio_zero_changes_nothing(arch, tiny_model, calib):
    pruned, result = prune(tiny_model, calib, CompConfig(ratio=0.0, remove_layers=0))
    assert pruned is not tiny_model
    with torch.no_grad():
        expected = tiny_model(input_ids=calib).logits
        got = pruned(input_ids=calib).logits
    assert torch.equal(got, expected)
    assert result.realised_ratio == 0.0
    assert result.params_after == result.params_before == count_parameters(tiny_model)
    assert result.plan.removed_layers == []
    assert all(r.n_removed == 0 for r in result.plan.dense_reports)


# ---------------------------------------------------------------------------------------------------------
# prune: ratio 0.3 with one removed layer
# ---------------------------------------------------------------------------------------------------------

@by_arch
def test_prune_hits_ratio_and_counts_parameters(arch):
    original, _, pruned, result = _pruned(arch)
    assert abs(result.realised_ratio - 0.3) <= 0.01
    assert result.params_before == count_parameters(original)
    assert result.params_after == count_parameters(pruned)
    assert result.params_after == result.plan.planned_params_after
    assert sum(r.n_removed for r in result.plan.dense_reports) > 0


@by_arch
def test_prune_removes_the_layer_and_fixes_the_config(arch):
    original, _, pruned, result = _pruned(arch)
    adapter = get_adapter(pruned)
    plan = result.plan
    assert len(plan.removed_layers) == 1
    blocks = adapter.blocks(pruned)
    assert len(blocks) == N_LAYERS - 1
    assert pruned.config.num_hidden_layers == N_LAYERS - 1
    assert [block.self_attn.layer_idx for block in blocks] == list(range(N_LAYERS - 1))
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == N_LAYERS - 1
    if arch == "qwen3":
        assert pruned.config.layer_types is not None
    # the kept protected blocks are the original ones, untouched
    for layer in plan.protected:
        position = _block_position(plan, layer)
        _assert_same_state(blocks[position], _state(adapter.blocks(original)[layer]))


@by_arch
def test_prune_physically_removes_input_columns(arch):
    original, _, pruned, result = _pruned(arch)
    adapter = get_adapter(pruned)
    plan = result.plan
    protected_or_removed = set(plan.protected) | set(plan.removed_layers)
    cut_consumers = {(r.layer, r.name): r for r in plan.dense_reports
                     if adapter.dense_spec(r.name).coupled_producers and r.n_removed > 0}
    for r in plan.dense_reports:
        assert r.layer not in protected_or_removed
        spec = adapter.dense_spec(r.name)
        module = adapter.dense(adapter.blocks(pruned)[_block_position(plan, r.layer)], r.name)
        assert r.pruned_index.numel() == r.n_removed == len(set(r.pruned_index.tolist()))
        if spec.coupled_producers:  # down / fc2: a plain, narrower linear; its producers lose the rows
            assert type(module) is nn.Linear
            assert module.weight.shape == (r.d_out, r.d_in - r.n_removed)
            assert module.in_features == r.d_in - r.n_removed
            for producer in spec.coupled_producers:
                p = adapter.dense(adapter.blocks(pruned)[_block_position(plan, r.layer)], producer)
                assert p.weight.shape[0] == r.d_in - r.n_removed
                if p.bias is not None:
                    assert p.bias.shape[0] == r.d_in - r.n_removed
        else:
            consumer = adapter.coupled_consumer(r.name)
            rows_gone = cut_consumers[(r.layer, consumer)].n_removed if (r.layer, consumer) in cut_consumers else 0
            assert module.weight.shape == (r.d_out - rows_gone, r.d_in - r.n_removed)
            if r.n_removed > 0:
                assert isinstance(module, IndexedInputLinear)
                assert module.in_features == r.d_in  # still reads the full hidden state
                assert torch.equal(module.input_index, _complement(r.d_in, r.pruned_index))
    # denses of untouched layers keep their width
    for layer in plan.protected:
        block = adapter.blocks(pruned)[_block_position(plan, layer)]
        for spec in adapter.denses:
            assert type(adapter.dense(block, spec.name)) is nn.Linear


@by_arch
def test_prune_leaves_the_original_untouched(arch):
    original, before, pruned, _ = _pruned(arch)
    _assert_same_state(original, before)
    adapter = get_adapter(original)
    assert len(adapter.blocks(original)) == N_LAYERS
    assert original.config.num_hidden_layers == N_LAYERS
    assert [b.self_attn.layer_idx for b in adapter.blocks(original)] == list(range(N_LAYERS))
    if getattr(original.config, "layer_types", None) is not None:
        assert len(original.config.layer_types) == N_LAYERS
    assert not any(isinstance(m, IndexedInputLinear) for m in original.modules())
    assert pruned.config is not original.config


@by_arch
def test_pruned_model_runs_forward_and_generate(arch):
    _, _, pruned, _ = _pruned(arch)
    calib = make_calib()
    with torch.no_grad():
        logits = pruned(input_ids=calib).logits
    assert logits.shape == (*calib.shape, 512)
    assert torch.isfinite(logits).all()
    prompt = calib[:2, :8]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                  return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    with torch.no_grad():
        out = pruned.generate(prompt, **kwargs)
        no_cache = pruned.generate(prompt, use_cache=False, **kwargs)
    assert out.sequences.shape == (2, 12)
    assert all(torch.isfinite(step).all() for step in out.logits)
    # the KV cache is sized and indexed by the renumbered layers: cached decoding equals uncached
    assert torch.equal(out.sequences, no_cache.sequences)


@by_arch
def test_mask_tuning_is_folded_into_the_kept_columns(arch):
    original, _, pruned, result = _pruned(arch, refit="never")
    adapter = get_adapter(pruned)
    plan = result.plan
    down = {r.layer: r for r in plan.dense_reports if adapter.dense_spec(r.name).coupled_producers}
    for r in plan.dense_reports:
        if r.n_removed == 0:
            continue
        assert r.compensation == "mask"
        assert r.mask is not None and r.mask.shape == (r.d_in - r.n_removed,)
        assert r.error_tuned <= r.error_no_tuning + 1e-9
        old = adapter.dense(adapter.blocks(original)[r.layer], r.name).weight
        new = adapter.dense(adapter.blocks(pruned)[_block_position(plan, r.layer)], r.name).weight
        consumer = adapter.coupled_consumer(r.name)
        rows = _complement(r.d_out, down[r.layer].pruned_index) if consumer else torch.arange(r.d_out)
        keep = _complement(r.d_in, r.pruned_index)
        torch.testing.assert_close(new, old[rows][:, keep] * r.mask.unsqueeze(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# analyze
# ---------------------------------------------------------------------------------------------------------

@by_arch
def test_analyze_predicts_prune_and_leaves_the_model_alone(arch, tiny_model, calib):
    before = _state(tiny_model)
    cfg = CompConfig(ratio=0.3, remove_layers=1, dense_kinds=None)
    plan = analyze(tiny_model, calib, cfg)
    _assert_same_state(tiny_model, before)
    assert len(get_adapter(tiny_model).blocks(tiny_model)) == N_LAYERS
    assert tiny_model.config.num_hidden_layers == N_LAYERS
    assert not any(isinstance(m, IndexedInputLinear) for m in tiny_model.modules())
    _, result = prune(tiny_model, calib, cfg)
    assert plan.removed_layers == result.plan.removed_layers
    assert [(r.layer, r.name, r.n_removed) for r in plan.dense_reports] == \
           [(r.layer, r.name, r.n_removed) for r in result.plan.dense_reports]
    assert _signature(plan) == _signature(result.plan)
    assert plan.planned_params_after == result.params_after
    assert plan.layer_ratios == pytest.approx(result.plan.layer_ratios)


@by_arch
def test_an_unfitted_analysis_reads_the_statistics_in_the_capture_forward(arch, tiny_model, calib, monkeypatch):
    """fit=False with no removed layer: one forward pass (no block loop) and exactly the cuts and scores of the
    block-by-block analysis; apply_plan refuses it (it holds no fitted weights)."""
    import comp_core.methods.comp.run as run
    cfg = CompConfig(ratio=0.1, dense_kinds=None)
    assert run.one_pass_blocks(tiny_model, cfg) == sorted(set(range(N_LAYERS)) - cfg.protected_layers(N_LAYERS))
    full = analyze(tiny_model, calib, cfg)
    loops = []
    monkeypatch.setattr(run, "block_loop", lambda *a, **k: loops.append(1))
    before = _state(tiny_model)
    quick = analyze(tiny_model, calib, cfg, fit=False)
    _assert_same_state(tiny_model, before)
    assert not loops and not quick.fitted and full.fitted
    assert [(r.layer, r.name) for r in quick.dense_reports] == [(r.layer, r.name) for r in full.dense_reports]
    for a, b in zip(full.dense_reports, quick.dense_reports):
        assert torch.equal(a.pruned_index, b.pruned_index)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-8)
        assert b.compensation == "not fitted" and b.mask is None and b.new_weight is None
    assert quick.planned_params_after == full.planned_params_after
    assert quick.layer_ratios == pytest.approx(full.layer_ratios)
    with pytest.raises(ValueError, match="fit=False"):
        apply_plan(tiny_model, quick)


def test_an_unfitted_analysis_falls_back_to_the_block_loop_where_one_pass_cannot_serve(calib):
    """A removed layer (the statistics then come from the shortened model) or another input mode: block by
    block, with the same cuts as the fitted analysis."""
    import comp_core.methods.comp.run as run
    tiny_model = make_tiny_model("llama")
    for cfg in (CompConfig(ratio=0.2, remove_layers=1), CompConfig(ratio=0.1, inputs="accumulated")):
        assert run.one_pass_blocks(tiny_model, cfg) is None
        quick, full = analyze(tiny_model, calib, cfg, fit=False), analyze(tiny_model, calib, cfg)
        assert [(r.layer, r.name, r.n_removed) for r in quick.dense_reports] == \
               [(r.layer, r.name, r.n_removed) for r in full.dense_reports]
        assert quick.removed_layers == full.removed_layers
        assert quick.fitted == (cfg.inputs != "identical")  # the next block must see this one fitted


# ---------------------------------------------------------------------------------------------------------
# configuration variants
# ---------------------------------------------------------------------------------------------------------

@by_arch
def test_dense_kinds_down_only(arch, tiny_model, calib):
    consumer_kind = "down"  # OPT fc2 has the same kind as Llama down_proj
    pruned, result = prune(tiny_model, calib, CompConfig(ratio=0.2, remove_layers=1, dense_kinds=(consumer_kind,)))
    assert abs(result.realised_ratio - 0.2) <= 0.01
    adapter = get_adapter(pruned)
    plan = result.plan
    assert any(r.n_removed > 0 for r in plan.dense_reports)
    for r in plan.dense_reports:
        if r.kind != consumer_kind:
            assert r.n_removed == 0
    orig_blocks = adapter.blocks(tiny_model)
    for position, block in enumerate(adapter.blocks(pruned)):
        layer = [i for i in range(N_LAYERS) if i not in plan.removed_layers][position]
        for spec in adapter.denses:
            module = adapter.dense(block, spec.name)
            if spec.kind == consumer_kind:
                continue
            assert type(module) is nn.Linear  # no input index: every input column kept
            assert module.weight.shape[1] == adapter.dense(orig_blocks[layer], spec.name).weight.shape[1]


@by_arch
def test_protected_layers_are_never_touched(arch, tiny_model, calib):
    protected = (2, 3)
    pruned, result = prune(tiny_model, calib, CompConfig(ratio=0.2, remove_layers=1, protected=protected, dense_kinds=None))
    plan = result.plan
    assert plan.protected == [2, 3]
    assert not set(plan.removed_layers) & set(protected)
    assert not {r.layer for r in plan.dense_reports} & set(protected)
    assert not {r.index for r in plan.layer_reports} & set(protected)
    assert not set(plan.layer_ratios) & set(protected)
    adapter = get_adapter(pruned)
    for layer in protected:
        block = adapter.blocks(pruned)[_block_position(plan, layer)]
        _assert_same_state(block, _state(adapter.blocks(tiny_model)[layer]))
    assert abs(result.realised_ratio - 0.2) <= 0.01


def test_default_protection_is_first_two_and_last():
    _, _, _, result = _pruned("llama")
    assert result.plan.protected == [0, 1, N_LAYERS - 1]


@pytest.mark.parametrize("make_cfg", [
    lambda: CompConfig(ratio=1.0),
    lambda: CompConfig(ratio=-0.1),
    lambda: CompConfig(ratio=0.2, protected=(99,)),
    lambda: CompConfig(ratio=0.2, remove_layers=-1),
    lambda: CompConfig(ratio=0.2, score="nonsense"),
    lambda: CompConfig(ratio=0.2, remove_layers=0, protected=tuple(range(N_LAYERS))),
    lambda: CompConfig(ratio=0.2, remove_layers=4),  # only 3 unprotected layers
], ids=["ratio-1", "ratio-negative", "protected-99", "remove-negative", "unknown-score", "all-protected",
        "too-many-removed"])
def test_invalid_configs_raise_value_error(make_cfg, calib):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError) as err:
        prune(model, calib, make_cfg())
    assert not isinstance(err.value, ImpossibleRatioError)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_impossible_ratio(arch, calib):
    model = make_tiny_model(arch)
    with pytest.raises(ImpossibleRatioError, match="impossible"):
        prune(model, calib, CompConfig(ratio=0.95, remove_layers=1))
    with pytest.raises(ImpossibleRatioError):
        analyze(model, calib, CompConfig(ratio=0.95, remove_layers=1))


@by_arch
def test_accumulated_inputs_change_later_layers(arch):
    _, _, same, identical = _pruned(arch)
    _, _, acc, accumulated = _pruned(arch, inputs="accumulated")
    adapter = get_adapter(same)
    assert identical.plan.removed_layers == accumulated.plan.removed_layers
    plan = identical.plan
    pruned_layers = sorted(r.index for r in plan.layer_reports)
    assert len(pruned_layers) >= 2
    first, later = pruned_layers[0], pruned_layers[1:]
    # the first pruned layer sees the same inputs either way
    position = _block_position(plan, first)
    _assert_same_state(adapter.blocks(acc)[position], _state(adapter.blocks(same)[position]))
    # every later one sees the pruned layers' outputs instead, so its weights differ
    for layer in later:
        position = _block_position(plan, layer)
        a = adapter.blocks(acc)[position].state_dict()
        b = adapter.blocks(same)[position].state_dict()
        assert any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in b), layer
    assert abs(accumulated.realised_ratio - 0.3) <= 0.01


@by_arch
def test_without_mask_tuning_weights_are_column_subsets(arch):
    original, _, pruned, result = _pruned(arch, mask_tuning=False)
    adapter = get_adapter(pruned)
    plan = result.plan
    assert any(r.n_removed > 0 for r in plan.dense_reports)
    down = {r.layer: r for r in plan.dense_reports if adapter.dense_spec(r.name).coupled_producers}
    for r in plan.dense_reports:
        assert r.error_tuned == r.error_no_tuning
        assert r.compensation == "none" and r.mask is None
        old = adapter.dense(adapter.blocks(original)[r.layer], r.name)
        new = adapter.dense(adapter.blocks(pruned)[_block_position(plan, r.layer)], r.name)
        rows = _complement(r.d_out, down[r.layer].pruned_index) if adapter.coupled_consumer(r.name) \
            else torch.arange(r.d_out)
        keep = _complement(r.d_in, r.pruned_index)
        assert torch.equal(new.weight, old.weight[rows][:, keep])  # exact: no rescale
        if old.bias is not None:
            assert torch.equal(new.bias, old.bias[rows])
    assert abs(result.realised_ratio - 0.3) <= 0.01


# ---------------------------------------------------------------------------------------------------------
# regressions: dead neurons with tiny budgets, re-pruning a pruned model, analyze == prune when accumulated
# ---------------------------------------------------------------------------------------------------------

def test_opt_with_dead_relu_neurons_and_a_small_budget():
    model = make_tiny_model("opt")
    few_tokens = make_calib()[:1, :2]  # 2 tokens: most fc1 neurons never fire
    cfg = CompConfig(ratio=0.005, remove_layers=0, dense_kinds=None)
    plan = analyze(model, few_tokens, cfg)
    assert all(r.n_removed >= 0 for r in plan.dense_reports)
    _, result = prune(model, few_tokens, cfg)
    assert all(r.n_removed >= 0 for r in result.plan.dense_reports)
    assert result.params_after == result.plan.planned_params_after


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_an_already_pruned_model_can_be_pruned_again(arch):
    _, _, pruned, first = _pruned(arch)
    again, second = prune(pruned, make_calib(), CompConfig(ratio=0.03, remove_layers=0, dense_kinds=None))
    assert second.params_after == count_parameters(again) < first.params_after
    assert all(r.n_removed >= 0 for r in second.plan.dense_reports)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_analyze_predicts_prune_with_accumulated_inputs(arch):
    cfg = CompConfig(ratio=0.3, remove_layers=1, inputs="accumulated", dense_kinds=None)
    model = make_tiny_model(arch)
    plan = analyze(model, make_calib(), cfg)
    _, _, _, result = _pruned(arch, inputs="accumulated")
    assert _signature(plan) == _signature(result.plan)


# ---------------------------------------------------------------------------------------------------------
# reallocate: what-if re-allocation from a plan equals what a fresh analysis decides
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_plan():
    model = make_tiny_model("llama", num_hidden_layers=8)
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


# ---------------------------------------------------------------------------------------------------------
# the layer-distance matrix the capture measures
# ---------------------------------------------------------------------------------------------------------

def test_analyze_and_prune_keep_the_capture_layer_distance_matrix_on_the_plan(calib):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    cfg = CompConfig(ratio=0.3, remove_layers=1, dense_kinds=None, forward_dtype="float32")
    plan = analyze(model, calib, cfg)
    tally = LayerDistanceTally(N_LAYERS)
    with calibration_context(model):
        capture_with_importances(model, adapter, calib, batch_size=cfg.batch_size, distance=tally)
    expected = tally.distances()
    assert plan.layer_distance is not None and len(plan.layer_distance) == N_LAYERS
    assert all(len(row) == N_LAYERS for row in plan.layer_distance)
    assert np.array_equal(np.array(plan.layer_distance), np.array(expected), equal_nan=True)
    # JSON as the CLI and the export write it: NaN (where l + n > L) becomes null, nothing else does
    written = json.loads(json.dumps(plan.to_dict(), allow_nan=False))["layer_distance"]
    assert [[v is None for v in row] for row in written] == \
           [[layer + n > N_LAYERS for layer in range(N_LAYERS)] for n in range(1, N_LAYERS + 1)]
    assert written[0] == pytest.approx(expected[0], rel=1e-12)
    _, result = prune(model, calib, cfg)
    assert np.array_equal(np.array(result.plan.layer_distance), np.array(expected), equal_nan=True)
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["plan"]["layer_distance"] == written


def test_the_auto_sweep_keeps_the_matrix_of_its_one_capture(calib):
    model = make_tiny_model("qwen2")
    _, result = prune(model, calib, CompConfig(ratio=0.3, remove_layers="auto", auto_max_layers=1, dense_kinds=None))
    assert len(result.plan.auto_sweep) == 2
    assert result.plan.layer_distance is not None
    assert np.isfinite(np.array(result.plan.layer_distance[0])).all()


def test_a_plan_without_a_measured_matrix_writes_null(calib):
    _, result = prune(make_tiny_model("llama"), calib, CompConfig(ratio=0.2, remove_layers=1))
    result.plan.layer_distance = None  # as every method but COMP leaves it
    assert result.to_dict()["plan"]["layer_distance"] is None

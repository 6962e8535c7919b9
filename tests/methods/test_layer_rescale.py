"""Prune&Comp's magnitude compensation (``layer_rescale``) in the methods that remove layers: COMP's iterative
search (``comp-layers``, hybrid with removed layers, ``apply_plan``, what-if) and ShortGPT's one-shot removal,
on every tiny architecture; the folded model saves and reloads; the setting parses like any other."""
from __future__ import annotations

import json

import pytest
import torch

from comp_core.export.folder import load_pruned, save_pruned
from comp_core.math.magnitude import cumulative_scales
from comp_core.methods import make_settings, parse_setting, prune_with
from comp_core.methods.comp import CompConfig, analyze, apply_plan, prune
from comp_core.methods.comp.whatif import changed_settings, measure_deeper, stale_reasons, what_if
from comp_core.models.adapters import UnsupportedModelError, get_adapter
from comp_core.models.structure import residual_writers
from comp_core.settings import parse_assignment, parse_overrides, settings_for

from tests.helpers import N_LAYERS, make_calib, make_tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _writers(model) -> list[dict[str, torch.Tensor]]:
    """Each block's residual-writer weights and biases, by name."""
    adapter = get_adapter(model)
    out = []
    for block in adapter.blocks(model):
        tensors = {}
        for name in residual_writers(adapter):
            dense = adapter.dense(block, name)
            tensors[name] = dense.weight
            if dense.bias is not None:
                tensors[name + ".bias"] = dense.bias
        out.append(tensors)
    return out


def test_shortgpt_rescale_keeps_its_one_shot_choice_and_folds_the_gap_scales(arch, calib):
    """The same blocks go as without rescaling; every kept block's o/down (weights and biases) is the plain
    one divided by the product of the scales of the removed blocks before it; nothing else changed."""
    model = make_tiny_model(arch)
    plain, plain_result = prune_with("shortgpt", model, calib, ratio=0.3)
    scaled, result = prune_with("shortgpt", model, calib, ratio=0.3, layer_rescale=True)
    plan = result.plan
    assert plan.removed_layers == plain_result.plan.removed_layers and plan.removed_layers
    assert sorted(plan.layer_scales) == plan.removed_layers
    assert all(s > 0 for s in plan.layer_scales.values())
    assert plain_result.plan.layer_scales == {}
    assert any("Prune&Comp" in note for note in plan.notes)
    kept = [i for i in range(N_LAYERS) if i not in plan.removed_layers]
    factors = cumulative_scales(kept, plan.layer_scales)
    for position, (got, want) in enumerate(zip(_writers(scaled), _writers(plain))):
        for name in want:
            torch.testing.assert_close(got[name], want[name] / factors[kept[position]], rtol=1e-6, atol=0)
    writers = {f"{i}.{n}" for i in range(len(kept)) for n in residual_writers(get_adapter(plain))}
    for (name, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items()):
        if not any(name.endswith(w + suffix) for w in writers for suffix in (".weight", ".bias")):
            assert torch.equal(a, b), name
    assert result.params_after == plain_result.params_after


@pytest.mark.parametrize("method", ["comp-layers", "shortgpt"])
def test_rescaled_layer_removal_saves_and_reloads_exactly(arch, method, calib, tmp_path):
    pruned, result = prune_with(method, make_tiny_model(arch), calib, ratio=0.3, layer_rescale=True)
    assert result.plan.layer_scales and sorted(result.plan.layer_scales) == result.plan.removed_layers
    folder = save_pruned(pruned, None, tmp_path / "m", result)
    reloaded, _ = load_pruned(folder)
    assert float((_logits(reloaded, calib[:2]) - _logits(pruned, calib[:2])).abs().max()) <= 1e-4
    written = json.loads(json.dumps(result.to_dict(), allow_nan=False))["plan"]["layer_scales"]
    assert written == {str(k): v for k, v in sorted(result.plan.layer_scales.items())}


def test_comp_layers_records_the_iterative_scales_in_removal_order(calib):
    model = make_tiny_model("llama")
    cfg = make_settings("comp-layers", ratio=0.3, layer_rescale=True)
    plan = analyze(model, calib, cfg)
    assert plan.removal.scales is not None
    assert list(plan.layer_scales) == plan.removal_order
    assert list(plan.layer_scales.values()) == plan.removal.scales[:len(plan.removal_order)]
    plain = analyze(model, calib, make_settings("comp-layers", ratio=0.3))
    assert plain.layer_scales == {} and plain.removal.scales is None
    assert plain.to_dict()["layer_scales"] == {}


def test_hybrid_comp_apply_plan_equals_prune_with_rescaled_removed_layers(calib):
    model = make_tiny_model("llama")
    cfg = CompConfig(ratio=0.3, remove_layers=2, layer_rescale=True)
    pruned, result = prune(model, calib, cfg)
    assert len(result.plan.layer_scales) == 2
    plan = analyze(model, calib, cfg)
    assert plan.layer_scales == pytest.approx(result.plan.layer_scales)
    applied, _ = apply_plan(model, plan)
    torch.testing.assert_close(_logits(applied, calib[:2]), _logits(pruned, calib[:2]), rtol=0, atol=1e-6)
    unscaled, _ = prune(model, calib, CompConfig(ratio=0.3, remove_layers=2))
    assert float((_logits(unscaled, calib[:2]) - _logits(pruned, calib[:2])).abs().max()) > 1e-4
    scales = dict(plan.layer_scales)
    plan.layer_scales = {plan.removed_layers[0]: 1.1}  # a plan whose scales do not match what it removes
    with pytest.raises(ValueError, match="Prune&Comp scales are for layers"):
        apply_plan(model, plan)
    plan.layer_scales = {}
    with pytest.raises(ValueError, match="Prune&Comp scales are for layers"):
        apply_plan(model, plan)
    plan.layer_scales, plan.config = scales, {**plan.config, "layer_rescale": False}
    with pytest.raises(ValueError, match="rescales none"):
        apply_plan(model, plan)


def test_what_if_takes_the_scales_of_the_first_removals_and_refuses_a_changed_rescale(calib):
    model = make_tiny_model("llama")
    cfg = CompConfig(ratio=0.3, remove_layers=1, layer_rescale=True)
    plan = analyze(model, calib, cfg, removal_depth=2)
    deeper = measure_deeper(model, calib, plan, 3)
    assert len(deeper.removal.scales) == 3 and deeper.removal.scales[:2] == plan.removal.scales
    view = what_if(deeper, 0.3, 2)
    assert not view.message and view.removed == sorted(deeper.removal.removal_order[:2])
    assert view.layer_scales == dict(zip(deeper.removal.removal_order[:2], deeper.removal.scales[:2]))
    assert what_if(analyze(model, calib, CompConfig(ratio=0.3, remove_layers=1), removal_depth=2),
                   0.3, 2).layer_scales == {}
    off = CompConfig(ratio=0.3, remove_layers=1)
    assert "layer rescaling (Prune&Comp)" in stale_reasons(cfg, off)
    assert "layer rescaling (Prune&Comp)" in changed_settings(cfg, off)


def test_neurons_only_ignores_layer_rescale(calib):
    model = make_tiny_model("llama")
    plan = analyze(model, calib, make_settings("comp-neurons", ratio=0.2, layer_rescale=True))
    assert plan.layer_scales == {} and plan.removed_layers == []


def test_rescale_is_refused_before_measuring_where_it_cannot_be_folded(calib):
    post_norm = make_tiny_model("opt", do_layer_norm_before=False)
    for method in ("shortgpt", "comp-layers"):
        with pytest.raises(UnsupportedModelError, match="do_layer_norm_before=False"):
            prune_with(method, post_norm, calib, ratio=0.3, layer_rescale=True)
    prune_with("shortgpt", post_norm, calib, ratio=0.3)  # without the rescale it prunes


def test_layer_rescale_is_a_setting_of_comp_and_shortgpt_from_text():
    assert make_settings("shortgpt").layer_rescale is False
    assert make_settings("comp-layers").layer_rescale == make_settings("comp").layer_rescale
    for method in ("comp", "comp-layers", "shortgpt"):
        key, value = parse_assignment("layer_rescale=true")
        assert parse_overrides(method, [(key, value)]) == {"layer_rescale": True}
        assert parse_setting(method, "layer_rescale", "false") is False
        assert settings_for(method, ratio="25%", overrides=[("layer_rescale", "true")]).layer_rescale is True


def test_rescaled_shortgpt_on_a_calibration_batch_of_one(calib):
    """Every calibration sequence its own batch: the scale is still the mean over all of them."""
    model = make_tiny_model("llama")
    _, whole = prune_with("shortgpt", model, calib, ratio=0.3, layer_rescale=True)
    _, single = prune_with("shortgpt", model, calib, ratio=0.3, layer_rescale=True, batch_size=1)
    assert single.plan.layer_scales == pytest.approx(whole.plan.layer_scales, rel=1e-6)

"""Every structured method through the registry, on tiny random models of every architecture.

Exact checks where the math allows: ratio 0 is the identity; the realised ratio is the parameters really
gone; ShortGPT removes exactly the lowest Block-Influence layers (measured here with plain hooks, not the
library's capture); Wanda-sp's score is the hand-computed one; whole KV groups go in GQA models; COMP's
``apply_plan`` equals ``prune``; the block loop's two propagation modes feed the next block what they say.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from comp_core.loop.capture import calibration_context, capture_block_inputs
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.loop.blocks import block_loop
from comp_core.methods import (REGISTRY, get_method, make_settings, method_names, parse_setting, prune_with)
from comp_core.methods.comp import CompConfig, analyze, apply_plan, prune
from comp_core.methods.structured import StructuredSettings, keep_top, uniform_cuts, block_shapes
from comp_core.methods.uniform import MagnitudeSP, WandaSP
from comp_core.models.adapters import count_block_parameters, get_adapter
from comp_core.runtime import count_parameters
from comp_core.loop.stats import InputStats

from tests.helpers import VOCAB, make_calib, make_tiny_model

STRUCTURED = ["comp", "comp-layers", "comp-neurons", "shortgpt", "flap", "wanda-sp", "wanda-sp+mask", "magnitude-sp",
              "magnitude-sp+mask"]
EXACT_RATIO = ["comp", "comp-neurons", "flap", "wanda-sp", "wanda-sp+mask", "magnitude-sp", "magnitude-sp+mask"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------ registry

def test_registry_lists_every_structured_method_once():
    names = method_names()
    assert names[0] == "comp"
    for name in STRUCTURED:
        assert names.count(name) == 1
        assert get_method(name).kind == "structured"
        assert get_method(name).summary
    assert method_names("unstructured") == [n for n, e in REGISTRY.items() if e.kind == "unstructured"]


def test_unknown_method_and_setting_are_clear_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'.*comp"):
        get_method("nope")
    with pytest.raises(ValueError, match="tau: not a setting of method 'wanda-sp'.*compensation"):
        make_settings("wanda-sp", tau=1.0)
    with pytest.raises(ValueError, match="compensation must be one of"):
        make_settings("wanda-sp", compensation="magic")


def test_registered_variants_differ_only_by_their_defaults():
    assert make_settings("wanda-sp+mask").compensation == "mask"
    assert make_settings("wanda-sp").compensation == "none"
    assert make_settings("comp-layers").granularity == "layers"
    assert make_settings("comp-layers", ratio=0.3).ratio == 0.3


def test_settings_parse_from_text_by_field_type():
    assert parse_setting("comp", "mask_tuning", "false") is False
    assert parse_setting("comp", "dense_kinds", "down,o") == ("down", "o")
    assert parse_setting("comp", "dense_kinds", "none") is None
    assert parse_setting("comp", "remove_layers", "3") == 3
    assert parse_setting("comp", "remove_layers", "auto") == "auto"
    assert parse_setting("shortgpt", "n_layers", "2") == 2
    assert parse_setting("wanda-sp", "protected", "0,5") == (0, 5)
    with pytest.raises(ValueError, match="damp: expected float"):
        parse_setting("wanda-sp", "damp", "lots")


# -------------------------------------------------------------------------------------- every method, arch

@pytest.mark.parametrize("method", STRUCTURED)
def test_ratio_zero_is_the_identity(arch, method, calib):
    model = make_tiny_model(arch)
    pruned, result = prune_with(method, model, calib, ratio=0.0)
    assert result.params_after == result.params_before == count_parameters(model)
    torch.testing.assert_close(_logits(pruned, calib[:2]), _logits(model, calib[:2]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", STRUCTURED)
def test_realised_ratio_is_the_parameters_really_gone(arch, method, calib):
    model = make_tiny_model(arch)
    before = count_parameters(model)
    pruned, result = prune_with(method, model, calib, ratio=0.2)
    assert count_parameters(model) == before, "the original must be untouched"
    assert result.params_after == count_parameters(pruned)
    assert result.realised_ratio == pytest.approx(1 - count_parameters(pruned) / before, abs=1e-12)
    assert before - result.params_after == sum(result.plan.removed_per_layer.values())
    assert result.method == result.plan.method == method
    blocks = count_block_parameters(model)  # every method removes only inside the blocks: the same count of both
    assert (result.block_params_before, result.block_params_after) == (blocks, count_block_parameters(pruned))
    assert result.realised_block_ratio == pytest.approx((before - result.params_after) / blocks, abs=1e-12)
    if method in EXACT_RATIO:
        assert abs(result.realised_ratio - 0.2) < 0.01
    else:  # whole blocks: the count closest to the ratio
        block = result.plan.layer_params[0] / before
        assert abs(result.realised_ratio - 0.2) <= block / 2 + 1e-9
    out = _logits(pruned, calib[:2])
    assert out.shape == (2, calib.shape[1], model.config.vocab_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["wanda-sp", "magnitude-sp+mask", "shortgpt", "comp", "flap"])
def test_pruned_models_save_and_reload_exactly(arch, method, calib, tmp_path):
    ratio = 0.2 if method.startswith(("comp", "shortgpt")) else 0.5  # 0.5 removes attention units too
    pruned, result = prune_with(method, make_tiny_model(arch), calib, ratio=ratio)
    folder = save_pruned(pruned, None, tmp_path / "m", result)
    reloaded, _ = load_pruned(folder)
    assert count_parameters(reloaded) == result.params_after
    diff = (_logits(reloaded, calib[:2]) - _logits(pruned, calib[:2])).abs().max()
    assert diff <= 1e-4


# ----------------------------------------------------------------------------------------------- ShortGPT

def _block_influence_by_hooks(model, samples) -> list[float]:
    """1 − mean cos(block input, block output) per block, from plain hooks on one full forward."""
    blocks = get_adapter(model).blocks(model)
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):
        def hook(_m, args, kwargs, output, i=i):
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, model.config.hidden_size).double()
            y = (output[0] if isinstance(output, tuple) else output).reshape(-1, model.config.hidden_size).double()
            sums[i] += float((1 - F.cosine_similarity(x, y, dim=-1)).sum())
            counts[i] += x.shape[0]
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=samples, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [s / c for s, c in zip(sums, counts)]


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_shortgpt_removes_exactly_the_lowest_influence_layers(arch, calib, n_layers):
    model = make_tiny_model(arch)
    influence = _block_influence_by_hooks(model, calib)
    expected = sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:n_layers])
    pruned, result = prune_with("shortgpt", model, calib, n_layers=n_layers)
    assert result.plan.removed_layers == expected
    assert result.plan.initial_importance == pytest.approx(influence, rel=1e-6)
    assert len(get_adapter(pruned).blocks(pruned)) == len(influence) - n_layers
    assert pruned.config.num_hidden_layers == len(influence) - n_layers


def test_shortgpt_protected_layers_stay():
    model, calib = make_tiny_model("llama"), make_calib()
    influence = _block_influence_by_hooks(model, calib)
    lowest = min(range(len(influence)), key=lambda i: influence[i])
    _, result = prune_with("shortgpt", model, calib, n_layers=1, protected=(lowest,))
    assert result.plan.removed_layers and lowest not in result.plan.removed_layers


# ------------------------------------------------------------------------------------ uniform baselines

def test_wanda_sp_score_is_the_hand_computed_one():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    x = torch.randn(40, 5, generator=g)
    stats = InputStats(5)
    stats.update(x[:25].double())  # float64 inputs: exact sums
    stats.update(x[25:].double())
    expected = torch.tensor([[abs(float(w[i, j])) * float(x[:, j].double().norm()) for j in range(5)]
                             for i in range(6)], dtype=torch.float64).mean(dim=0)
    torch.testing.assert_close(WandaSP().column_scores(w, stats), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(MagnitudeSP().column_scores(w, None), w.double().norm(dim=0))


def test_keep_top_drops_the_lowest_scores():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 5.0])
    assert keep_top(scores, 2).tolist() == [0, 2, 4]  # the tie at 1.0: both lowest go
    assert keep_top(scores, 0).tolist() == [0, 1, 2, 3, 4]


def test_uniform_cuts_share_the_budget_equally_across_layers():
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    shapes = block_shapes(model, adapter, list(range(6)))
    budget = 0.3 * sum(s.units.count * s.unit_params + s.channels * s.channel_params for s in shapes.values())
    cuts = uniform_cuts(shapes, budget)
    assert len({c for c in cuts.values()}) == 1, "identical blocks get identical cuts"
    removed = sum(u * shapes[i].unit_params + c * shapes[i].channel_params for i, (u, c) in cuts.items())
    assert abs(removed - budget) <= 6 * shapes[0].channel_params
    with pytest.raises(ValueError, match="can give at most"):
        uniform_cuts(shapes, 10 * budget)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "opt"])
def test_attention_units_are_whole_kv_groups_or_heads(arch, calib):
    model = make_tiny_model(arch)
    pruned, result = prune_with("wanda-sp", model, calib, ratio=0.5)
    adapter = get_adapter(pruned)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    heads, kv = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None) or \
        model.config.num_attention_heads
    for block in adapter.blocks(pruned):
        q = adapter.dense(block, next(d.name for d in adapter.denses if d.kind == "q"))
        k = adapter.dense(block, next(d.name for d in adapter.denses if d.kind == "k"))
        o = adapter.dense(block, next(d.name for d in adapter.denses if d.kind == "o"))
        h, g = q.out_features // head_dim, k.out_features // head_dim
        assert h < heads and o.in_features == q.out_features
        assert h // g == heads // kv  # the grouping survives
    assert sum(d.removed_heads for d in result.plan.dense_reports) > 0
    out = pruned.generate(calib[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_mask_compensation_never_increases_the_reconstruction_error(calib):
    _, result = prune_with("magnitude-sp+mask", make_tiny_model("llama"), calib, ratio=0.4)
    tuned = [d for d in result.plan.dense_reports if d.compensation == "mask"]
    assert tuned
    for d in tuned:
        assert d.error_tuned <= d.error_no_tuning + 1e-12
        assert d.mask is not None and d.mask.numel() == d.d_in - d.n_removed


def test_magnitude_sp_needs_no_calibration():
    model = make_tiny_model("llama")
    pruned, result = prune_with("magnitude-sp", model, None, ratio=0.2)
    assert abs(result.realised_ratio - 0.2) < 0.01
    with pytest.raises(ValueError, match="needs calibration"):
        prune_with("magnitude-sp+mask", model, None, ratio=0.2)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_with("wanda-sp", model, None, ratio=0.2)


# ---------------------------------------------------------------------------------------------- COMP plan

@pytest.mark.parametrize("inputs", ["identical", "accumulated"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_apply_plan_equals_prune(arch, inputs, calib):
    model = make_tiny_model(arch)
    cfg = CompConfig(ratio=0.25, inputs=inputs, remove_layers=1)
    plan = analyze(model, calib, cfg, removal_depth=3)
    assert len(plan.removal.removal_order) == 3 and plan.removal_order == plan.removal.removal_order[:1]
    applied, result = apply_plan(model, plan)
    pruned, _ = prune(model, calib, cfg)
    assert result.params_after == count_parameters(pruned) == plan.planned_params_after
    assert result.block_params_after == count_block_parameters(pruned) < result.block_params_before
    torch.testing.assert_close(_logits(applied, calib[:2]), _logits(pruned, calib[:2]), rtol=0, atol=1e-5)


def test_apply_plan_refuses_another_model(calib):
    plan = analyze(make_tiny_model("llama"), calib, CompConfig(ratio=0.2))
    with pytest.raises(ValueError, match="analyse it again"):
        apply_plan(make_tiny_model("opt"), plan)


# -------------------------------------------------------------------------------------------- block loop

@pytest.mark.parametrize("propagation", ["identical", "accumulated"])
def test_block_loop_propagation(propagation, calib):
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    seen = {}
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, calib)
        original_after_0 = [blocks[0](h, **inputs.kwargs_for(blocks[0], b))[0]
                            if isinstance(blocks[0](h, **inputs.kwargs_for(blocks[0], b)), tuple)
                            else blocks[0](h, **inputs.kwargs_for(blocks[0], b))
                            for b, h in enumerate(inputs.hidden)]

        def visit(v):
            seen[v.index] = [t.clone() for t in v.inputs]
            if v.index == 0:
                v.block.mlp.down_proj.weight.data.zero_()  # the block changes: its MLP now adds nothing
                return v.block
            return None

        block_loop(blocks, inputs, [0, 1], visit, adapter=adapter, with_stats=lambda i: i == 1,
                   propagation=propagation)
        changed_after_0 = [blocks[0](h, **inputs.kwargs_for(blocks[0], b)) for b, h in enumerate(inputs.hidden)]
        changed_after_0 = [t[0] if isinstance(t, tuple) else t for t in changed_after_0]
    expected = original_after_0 if propagation == "identical" else changed_after_0
    for got, want in zip(seen[1], expected):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(original_after_0[0], changed_after_0[0])


def test_input_stats_mean_variance_norms():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + torch.tensor([0.0, 1.0, -2.0, 5.0])
    stats = InputStats(4)
    stats.update(x[:1])
    stats.update(x[1:])
    flat = x.reshape(-1, 4).double()
    assert stats.n_tokens == 21
    torch.testing.assert_close(stats.mean, flat.mean(dim=0))
    # Gram products are float32 (``InputStats._product``): float32 accuracy, whatever the BLAS kernel's order
    float32 = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.variance, flat.var(dim=0, unbiased=True), **float32)
    torch.testing.assert_close(stats.sq_norms, (flat ** 2).sum(dim=0), **float32)
    torch.testing.assert_close(stats.gram, flat.T @ flat, **float32)


def test_structured_settings_validate():
    with pytest.raises(ValueError, match="ratio"):
        StructuredSettings(ratio=1.0)
    with pytest.raises(ValueError, match="do not exist"):
        StructuredSettings(protected=(9,)).prunable_layers(6)
    with pytest.raises(ValueError, match="every layer is protected"):
        StructuredSettings(protected=tuple(range(6))).prunable_layers(6)
    assert dataclasses.asdict(StructuredSettings())["compensation"] == "none"


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_comp_uniform_allocation_cuts_equal_shares(arch, calib):
    """allocation="uniform": the same ratio per layer as COMP, the same share of every prunable dense's inputs."""
    model = make_tiny_model(arch)
    with pytest.raises(ValueError, match="allocation must be one of"):
        CompConfig(allocation="equal")
    pruned, result = prune(model, calib, CompConfig(ratio=0.25, allocation="uniform", refit="never"))
    variance = analyze(model, calib, CompConfig(ratio=0.25))
    plan = result.plan
    assert count_parameters(pruned) == plan.planned_params_after == result.params_after
    assert plan.layer_ratios == variance.layer_ratios  # only the split inside a layer changes
    by_layer: dict[int, list] = {}
    for d in plan.dense_reports:
        if d.n_removed > 0:
            by_layer.setdefault(d.layer, []).append(d)
    assert by_layer
    for layer in plan.layer_reports:
        assert layer.removed_params >= layer.budget
    for reports in by_layer.values():
        shares = [d.n_removed / d.d_in for d in reports]
        assert max(shares) - min(shares) <= 2 / min(d.d_in for d in reports)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_comp_blend_fits_at_least_as_well_as_the_mask_and_reports_its_ridge(arch):
    """refit="blend": the same cuts as mask tuning; each dense keeps the mask (no ridge beat it on held-out
    sequences) or a blend whose calibration error is at most the mask's (the ridge objective at W' = the mask
    solution is the mask's error); the model computes what the plan says."""
    from comp_core.math.mask_tuning import RIDGE_GRID

    model = make_tiny_model(arch)
    calib = torch.randint(0, VOCAB, (16, 48), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="blend"):
        CompConfig(refit="blend", inputs="paired")
    pruned, blend = prune(model, calib, CompConfig(ratio=0.25, refit="blend"))
    _, mask = prune(model, calib, CompConfig(ratio=0.25, refit="never"))
    assert count_parameters(pruned) == blend.params_after == mask.params_after
    assert analyze(model, calib, CompConfig(ratio=0.25, refit="blend")).dense_reports[0].to_dict() == \
        blend.plan.dense_reports[0].to_dict()
    pairs = [(b, m) for b, m in zip(blend.plan.dense_reports, mask.plan.dense_reports) if b.n_removed > 0]
    assert pairs
    seen = set()
    for b, m in pairs:
        assert torch.equal(b.pruned_index, m.pruned_index)
        seen.add(b.compensation)
        if b.compensation == "blend":
            assert b.ridge in RIDGE_GRID
            assert b.error_tuned <= m.error_tuned * (1 + 1e-6) + 1e-9
        else:
            assert b.compensation == "mask" and b.ridge is None
    assert seen <= {"blend", "mask"}

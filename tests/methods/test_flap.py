"""FLAP (comp_core.methods.flap): exact checks of the metric, the AL-AM selection against the reference's
formula, bias compensation, parameter accounting, GQA units, and save/reload on every architecture."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import comp_core.export.folder  # noqa: F401  (registers comp_<type>)
from comp_core.loop.capture import calibration_context
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.math.mask_tuning import bias_compensation
from comp_core.methods import flap
from comp_core.methods.flap import FlapSettings, flap_scores, select_global, standardise, unit_scores, wifv
from comp_core.methods.registry import get_method, make_settings, prune_with
from comp_core.methods.structured import BlockCut, BlockShape, apply_block_cut
from comp_core.models.adapters import get_adapter
from comp_core.models.pruned import head_dim_of
from comp_core.runtime import count_parameters
from comp_core.loop.stats import InputStats, collect_block_stats
from comp_core.models.structure import AttentionUnits, dense_by_kind, mlp_consumer
from comp_core.models.surgery import add_output_bias

from tests.helpers import ARCHS, LLAMA_FAMILY_ARCHS, make_calib, make_tiny_model

TOL = 1e-4


def tokens(batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(2))


def logits(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens() if x is None else x).logits


def run_flap(model: nn.Module, ratio: float, **overrides):
    return prune_with("flap", model, make_calib(), ratio=ratio, **overrides)


def unit_cost(model: nn.Module) -> int:
    adapter = get_adapter(model)
    shape = BlockShape.of(adapter.blocks(model)[0], adapter, head_dim_of(model.config))
    return max(shape.unit_params, shape.channel_params)


def dense_inputs(model: nn.Module, names: list[str], samples: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Every block's o_proj/down_proj inputs on the unpruned model, (tokens, d_in) float64, with hooks."""
    adapter = get_adapter(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, block in enumerate(adapter.blocks(model)):
        for name in names:
            def hook(_m, args, key=(i, name)):
                seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            handles.append(adapter.dense(block, name).register_forward_pre_hook(hook))
    try:
        with calibration_context(model):
            model(samples)
    finally:
        for h in handles:
            h.remove()
    return {key: torch.cat(parts) for key, parts in seen.items()}


# ----------------------------------------------------------------------------------- registry and settings


def test_registered_with_flap_defaults():
    entry = get_method("flap")
    assert entry.kind == "structured" and entry.settings_class is FlapSettings
    settings = make_settings("flap")
    assert (settings.compensation, settings.inputs, settings.protected) == ("bias", "identical", ())
    with pytest.raises(ValueError):
        make_settings("flap", ratio=1.0)


# ------------------------------------------------------------------------------------------- pure functions


def test_wifv_is_variance_times_squared_column_norm():
    torch.manual_seed(0)
    x = torch.randn(300, 7, dtype=torch.float64) * torch.arange(1, 8) + 2.0  # (tokens, d_in)
    weight = torch.randn(5, 7)
    stats = InputStats(7)
    for part in x.split(64):
        stats.update(part)
    expected = x.var(dim=0, unbiased=True) * (weight.double() ** 2).sum(dim=0)
    torch.testing.assert_close(wifv(weight, stats.variance), expected, rtol=1e-10, atol=0)


def _reference_standardise(x: torch.Tensor) -> torch.Tensor:
    # lib/prune.py: standarlization = lambda x: (x - mean(x, axis=1)) / std(x, axis=1)
    return (x - torch.mean(x, axis=1, keepdim=True)) / torch.std(x, axis=1, keepdim=True)


def _reference_al_am(attn_metric: torch.Tensor, mlp_metric: torch.Tensor, head_dim: int, head_weight: float,
                     ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """lib/prune.py's AL-AM branch verbatim (``512/3`` replaced by ``head_weight``); returns the scores it
    ranks and its masks, ``score > threshold``."""
    layers = attn_metric.shape[0]
    attn = _reference_standardise(attn_metric).reshape(layers, -1, head_dim).mean(dim=2)
    mlp = _reference_standardise(mlp_metric)
    prune_metric = torch.cat([attn.view(-1), mlp.view(-1)])
    sorted_prune, indices = torch.sort(prune_metric, descending=True)
    compression_weight = torch.ones_like(indices, dtype=torch.float64)
    compression_weight[indices < attn.numel()] = head_weight
    threshold = sorted_prune[torch.argmin(torch.abs(torch.cumsum(compression_weight, 0)
                                                    - torch.sum(compression_weight) * (1 - ratio)))]
    return attn, mlp, attn > threshold, mlp > threshold


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_al_am_selection_matches_the_reference_formula(seed, ratio):
    generator = torch.Generator().manual_seed(seed)
    layers, heads, head_dim, channels, head_weight = 4, 6, 8, 40, 7.0
    o_metric = torch.rand(layers, heads * head_dim, generator=generator, dtype=torch.float64)  # squared WIFV
    down_metric = torch.rand(layers, channels, generator=generator, dtype=torch.float64)
    attn_ref, mlp_ref, attn_keep_ref, mlp_keep_ref = _reference_al_am(o_metric, down_metric, head_dim,
                                                                     head_weight, ratio)
    units = AttentionUnits(heads=heads, kv_heads=heads, head_dim=head_dim)
    for layer in range(layers):
        torch.testing.assert_close(standardise(o_metric[layer]), _reference_standardise(o_metric)[layer])
        # flap_scores squares the raw o_proj metric itself: give it the square root
        attn, mlp = flap_scores(o_metric[layer].sqrt(), down_metric[layer], units)
        torch.testing.assert_close(attn, attn_ref[layer])
        torch.testing.assert_close(mlp, mlp_ref[layer])

    scores = torch.cat([attn_ref.reshape(-1), mlp_ref.reshape(-1)])
    costs = torch.cat([torch.full((attn_ref.numel(),), head_weight), torch.ones(mlp_ref.numel(), dtype=torch.float64)])
    keep = select_global(scores, costs, remove=ratio * float(costs.sum()))
    keep_ref = torch.cat([attn_keep_ref.reshape(-1), mlp_keep_ref.reshape(-1)])
    # the reference counts the threshold unit as kept, then removes it (score > threshold): same prefix,
    # less exactly that one unit
    assert not bool((keep_ref & ~keep).any())
    assert int((keep & ~keep_ref).sum()) == 1
    threshold_unit = torch.nonzero(keep & ~keep_ref).item()
    assert scores[threshold_unit] == scores[keep].min()
    # nearest cumulative cost: no other prefix of the ranking is closer to what the ratio leaves
    order = torch.sort(scores, descending=True).indices
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(costs[order], 0)])
    target = float(costs.sum()) * (1 - ratio)
    assert abs(float(costs[keep].sum()) - target) == float((cum - target).abs().min())


def test_select_global_forced_units_and_edges():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    costs = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert select_global(scores, costs, 0.0).all()  # nothing to remove: everything stays
    assert select_global(scores, costs, 2.0).tolist() == [True, True, True, False, False]
    forced = torch.tensor([False, False, False, False, True])
    keep = select_global(scores, costs, 2.0, forced)
    assert keep.tolist() == [True, True, False, False, True]  # the forced unit ranks first, its cost counts
    assert select_global(scores, costs, 10.0, forced).tolist() == [False, False, False, False, True]


def test_unit_scores_average_whole_kv_groups():
    units = AttentionUnits(heads=4, kv_heads=2, head_dim=3)  # 2 groups of 2 query heads
    column = torch.arange(12, dtype=torch.float64)
    torch.testing.assert_close(unit_scores(column, units), torch.tensor([2.5, 8.5], dtype=torch.float64))


def test_standardise_constant_row_is_zero():
    assert torch.equal(standardise(torch.full((5,), 3.0)), torch.zeros(5, dtype=torch.float64))


# ------------------------------------------------------------------------------------- bias compensation


def test_bias_compensation_is_exact_for_constant_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(50, 6, dtype=torch.float64)
    removed = torch.tensor([1, 4])
    x[:, removed] = torch.tensor([0.7, -2.0], dtype=torch.float64)  # constant over the tokens
    stats = InputStats(6)
    stats.update(x)
    expected = linear(x)
    add_output_bias(linear, bias_compensation(linear.weight, stats.mean, removed))
    kept = torch.tensor([0, 2, 3, 5])
    smaller = nn.Linear(4, 4).double()
    smaller.weight.data = linear.weight.data[:, kept]
    smaller.bias.data = linear.bias.data
    torch.testing.assert_close(smaller(x[:, kept]), expected, rtol=0, atol=1e-12)


def _make_constant_channels(model: nn.Module, channels: list[int], value: float = 0.5) -> None:
    """OPT: fc1 rows with zero weights and a positive bias make relu(fc1) constant on those channels."""
    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        fc1 = block.fc1
        fc1.weight.data[channels] = 0.0
        fc1.bias.data[channels] = value


def test_apply_block_cut_reproduces_block_output_for_constant_channels():
    model = make_tiny_model("opt")
    constant = [3, 17, 64, 100]
    _make_constant_channels(model, constant)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[2]
    hidden = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.triu(torch.full((12, 12), float("-inf")), diagonal=1)[None, None].expand(2, 1, 12, 12)
    with torch.no_grad(), collect_block_stats(block, adapter) as stats:
        before = block(hidden, attention_mask=mask)[0]
    shape = BlockShape.of(block, adapter, head_dim_of(model.config))
    keep_channels = torch.tensor([c for c in range(shape.channels) if c not in constant])
    cut = BlockCut(2, keep_units=torch.arange(shape.units.count), keep_channels=keep_channels)
    layer, reports = apply_block_cut(block, adapter, shape, cut, stats, FlapSettings())
    with torch.no_grad():
        after = block(hidden, attention_mask=mask)[0]
    assert block.fc2.in_features == shape.channels - len(constant)
    assert layer.removed_params == len(constant) * shape.channel_params  # OPT's fc2 already has a bias
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    down = next(r for r in reports if r.kind == "down")
    assert down.compensation == "bias" and down.error_tuned < 1e-12 < down.error_no_tuning


def test_flap_removes_constant_channels_first_and_exactly():
    # one block: zero-variance channels score lowest within their layer (standardised −mean/std), but not
    # necessarily below another layer's weakest channels, so the global ranking is only certain per layer
    model = make_tiny_model("opt", num_hidden_layers=1)
    constant = [3, 17, 64, 100]
    _make_constant_channels(model, constant)
    adapter = get_adapter(model)
    shape = BlockShape.of(adapter.blocks(model)[0], adapter, head_dim_of(model.config))
    n_blocks = len(adapter.blocks(model))
    ratio = n_blocks * len(constant) * shape.channel_params / count_parameters(model)
    pruned, result = run_flap(model, ratio)
    downs = [d for d in result.plan.dense_reports if d.kind == "down"]
    assert [sorted(d.pruned_index.tolist()) for d in downs] == [constant] * n_blocks
    assert all(d.n_removed == 0 for d in result.plan.dense_reports if d.kind == "o")
    x = tokens()
    torch.testing.assert_close(logits(pruned, x), logits(model, x), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- metric on the tiny models


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_plan_scores_are_the_raw_wifv_of_the_unpruned_model(arch):
    model = make_tiny_model(arch)
    adapter = get_adapter(model)
    names = dense_by_kind(adapter)
    o_name, down_name = names["o"], mlp_consumer(adapter)
    inputs = dense_inputs(model, [o_name, down_name], make_calib())
    _, result = run_flap(model, 0.25)
    blocks = adapter.blocks(model)
    for report in result.plan.dense_reports:
        x = inputs[(report.layer, report.name)]
        weight = adapter.dense(blocks[report.layer], report.name).weight.double()
        expected = x.var(dim=0, unbiased=True) * weight.pow(2).sum(dim=0)
        torch.testing.assert_close(report.scores.double(), expected, rtol=1e-5, atol=1e-9)
        assert bool((report.scores > 0).all())  # the GUI plots them on a log scale


def test_attention_metric_is_squared_before_standardising():
    units = AttentionUnits(heads=2, kv_heads=2, head_dim=2)
    o_metric = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    attn, _ = flap_scores(o_metric, torch.ones(3, dtype=torch.float64), units)
    squared = standardise(o_metric ** 2)
    torch.testing.assert_close(attn, torch.stack([squared[:2].mean(), squared[2:].mean()]))
    assert not torch.allclose(attn, unit_scores(standardise(o_metric), units))


# -------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_zero_is_the_identity(arch):
    model = make_tiny_model(arch)
    pruned, result = run_flap(model, 0.0)
    assert result.params_after == result.params_before == count_parameters(model)
    assert torch.equal(logits(pruned), logits(model))
    assert all(d.n_removed == 0 for d in result.plan.dense_reports)


@pytest.mark.parametrize("ratio", [0.2, 0.4])
@pytest.mark.parametrize("arch", ARCHS)
def test_accounting_is_exact_and_near_the_target(arch, ratio):
    model = make_tiny_model(arch)
    before = count_parameters(model)
    pruned, result = run_flap(model, ratio)
    after = count_parameters(pruned)
    assert (result.params_before, result.params_after) == (before, after)
    assert result.realised_ratio == pytest.approx(1 - after / before, abs=1e-15)
    assert result.plan.planned_params_after == after
    assert sum(r.removed_params for r in result.plan.layer_reports) == before - after
    for report, block_before, block_after in zip(result.plan.layer_reports, get_adapter(model).blocks(model),
                                                 get_adapter(pruned).blocks(pruned)):
        gone = sum(p.numel() for p in block_before.parameters()) - sum(p.numel() for p in block_after.parameters())
        assert report.removed_params == gone
        assert result.plan.layer_ratios[report.index] == pytest.approx(gone / report.params)
    assert abs((before - after) - ratio * before) <= unit_cost(model)
    # the biases FLAP added are counted: o_proj/down_proj without a bias got one wherever inputs went
    adapter = get_adapter(pruned)
    names = dense_by_kind(adapter)
    for report in result.plan.dense_reports:
        module = adapter.dense(adapter.blocks(pruned)[report.layer], report.name)
        if report.n_removed:
            assert module.bias is not None
        if arch != "opt" and report.name in (names["o"], mlp_consumer(adapter)) and not report.n_removed:
            assert module.bias is None


@pytest.mark.parametrize("arch", LLAMA_FAMILY_ARCHS)
def test_gqa_removes_whole_kv_groups_and_still_generates(arch):
    model = make_tiny_model(arch)  # 4 query heads over 2 KV heads, head_dim 16
    adapter = get_adapter(model)
    head_dim = head_dim_of(model.config)
    pruned, result = run_flap(model, 0.4)
    removed_units = 0
    for i, (old, new) in enumerate(zip(adapter.blocks(model), adapter.blocks(pruned))):
        q, k, v = new.self_attn.q_proj, new.self_attn.k_proj, new.self_attn.v_proj
        kv_heads = k.out_features // head_dim
        assert kv_heads >= 1 and q.out_features == 2 * kv_heads * head_dim and v.out_features == k.out_features
        assert new.self_attn.num_key_value_groups == 2
        assert new.self_attn.o_proj.in_features == q.out_features
        # the kept q rows are whole groups of the original: each kept KV head with both its query heads
        kept_groups = [g for g in range(2)
                       if any(torch.equal(k.weight[j * head_dim:(j + 1) * head_dim],
                                          old.self_attn.k_proj.weight[g * head_dim:(g + 1) * head_dim])
                              for j in range(kv_heads))]
        assert len(kept_groups) == kv_heads
        rows = torch.cat([torch.arange(g * 2 * head_dim, (g + 1) * 2 * head_dim) for g in kept_groups])
        assert torch.equal(q.weight, old.self_attn.q_proj.weight[rows])
        removed_units += 2 - kv_heads
        o_report = next(d for d in result.plan.dense_reports if d.layer == i and d.kind == "o")
        assert o_report.removed_heads == 2 * (2 - kv_heads)
    assert removed_units >= 1, "the test should remove at least one KV group"
    with torch.no_grad():
        out = pruned.generate(tokens(1, 8), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)


def test_every_block_keeps_one_unit_and_one_channel(monkeypatch):
    model = make_tiny_model("llama")
    rescued = []

    def watched(scores, costs, remove, forced=None):  # how many forced units the plain rule would remove
        keep = select_global(scores, costs, remove, forced)
        rescued.append(int((keep & ~select_global(scores, costs, remove)).sum()))
        return keep
    monkeypatch.setattr(flap, "select_global", watched)
    pruned, result = run_flap(model, 0.6)
    assert rescued[-1] > 0, "at 60 % the reference rule would empty some block's attention or MLP"
    for block in get_adapter(pruned).blocks(pruned):
        assert block.self_attn.k_proj.out_features >= 16 and block.mlp.down_proj.in_features >= 1
    assert result.realised_ratio == pytest.approx(0.6, abs=unit_cost(model) / result.params_before)
    with pytest.raises(ValueError, match="at most"):
        run_flap(model, 0.7)


def test_protected_layers_are_untouched():
    model = make_tiny_model("qwen3")
    pruned, result = run_flap(model, 0.2, protected=(0, -1))
    adapter = get_adapter(model)
    for i in (0, 5):
        assert all(torch.equal(a, b) for a, b in zip(adapter.blocks(model)[i].parameters(),
                                                     adapter.blocks(pruned)[i].parameters()))
    assert sorted(result.plan.layer_ratios) == [1, 2, 3, 4] and result.plan.protected == [0, 5]


def test_accumulated_propagation_keeps_the_selection():
    model = make_tiny_model("llama")
    _, identical = run_flap(model, 0.3)
    _, accumulated = run_flap(model, 0.3, propagation="accumulated")
    for a, b in zip(identical.plan.dense_reports, accumulated.plan.dense_reports):
        assert torch.equal(a.pruned_index, b.pruned_index)
    assert identical.params_after == accumulated.params_after


def test_analyze_leaves_the_model_alone():
    model = make_tiny_model("mistral")
    reference = logits(model)
    plan = flap.Flap().analyze(model, make_calib(), make_settings("flap", ratio=0.3))
    assert plan.method == "flap" and plan.layer_reports and plan.planned_params_after < count_parameters(model)
    assert torch.equal(logits(model), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_save_reload_identical(arch, tmp_path):
    model = make_tiny_model(arch)
    pruned, result = run_flap(model, 0.2)
    folder = save_pruned(pruned, None, tmp_path / "flap", result)
    loaded, _ = load_pruned(folder)
    assert count_parameters(loaded) == result.params_after
    x = tokens()
    assert (logits(loaded, x) - logits(pruned, x)).abs().max().item() <= TOL
    if arch != "opt":  # stock Llama-family o_proj/down_proj have no bias; FLAP's are restored on reload
        adapter = get_adapter(loaded)
        assert any(adapter.dense(b, "mlp.down_proj").bias is not None for b in adapter.blocks(loaded))


def _smollm_like_layer(seed: int) -> tuple[flap._LayerMetrics, BlockShape]:
    """SmolLM2's proportions (3 KV groups of 3 heads of 64, 1,536 channels): a unit is 128× a channel."""
    g = torch.Generator().manual_seed(seed)
    units = AttentionUnits(heads=9, kv_heads=3, head_dim=64)
    shape = BlockShape(units=units, unit_params=221_184, channels=1536, channel_params=1728, params=3_538_944)
    metrics = flap._LayerMetrics(o=torch.rand(9 * 64, generator=g, dtype=torch.float64),
                                 down=torch.rand(1536, generator=g, dtype=torch.float64))
    return metrics, shape


def _gross(shape: BlockShape, cut: BlockCut) -> int:
    return ((shape.units.count - cut.keep_units.numel()) * shape.unit_params
            + (shape.channels - cut.keep_channels.numel()) * shape.channel_params)


@pytest.mark.parametrize("seed", range(4))
def test_layer_cut_removes_any_amount_to_within_half_a_channel(seed):
    metrics, shape = _smollm_like_layer(seed)
    unit_scores_, channel_scores = flap_scores(metrics.o, metrics.down, shape.units)
    for remove in torch.linspace(0, 0.9 * shape.prunable_params, 23).tolist():
        cut = flap.layer_cut(0, metrics, shape, remove)
        assert abs(_gross(shape, cut) - remove) <= shape.channel_params / 2 + 1e-6, remove
        # what stays is the best of each kind: every kept channel outranks every removed one, likewise units
        removed_channels = torch.ones(shape.channels, dtype=torch.bool)
        removed_channels[cut.keep_channels] = False
        if removed_channels.any():
            assert channel_scores[cut.keep_channels].min() >= channel_scores[removed_channels].max()
        removed_units = torch.ones(shape.units.count, dtype=torch.bool)
        removed_units[cut.keep_units] = False
        if removed_units.any():
            assert unit_scores_[cut.keep_units].min() >= unit_scores_[removed_units].max()
        assert cut.keep_units.numel() >= 1 and cut.keep_channels.numel() >= 1


@pytest.mark.parametrize("seed", range(4))
def test_layer_cut_at_a_prefix_cost_is_the_global_threshold_within_that_layer(seed):
    """Where the amount is what the global AL-AM threshold removed from the layer (the one-shot level),
    the per-layer step keeps exactly the same units and channels."""
    metrics, shape = _smollm_like_layer(seed)
    units_, channels_ = flap_scores(metrics.o, metrics.down, shape.units)
    forced = torch.zeros(units_.numel() + channels_.numel(), dtype=torch.bool)
    forced[int(torch.argmax(units_))] = True
    forced[units_.numel() + int(torch.argmax(channels_))] = True
    costs = torch.cat([torch.full((units_.numel(),), float(shape.unit_params), dtype=torch.float64),
                       torch.full((channels_.numel(),), float(shape.channel_params), dtype=torch.float64)])
    for share in (0.1, 0.3, 0.5, 0.7):
        keep = select_global(torch.cat([units_, channels_]), costs, share * shape.prunable_params, forced)
        removed = float(costs[~keep].sum())
        cut = flap.layer_cut(0, metrics, shape, removed)
        assert torch.equal(cut.keep_units, torch.nonzero(keep[:units_.numel()]).flatten())
        assert torch.equal(cut.keep_channels, torch.nonzero(keep[units_.numel():]).flatten())

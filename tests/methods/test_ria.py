"""RIA: its score, its masks, the N:M channel permutation applied to models, every architecture (the
permutation's math: tests/math/test_permutation.py)."""
from __future__ import annotations

import pytest
import torch

from comp_core.loop.capture import calibration_context, capture_block_inputs, replay
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.methods import get_method, make_settings, method_names, prune_with
from comp_core.methods.ria import RIA, RIASettings, apply_input_order, ria_score, stored_masks
from comp_core.models.adapters import LLAMA_FAMILY, get_adapter
from comp_core.math.permutation import compute_permutation
from comp_core.math.sparsity import SparsityPattern, holds_pattern
from comp_core.loop.stats import InputStats
from comp_core.models.surgery import IndexedInputLinear
from tests.helpers import ARCHS, make_calib, make_tiny_model

PATTERNS = ["0.5", "2:4", "4:8"]


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# ------------------------------------------------------------------------------------------------- score

def test_score_matches_hand_computed_matrix():
    weight = torch.tensor([[1.0, -2.0, 0.0],
                           [3.0, 1.0, 2.0]])
    sq_norms = torch.tensor([16.0, 1.0, 81.0])  # ‖X_j‖ = 4, 1, 9 -> (‖X_j‖)^0.5 = 2, 1, 3
    # |W| column sums 4, 3, 2; row sums 3, 6.
    # RI = [[1/4 + 1/3, 2/3 + 2/3, 0], [3/4 + 3/6, 1/3 + 1/6, 2/2 + 2/6]] = [[7/12, 4/3, 0], [5/4, 1/2, 4/3]]
    expected = torch.tensor([[7 / 12 * 2, 4 / 3 * 1, 0.0],
                             [5 / 4 * 2, 1 / 2 * 1, 4 / 3 * 3]])
    assert torch.allclose(ria_score(weight, sq_norms, 0.5), expected, atol=1e-6)
    ri = torch.tensor([[7 / 12, 4 / 3, 0.0], [5 / 4, 1 / 2, 4 / 3]])
    assert torch.allclose(ria_score(weight, sq_norms, 0.0), ri, atol=1e-6)  # a = 0: relative importance only
    assert torch.allclose(ria_score(weight, sq_norms, 1.0), ri * torch.tensor([4.0, 1.0, 9.0]), atol=1e-5)


def test_score_of_a_dead_column_is_zero_not_nan():
    weight = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    scores = ria_score(weight, torch.tensor([1.0, 1.0]))
    assert torch.isfinite(scores).all() and bool((scores[:, 0] == 0).all())


def _stats_for(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[1])
    stats.update(x)
    return stats


def test_unstructured_mask_prunes_the_lowest_scores_of_every_row():
    torch.manual_seed(0)
    weight, x = torch.randn(6, 16), torch.randn(40, 16)
    stats = _stats_for(x)
    settings = RIASettings(sparsity="0.5")
    out = RIA().mask_dense(weight, stats, stats.gram, settings.pattern, settings)
    scores = ria_score(weight, stats.sq_norms)
    assert torch.equal(out.mask.sum(dim=1), torch.full((6,), 8))
    for row in range(6):  # every pruned score is below every kept score of its row
        assert scores[row][out.mask[row]].max() <= scores[row][~out.mask[row]].min()
    assert bool((out.weight[out.mask] == 0).all()) and torch.equal(out.weight[~out.mask], weight[~out.mask])
    whole = RIASettings(sparsity="0.5", per_row=False)  # RIA's own default: one threshold for the matrix
    matrix = RIA().mask_dense(weight, stats, stats.gram, whole.pattern, whole)
    assert int(matrix.mask.sum()) == 48
    assert scores[matrix.mask].max() <= scores[~matrix.mask].min()


@pytest.mark.parametrize("label", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("permute", [False, True])
def test_nm_masks_hold_exactly_n_of_every_m(label, permute):
    torch.manual_seed(1)
    weight, x = torch.randn(12, 32), torch.randn(50, 32)
    stats = _stats_for(x)
    settings = RIASettings(sparsity=label, permute=permute)
    pattern = settings.pattern
    out = RIA().mask_dense(weight, stats, stats.gram, pattern, settings)
    scores = ria_score(weight, stats.sq_norms)
    found = compute_permutation(scores, pattern.n, pattern.m)
    stored = out.mask[:, found.order] if permute else out.mask  # the layout the weight is stored in
    assert holds_pattern(stored, pattern)
    assert int(out.mask.sum()) == 12 * 32 * pattern.n // pattern.m
    kept = float(scores[~out.mask].double().sum())
    assert kept == pytest.approx(found.retained if permute else found.retained_identity, rel=1e-9)
    if permute and not found.is_identity:
        assert not holds_pattern(out.mask, pattern)  # in the original order the groups are not N:M


# ------------------------------------------------------------------------------------ function preserved

def _random_orders(model, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(seed)
    return {(i, spec.name): torch.randperm(adapter.dense(block, spec.name).weight.shape[1], generator=generator)
            for i, block in enumerate(adapter.blocks(model)) for spec in adapter.denses}


@pytest.mark.parametrize("arch", ARCHS)
def test_permutation_preserves_function_before_pruning(arch):
    model, tokens = make_tiny_model(arch), make_calib()
    reference = _logits(model, tokens)
    adapter = get_adapter(model)
    orders = _random_orders(model)
    for (i, name), order in orders.items():
        apply_input_order(adapter.blocks(model)[i], adapter, name, order)
    for i, block in enumerate(adapter.blocks(model)):
        for spec in adapter.denses:
            module = adapter.dense(block, spec.name)
            if spec.coupled_producers:
                assert type(module) is torch.nn.Linear  # folded into its producers
            else:
                assert isinstance(module, IndexedInputLinear)
    assert (_logits(model, tokens) - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_each_dense_permutation_preserves_the_block(arch):
    model = make_tiny_model(arch)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    with calibration_context(model):  # block 0's real inputs, and its outputs before any permutation
        inputs = capture_block_inputs(model, adapter, make_calib()[:2], batch_size=2)
        kwargs = [inputs.kwargs_for(block, b) for b in range(len(inputs.hidden))]
        reference = replay(block, inputs.hidden, kwargs)
        for spec, order in zip(adapter.denses, _random_orders(model, seed=5).values()):
            apply_input_order(block, adapter, spec.name, order)  # one more dense permuted each time
            out = replay(block, inputs.hidden, kwargs)
            assert max(float((a - b).abs().max()) for a, b in zip(out, reference)) <= 1e-5, spec.name


def test_permuting_an_indexed_dense_composes_its_index():
    weight = torch.randn(3, 6)
    module = IndexedInputLinear(weight.clone(), None, torch.tensor([5, 0, 2, 1, 4, 3]), 6)
    x = torch.randn(4, 6)
    before = module(x)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.o_proj = module

    block = Block()
    apply_input_order(block, LLAMA_FAMILY, "self_attn.o_proj", torch.tensor([2, 3, 0, 1, 5, 4]))
    assert torch.allclose(block.self_attn.o_proj(x), before, atol=1e-6)


# ---------------------------------------------------------------------------------------- whole models

def _masked_in_original_layout(model, tokens, label, monkeypatch):
    """Prune like RIA but skip the re-layout: the same masks, weights in their original column order."""
    with monkeypatch.context() as patch:
        patch.setattr(RIA, "relayout", lambda self, model, orders: None)
        pruned, _ = prune_with("ria", model, tokens, sparsity=label)
    return pruned


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label", ["2:4", "4:8"])
def test_permuted_pruned_model_stores_nm_and_computes_the_masked_function(arch, label, monkeypatch):
    model, tokens = make_tiny_model(arch), make_calib()
    pruned, result = prune_with("ria", model, tokens, sparsity=label)
    pattern = SparsityPattern.parse(label)
    masks = stored_masks(pruned)
    assert all(holds_pattern(mask, pattern) for mask in masks.values())
    report = result.extra["permutation"]
    assert report["denses"] == len(masks) and report["permuted"] > 0
    assert report["retained"] >= report["retained_identity"]
    assert all(d["retained"] >= d["retained_identity"] for d in report["per_dense"])
    reference = _masked_in_original_layout(model, tokens, label, monkeypatch)
    assert (_logits(pruned, tokens) - _logits(reference, tokens)).abs().max() <= 1e-5
    assert any(isinstance(m, IndexedInputLinear) for m in pruned.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_permuted_pruned_model_saves_and_reloads(arch, tmp_path):
    model, tokens = make_tiny_model(arch), make_calib()
    pruned, result = prune_with("ria", model, tokens, sparsity="2:4")
    path = save_pruned(pruned, None, tmp_path / "ria", result)
    loaded, _ = load_pruned(path)
    assert (_logits(loaded, tokens) - _logits(pruned, tokens)).abs().max() <= 1e-4
    pattern = SparsityPattern.parse("2:4")
    assert all(holds_pattern(mask, pattern) for mask in stored_masks(loaded).values())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("label", PATTERNS)
def test_ria_prunes_every_architecture(arch, label):
    model, tokens = make_tiny_model(arch), make_calib()
    pruned, result = prune_with("ria", model, tokens, sparsity=label)
    pattern = SparsityPattern.parse(label)
    assert all(holds_pattern(mask, pattern) for mask in stored_masks(pruned).values())
    assert abs(result.extra["linear_sparsity"] - 0.5) < 0.01
    assert ("permutation" in result.extra) == pattern.is_nm
    assert torch.isfinite(_logits(pruned, tokens)).all()
    assert _logits(model, tokens).shape == _logits(pruned, tokens).shape
    assert not any(isinstance(m, IndexedInputLinear) for m in model.modules())  # the input is untouched


def test_without_permutation_the_model_keeps_plain_linears():
    model, tokens = make_tiny_model("llama"), make_calib()
    pruned, result = prune_with("ria", model, tokens, sparsity="2:4", permute=False)
    assert "permutation" not in result.extra
    assert not any(isinstance(m, IndexedInputLinear) for m in pruned.modules())
    assert all(holds_pattern(mask, SparsityPattern.parse("2:4")) for mask in stored_masks(pruned).values())


def test_permutation_retains_more_than_plain_nm():
    model, tokens = make_tiny_model("qwen3"), make_calib()
    _, result = prune_with("ria", model, tokens, sparsity="2:4")
    report = result.extra["permutation"]
    assert report["gain"] > 0 and report["retained"] > report["retained_identity"]
    assert any("channel permutation" in note for note in result.plan.notes)


# -------------------------------------------------------------------------------------- registry, config

def test_registered_with_its_settings():
    assert "ria" in method_names("unstructured")
    assert get_method("ria").settings_class is RIASettings
    settings = make_settings("ria", sparsity="4:8", alpha=1.0, permute=False)
    assert (settings.sparsity, settings.alpha, settings.permute) == ("4:8", 1.0, False)
    assert make_settings("ria").alpha == 0.5 and make_settings("ria").permute is True


@pytest.mark.parametrize("bad", [dict(alpha=-1.0), dict(alpha=float("nan")), dict(permute_block=-1),
                                 dict(sparsity="5:4")])
def test_invalid_settings_raise(bad):
    with pytest.raises(ValueError):
        RIASettings(**bad)

"""Mask methods (magnitude, Wanda, SparseGPT, APT; comp_core.methods.sparse) on every architecture through the
registry (their patterns: tests/math/test_sparsity.py; their solvers: tests/math/test_obs_solvers.py)."""
from __future__ import annotations

import pytest
import torch

from comp_core.export.folder import load_pruned, save_pruned
from comp_core.methods import prune_with
from comp_core.methods.sparse import Wanda
from comp_core.models.adapters import get_adapter
from comp_core.runtime import count_parameters
from comp_core.math.sparsity import SparsityPattern, holds_pattern, zero_counts

from tests.helpers import make_tiny_model, weight_and_gram

MASK_METHODS = ["magnitude", "wanda", "sparsegpt", "apt"]
PATTERNS = ["0.5", "2:4", "4:8"]


def test_wanda_score_per_row_is_hand_computed():
    w, h = weight_and_gram(7, d_out=4, d_in=8)
    out = Wanda().mask_dense(w, None, h, SparsityPattern.parse("0.5"), None)
    expected = w.abs() * h.diagonal().sqrt().float()
    torch.testing.assert_close(out.scores, expected)
    for r in range(4):
        kept = expected[r][~out.mask[r]]
        assert kept.min() >= expected[r][out.mask[r]].max()


# ------------------------------------------------------------------------------- methods on tiny models

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", MASK_METHODS)
def test_mask_methods_on_every_architecture(arch, method, pattern, calib):
    model = make_tiny_model(arch)
    embed = model.get_input_embeddings().weight.clone()
    pruned, result = prune_with(method, model, calib, sparsity=pattern)
    assert result.params_after == result.params_before == count_parameters(pruned)
    assert result.realised_ratio == 0.0 and result.kind == "unstructured"
    adapter = get_adapter(pruned)
    linears = [adapter.dense(b, d.name) for b in adapter.blocks(pruned) for d in adapter.denses]
    counts = zero_counts(pruned, linears)
    assert result.extra["linear_sparsity"] == pytest.approx(0.5, abs=1e-9)  # every tiny width is a multiple of 8
    assert result.extra["zero_share"] == pytest.approx(counts["zeros"] / count_parameters(pruned))
    torch.testing.assert_close(pruned.get_input_embeddings().weight, embed, rtol=0, atol=0)
    p = SparsityPattern.parse(pattern)
    for module in linears:
        assert holds_pattern(module.weight == 0, p) if p.is_nm else True
    out = pruned(input_ids=calib[:2]).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", MASK_METHODS)
def test_sparsity_zero_is_the_identity(method, calib):
    model = make_tiny_model("llama")
    pruned, _ = prune_with(method, model, calib, sparsity="0")
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=calib[:2]).logits, model(input_ids=calib[:2]).logits,
                                   rtol=0, atol=1e-5)


def test_obs_methods_reconstruct_better_than_wanda(calib):
    errors = {}
    for method in ("wanda", "sparsegpt", "apt"):
        _, result = prune_with(method, make_tiny_model("llama"), calib, sparsity="2:4")
        errors[method] = sum(d.error_tuned for d in result.plan.dense_reports)
    assert errors["apt"] < errors["wanda"] and errors["sparsegpt"] < errors["wanda"]


def test_masked_model_saves_and_reloads(calib, tmp_path):
    pruned, result = prune_with("apt", make_tiny_model("qwen3"), calib, sparsity="2:4")
    folder = save_pruned(pruned, None, tmp_path / "m", result)
    reloaded, _ = load_pruned(folder)
    with torch.no_grad():
        diff = (reloaded(input_ids=calib[:2]).logits - pruned(input_ids=calib[:2]).logits).abs().max()
    assert diff <= 1e-4


def test_composed_comp_then_nm(calib):
    model = make_tiny_model("llama")
    pruned, result = prune_with("comp+nm", model, calib, ratio=0.2, sparsity="2:4")
    assert abs(result.realised_ratio - 0.2) < 0.01
    assert result.params_after == count_parameters(pruned)
    assert 0.45 < result.extra["linear_sparsity"] <= 0.5  # odd widths keep a dense tail
    assert result.plan.sparse_plan is not None and result.kind == "composed"
    with pytest.raises(ValueError, match="not a mask method"):
        prune_with("comp+nm", model, calib, sparse="wanda-sp")

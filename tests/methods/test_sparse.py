"""Mask methods (magnitude, Wanda, SparseGPT, APT) and their solvers: exact checks on small random problems,
then every architecture through the registry."""
from __future__ import annotations

import pytest
import torch

from comp_core.export.folder import load_pruned, save_pruned
from comp_core.methods import prune_with
from comp_core.methods.sparse import Wanda
from comp_core.models.adapters import get_adapter
from comp_core.math.obs_solvers import apt, least_squares_given_mask, reconstruction_error, sparsegpt
from comp_core.runtime import count_parameters
from comp_core.math.sparsity import SparsityPattern, holds_pattern, matrix_mask, nm_mask, row_mask, zero_counts

from tests.helpers import make_tiny_model

MASK_METHODS = ["magnitude", "wanda", "sparsegpt", "apt"]
PATTERNS = ["0.5", "2:4", "4:8"]


def _problem(seed: int, d_out: int = 10, d_in: int = 24, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    x = torch.randn(n, d_in, generator=g) * torch.rand(d_in, generator=g) * 3
    return w, (x.T @ x).double()


def _damped(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    return h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


# ---------------------------------------------------------------------------------------------- patterns

def test_pattern_parsing():
    assert SparsityPattern.parse("2:4") == SparsityPattern(0.5, 2, 4)
    assert SparsityPattern.parse("0.6").fraction == 0.6 and not SparsityPattern.parse("0.6").is_nm
    for bad in ("4:2", "1.5", "x", "2:x", "0:4"):
        with pytest.raises(ValueError):
            SparsityPattern.parse(bad)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_hold_exactly_n_of_every_m(n, m):
    scores = torch.rand(7, 32, generator=torch.Generator().manual_seed(n * m))
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(7, 32 // m, m).sum(-1) == n).all()
    # the pruned ones are the lowest of their group
    groups, pruned = scores.reshape(7, -1, m), mask.reshape(7, -1, m)
    assert (groups.masked_fill(~pruned, -1).amax(-1) <= groups.masked_fill(pruned, 2).amin(-1)).all()
    assert holds_pattern(mask, SparsityPattern(n / m, n, m))


def test_row_and_matrix_masks():
    scores = torch.arange(24.0).reshape(4, 6).flip(1)
    assert (row_mask(scores, 0.5).sum(1) == 3).all()
    assert row_mask(scores, 0.5)[:, 3:].all()
    mask = matrix_mask(torch.arange(24.0).reshape(4, 6), 0.25)
    assert mask.sum() == 6 and mask[0].all()


# ------------------------------------------------------------------------------------------------ solvers

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apt_in_one_block_is_the_least_squares_refit_of_the_kept_weights(pattern, seed):
    w, h = _problem(seed)
    out = apt(w, h, SparsityPattern.parse(pattern), blocksize=128)
    exact = least_squares_given_mask(w, h, out.mask)
    torch.testing.assert_close(out.weight.double(), exact, rtol=1e-4, atol=1e-5)
    assert (out.weight[out.mask] == 0).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_apt_error_is_at_most_sparsegpts_for_the_same_mask(pattern, blocksize):
    for seed in range(3):
        w, h = _problem(seed)
        ours = sparsegpt(w, h, SparsityPattern.parse(pattern), blocksize=blocksize)
        joint = apt(w, h, SparsityPattern.parse(pattern), blocksize=blocksize, mask=ours.mask)
        assert torch.equal(joint.mask, ours.mask)
        hd = _damped(h)
        assert reconstruction_error(w, joint.weight, hd) <= reconstruction_error(w, ours.weight, hd) + 1e-7


def _sparsegpt_reference(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain OBS, one column at a time: zero the masked weights of column i and update the columns after it
    with the inverse Hessian of the columns still free (no Cholesky, no blocks)."""
    h = _damped(h)
    w = w.double().clone()
    d = w.shape[1]
    for i in range(d):
        free = torch.arange(i, d)
        h_inv = torch.linalg.inv(h[free][:, free])  # (|F|, |F|)
        err = torch.where(mask[:, i], w[:, i], torch.zeros_like(w[:, i])) / h_inv[0, 0]
        w[:, i:] -= err.unsqueeze(1) * h_inv[0].unsqueeze(0)
        w[mask[:, i], i] = 0.0
    return w


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("blocksize", [3, 128])
def test_sparsegpt_matches_a_plain_reference_loop(pattern, blocksize):
    w, h = _problem(5, d_out=6, d_in=12, n=80)
    out = sparsegpt(w, h, SparsityPattern.parse(pattern), blocksize=blocksize)
    reference = _sparsegpt_reference(w, h, out.mask)
    torch.testing.assert_close(out.weight.double(), reference, rtol=1e-3, atol=1e-4)
    assert holds_pattern(out.mask, SparsityPattern.parse(pattern))


def test_sparsegpt_handles_dead_inputs():
    w, h = _problem(3)
    h[4, :] = 0
    h[:, 4] = 0
    out = sparsegpt(w, h, SparsityPattern.parse("0.5"))
    assert torch.isfinite(out.weight).all() and (out.weight[:, 4] == 0).all()


def test_wanda_score_per_row_is_hand_computed():
    w, h = _problem(7, d_out=4, d_in=8)
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

"""comp_core.math.obs_solvers: SparseGPT and APT (optimal brain surgeon updates under a mask) and the
least-squares refit of the kept weights, exact checks on small random problems."""
from __future__ import annotations

import pytest
import torch

from comp_core.math.obs_solvers import apt, least_squares_given_mask, reconstruction_error, sparsegpt
from comp_core.math.sparsity import SparsityPattern, holds_pattern

from tests.helpers import weight_and_gram

PATTERNS = ["0.5", "2:4", "4:8"]


def _damped(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    return h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_apt_in_one_block_is_the_least_squares_refit_of_the_kept_weights(pattern, seed):
    w, h = weight_and_gram(seed)
    out = apt(w, h, SparsityPattern.parse(pattern), blocksize=128)
    exact = least_squares_given_mask(w, h, out.mask)
    torch.testing.assert_close(out.weight.double(), exact, rtol=1e-4, atol=1e-5)
    assert (out.weight[out.mask] == 0).all()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("blocksize", [4, 8, 128])
def test_apt_error_is_at_most_sparsegpts_for_the_same_mask(pattern, blocksize):
    for seed in range(3):
        w, h = weight_and_gram(seed)
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
    w, h = weight_and_gram(5, d_out=6, d_in=12, n=80)
    out = sparsegpt(w, h, SparsityPattern.parse(pattern), blocksize=blocksize)
    reference = _sparsegpt_reference(w, h, out.mask)
    torch.testing.assert_close(out.weight.double(), reference, rtol=1e-3, atol=1e-4)
    assert holds_pattern(out.mask, SparsityPattern.parse(pattern))


def test_sparsegpt_handles_dead_inputs():
    w, h = weight_and_gram(3)
    h[4, :] = 0
    h[:, 4] = 0
    out = sparsegpt(w, h, SparsityPattern.parse("0.5"))
    assert torch.isfinite(out.weight).all() and (out.weight[:, 4] == 0).all()


@pytest.mark.parametrize("solver", [sparsegpt, apt])
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_obs_update_reconstructs_better_than_plain_masking(solver, pattern):
    """Same mask on correlated inputs, two weights: zeroing the pruned entries alone vs. the solver's update of the kept ones. The
    update must cut the calibration reconstruction error ‖(W − Ŵ)X‖² clearly, and keep the mask's pattern."""
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(24, 24, generator=g) / 24 ** 0.5 + torch.eye(24)
    x = torch.randn(300, 24, generator=g) @ mix  # correlated inputs: what the update exploits
    w, h = torch.randn(10, 24, generator=g), (x.T @ x).double()
    result = solver(w, h, SparsityPattern.parse(pattern))
    assert result.weight.shape == w.shape and result.mask.shape == w.shape and result.mask.dtype == torch.bool
    assert torch.equal(result.weight == 0, result.mask | (w == 0))  # pruned entries exactly 0, no others
    assert holds_pattern(~result.mask, SparsityPattern.parse(pattern))
    masked = w.masked_fill(result.mask, 0.0)
    plain, updated = reconstruction_error(w, masked, h), reconstruction_error(w, result.weight, h)
    assert 0.0 < updated < 0.9 * plain

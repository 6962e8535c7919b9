"""Numerics shared by every method: Gram accumulation, damped Cholesky, the mask solve and its exact path."""
from __future__ import annotations

import pytest
import torch

from comp_core.loop.stats import STAT_DTYPE, InputStats
from comp_core.math.linalg import cholesky, damped, damping, spd_inverse, spd_solve
from comp_core.math.mask_tuning import (coefficient_matrix, mask_path, mask_variance_plain, reconstruction_error,
                                   relative_error, solve_mask)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(d_out: int, d_in: int, n_tokens: int, seed: int, *, col_scale: bool = True):
    """Random W (d_out × d_in) and X (d_in × N) in float64, columns/features on different scales."""
    g = _gen(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=STAT_DTYPE)
    x = torch.randn(d_in, n_tokens, generator=g, dtype=STAT_DTYPE)
    if col_scale:
        w = w * torch.exp(0.5 * torch.randn(d_in, generator=g, dtype=STAT_DTYPE))
        x = x * torch.exp(0.5 * torch.randn(d_in, 1, generator=g, dtype=STAT_DTYPE))
    return w, x


def _coeff(d_in: int, n_tokens: int, seed: int, relative: float = 0.01) -> torch.Tensor:
    w, x = _problem(2 * d_in, d_in, n_tokens, seed)
    return damped(coefficient_matrix(w, x @ x.T), relative)


# ---------------------------------------------------------------------------------------------------------
# InputStats
# ---------------------------------------------------------------------------------------------------------

def test_gram_accumulator_equals_xtx_over_batches():
    g = _gen(0)
    batches = [torch.randn(2, 7, 5, generator=g), torch.randn(3, 4, 5, generator=g), torch.randn(11, 5, generator=g)]
    acc = InputStats(5)
    for b in batches:
        acc.update(b)
    x = torch.cat([b.reshape(-1, 5) for b in batches]).to(torch.float64)  # (N, d)
    assert acc.gram.dtype == torch.float64
    assert acc.n_tokens == 2 * 7 + 3 * 4 + 11 == x.shape[0]
    # float32 products per batch: ~1e-7 relative each, summed in float64
    torch.testing.assert_close(acc.gram, x.T @ x, rtol=1e-5, atol=1e-5)
    exact = InputStats(5)
    for b in batches:
        exact.update(b.double())  # float64 inputs stay float64 throughout
    torch.testing.assert_close(exact.gram, x.T @ x, rtol=1e-12, atol=1e-12)


def test_gram_accumulator_does_not_drift_over_many_batches():
    """Float64 accumulation: 400 float32 batch products sum to the float64 Gram within float32's rounding of
    one batch, not 400 times it."""
    g = _gen(3)
    batches = [torch.randn(4, 64, 6, generator=g) * 30 + 5 for _ in range(400)]
    acc = InputStats(6)
    for b in batches:
        acc.update(b)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    exact = x.T @ x
    assert float((acc.gram - exact).abs().max() / exact.abs().max()) < 1e-6
    assert float(acc.total.sub(x.sum(0)).abs().max() / x.sum(0).abs().max()) < 1e-9


def test_gram_accumulator_reads_low_precision_inputs():
    """bfloat16 inputs: their products are exact in float32, so one batch's Gram is exact up to the sum."""
    g = _gen(1)
    x = torch.randn(64, 3, generator=g).to(torch.bfloat16)
    acc = InputStats(3)
    acc.update(x)
    exact = x.double().T @ x.double()
    torch.testing.assert_close(acc.gram, exact, rtol=1e-6, atol=1e-6)


def test_fold_grams_split_by_sequence_and_sum_to_the_gram():
    """folds=2: every other calibration sequence in each fold, counted across batches (batch of 3 then 2:
    fold 0 = sequences 0, 2, 4, fold 1 = 1, 3)."""
    g = _gen(4)
    first, second = torch.randn(3, 5, 4, generator=g).double(), torch.randn(2, 5, 4, generator=g).double()
    acc = InputStats(4, folds=2)
    acc.update(first)
    acc.update(second)
    seqs = torch.cat([first, second])  # (5, 5, 4)

    def gram(rows):
        x = seqs[rows].reshape(-1, 4)
        return x.T @ x
    torch.testing.assert_close(acc.fold_grams[0], gram([0, 2, 4]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.fold_grams[1], gram([1, 3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.gram, gram([0, 1, 2, 3, 4]), rtol=1e-12, atol=1e-12)
    assert acc.n_tokens == 25
    with pytest.raises(ValueError, match="folds"):
        InputStats(4, folds=3)
    with pytest.raises(ValueError, match="unpaired"):
        InputStats(4, folds=2, paired=True)


# ---------------------------------------------------------------------------------------------------------
# damping and Cholesky
# ---------------------------------------------------------------------------------------------------------

def test_damping_is_relative_to_mean_diagonal():
    m = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert damping(m, 0.1) == pytest.approx(0.2)
    torch.testing.assert_close(damped(m, 0.1), m + 0.2 * torch.eye(3, dtype=torch.float64))
    assert damping(torch.zeros(3, 3, dtype=torch.float64), 0.1) == 0.1  # never 0
    assert torch.equal(m, torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)))  # not in place


def _rotated(eigs: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=_gen(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_cholesky_of_spd_needs_no_damping():
    a = _rotated([1.0, 2.0, 5.0, 0.5])
    lower, used = cholesky(a)
    assert used == 0.0
    torch.testing.assert_close(lower @ lower.T, a)


def test_cholesky_retry_increases_damping_on_indefinite_matrix():
    # one eigenvalue -1e-7: undamped and 1e-8/1e-7 relative damping (ε ≈ 0.67 × that) fail, 1e-6 works
    a = _rotated([1.0, 1.0, -1e-7])
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(a)
    lower, used = cholesky(a)
    assert used > 0.0
    assert used == pytest.approx(1e-6)
    torch.testing.assert_close(lower @ lower.T, damped(a, used), rtol=1e-12, atol=1e-12)

    # starting from a non-zero damping, the retry multiplies it by 10 until it works
    b = _rotated([1.0, 2.0, -0.01], seed=1)  # mean diagonal ≈ 1: needs relative damping > 0.01
    lower, used = cholesky(b, relative_damp=1e-3)
    assert used > 1e-3
    assert used == pytest.approx(0.1)
    torch.testing.assert_close(lower @ lower.T, damped(b, used), rtol=1e-12, atol=1e-12)


def test_cholesky_raises_when_hopeless():
    # mean diagonal 0: damping stays tiny (relative, absolute) and can never beat the eigenvalue −1
    hopeless = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(hopeless)
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(_rotated([1.0, 1.0, -1e-7]), max_tries=2)  # would need a third try


def test_spd_solve_and_inverse():
    a = _rotated([1.0, 3.0, 0.2, 7.0], seed=3)
    rhs = torch.randn(4, generator=_gen(4), dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, rhs), torch.linalg.solve(a, rhs))
    rhs2 = torch.randn(4, 3, generator=_gen(5), dtype=torch.float64)
    torch.testing.assert_close(spd_solve(a, rhs2), torch.linalg.solve(a, rhs2))
    torch.testing.assert_close(spd_inverse(a), torch.linalg.inv(a))


# ---------------------------------------------------------------------------------------------------------
# the mask solve
# ---------------------------------------------------------------------------------------------------------

def test_coefficient_matrix_gives_output_error():
    """(1 − m)ᵀ C (1 − m) = ‖W X − W diag(m) X‖² for any mask."""
    w, x = _problem(6, 5, 20, seed=7)
    c = coefficient_matrix(w, x @ x.T)
    m = torch.rand(5, generator=_gen(8), dtype=torch.float64)
    direct = float(((w @ x - w @ torch.diag(m) @ x) ** 2).sum())
    assert reconstruction_error(c, m) == pytest.approx(direct, rel=1e-10)
    assert relative_error(c, m) == pytest.approx(direct / float(((w @ x) ** 2).sum()), rel=1e-10)
    assert relative_error(c, torch.ones(5, dtype=torch.float64)) == 0.0
    assert relative_error(c, torch.zeros(5, dtype=torch.float64)) == pytest.approx(1.0)


@pytest.mark.parametrize("keep", [[0, 2, 4], [1, 2, 3, 4], [3], [0, 1, 2, 3, 4, 5, 6]])
def test_solve_mask_equals_explicit_least_squares(keep):
    """min over m_U of ‖W X − W[:,U] diag(m_U) X[U]‖² solved as an ordinary lstsq of the stacked problem."""
    d_out, d_in, n_tokens = 6, 8, 20
    w, x = _problem(d_out, d_in, n_tokens, seed=11)
    keep_t = torch.tensor(keep)
    target = (w @ x).reshape(-1)  # vec(W X), (d_out·N,)
    # column u of the design matrix: vec(W[:, u] X[u, :]) — the output contribution of input u
    design = torch.stack([torch.outer(w[:, u], x[u]).reshape(-1) for u in keep], dim=1)  # (d_out·N, k)
    expected = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
    coeff = damped(coefficient_matrix(w, x @ x.T), 1e-10)
    got = solve_mask(coeff, keep_t)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_solve_mask_is_ones_when_nothing_is_pruned():
    coeff = _coeff(9, 30, seed=2)
    m = solve_mask(coeff, torch.arange(9))
    torch.testing.assert_close(m, torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_tuning_lowers_reconstruction_error(seed):
    d_in = 16
    w, x = _problem(24, d_in, 48, seed=seed)
    raw = coefficient_matrix(w, x @ x.T)
    coeff = damped(raw, 1e-3)
    g = _gen(100 + seed)
    for n_keep in (2, 5, 8, 12, 15):
        keep = torch.sort(torch.randperm(d_in, generator=g)[:n_keep]).values
        plain = torch.zeros(d_in, dtype=torch.float64)
        plain[keep] = 1.0
        tuned = torch.zeros(d_in, dtype=torch.float64)
        tuned[keep] = solve_mask(coeff, keep)
        # exact minimiser of the damped objective, so never worse on it ...
        assert relative_error(coeff, tuned) <= relative_error(coeff, plain) + 1e-12
        # ... and with random data strictly better on the real (undamped) output error
        assert relative_error(raw, tuned) < relative_error(raw, plain)


# ---------------------------------------------------------------------------------------------------------
# the exact variance path
# ---------------------------------------------------------------------------------------------------------

CASES = [  # (d_in, tokens, max_removed)
    (5, 15, 4),
    (5, 15, 10),  # more than n − 1: clamped
    (17, 60, 12),
    (40, 120, 39),
    (24, 10, 20),  # fewer tokens than inputs: rank-deficient Gram, damping carries it
]


@pytest.mark.parametrize("d_in,n_tokens,max_removed", CASES)
def test_mask_path_variance_equals_plain_resolve(d_in, n_tokens, max_removed):
    coeff = _coeff(d_in, n_tokens, seed=d_in)
    g = _gen(d_in + n_tokens)
    orders = [torch.randperm(d_in, generator=g), torch.arange(d_in), torch.arange(d_in).flip(0)]
    for order in orders:
        reference = mask_variance_plain(coeff, order, max_removed)
        assert reference.numel() == min(max_removed, d_in - 1) + 1
        for chunk in (3, d_in, d_in + 7):  # smaller than n, equal, bigger
            path = mask_path(coeff, order, max_removed, chunk=chunk)
            assert path.variance.shape == reference.shape
            torch.testing.assert_close(path.variance, reference, rtol=0, atol=1e-10)
            assert torch.equal(path.prune_order, order)


@pytest.mark.parametrize("d_in,n_tokens,max_removed", CASES)
def test_mask_path_masks_equal_solve_mask(d_in, n_tokens, max_removed):
    coeff = _coeff(d_in, n_tokens, seed=d_in + 1)
    order = torch.randperm(d_in, generator=_gen(3 * d_in))
    for chunk in (3, d_in + 7):
        path = mask_path(coeff, order, max_removed, keep_masks=True, chunk=chunk)
        for k in range(min(max_removed, d_in - 1) + 1):
            keep = path.keep_index(k)
            assert keep.numel() == d_in - k
            # keep order = prune order reversed, minus the first k pruned
            assert set(keep.tolist()) == set(order[k:].tolist())
            torch.testing.assert_close(path.mask(k), solve_mask(coeff, keep), rtol=0, atol=1e-9)
            torch.testing.assert_close(path.mask(k).var(unbiased=False), path.variance[k], rtol=0, atol=1e-12)


def test_mask_path_full_mask_is_ones():
    coeff = _coeff(12, 40, seed=5)
    order = torch.randperm(12, generator=_gen(6))
    path = mask_path(coeff, order, 6, keep_masks=True)
    # mathematically exactly 1 (C⁻¹ C 1); numerically up to float64 rounding
    torch.testing.assert_close(path.mask(0), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
    assert float(path.variance[0]) < 1e-24


def test_mask_path_without_kept_masks_refuses_mask():
    coeff = _coeff(6, 20, seed=9)
    path = mask_path(coeff, torch.arange(6), 3)
    with pytest.raises(ValueError):
        path.mask(1)


def test_refit_columns_is_the_least_squares_solution_and_beats_the_mask():
    from comp_core.math.mask_tuning import refit_columns, refit_relative_error

    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 10, generator=g, dtype=torch.float64)
    x = torch.randn(10, 200, generator=g, dtype=torch.float64)
    gram = x @ x.T
    keep = torch.tensor([0, 2, 3, 5, 8, 9])
    new = refit_columns(w, gram, keep, relative_damp=1e-12)
    expected = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T  # argmin ‖W X − W' X_U‖
    assert torch.allclose(new, expected, atol=1e-8)
    coeff = coefficient_matrix(w, gram)
    mask = torch.zeros(10, dtype=torch.float64)
    mask[keep] = solve_mask(coeff, keep)
    assert refit_relative_error(w, gram, keep, new) <= relative_error(coeff, mask) + 1e-12

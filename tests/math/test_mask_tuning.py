"""comp_core.math.mask_tuning: the mask solve, its exact path, the refit and its ridge blend (the numerics COMP's
mask tuning and refit share)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comp_core.loop.stats import STAT_DTYPE
from comp_core.math.linalg import cholesky, damped
from comp_core.math.mask_tuning import (choose_ridge, coefficient_matrix, mask_path, mask_variance_plain,
                                        reconstruction_error, refit_relative_error, relative_error, ridge_refit,
                                        solve_mask)


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


# ---------------------------------------------------------------------------------------------------------
# the blend of mask tuning and the full refit (ridge towards the mask solution) and its held-out choice
# ---------------------------------------------------------------------------------------------------------

def _blend_problem(tokens: int, d_in: int = 12, d_out: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 + torch.eye(d_in, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ mix  # correlated inputs (tokens, d_in)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    keep = torch.ones(d_in, dtype=torch.bool)
    keep[[1, 4, 7, 10]] = False
    return x, w, keep


def _anchor(w, gram, keep):
    mask = solve_mask(coefficient_matrix(w, gram) + 1e-9 * torch.eye(w.shape[1], dtype=torch.float64), keep)
    return w[:, keep] * mask


def test_ridge_refit_is_the_augmented_least_squares():
    x, w, keep = _blend_problem(200)
    gram = x.T @ x
    anchor = _anchor(w, gram, keep)
    ridge = 0.05
    lam = ridge * float(gram[keep][:, keep].diagonal().mean())
    # brute force: stack [X_U; sqrt(lam) I] and targets [W X; sqrt(lam) A] row by row
    design = torch.cat([x[:, keep], lam ** 0.5 * torch.eye(int(keep.sum()), dtype=torch.float64)])
    target = torch.cat([x @ w.T, lam ** 0.5 * anchor.T])
    brute = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(ridge_refit(w, gram, keep, anchor, ridge), brute, rtol=1e-9, atol=1e-9)


def test_ridge_refit_ends_are_the_refit_and_the_mask():
    x, w, keep = _blend_problem(400)
    gram = x.T @ x
    anchor = _anchor(w, gram, keep)
    refit = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(ridge_refit(w, gram, keep, anchor, 1e-12), refit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ridge_refit(w, gram, keep, anchor, 1e9), anchor, rtol=1e-6, atol=1e-6)
    # the refit never fits the calibration worse than the blend, the blend never worse than the mask
    errors = [refit_relative_error(w, gram, keep, ridge_refit(w, gram, keep, anchor, r)) for r in (1e-9, 0.1, 1e9)]
    assert errors[0] <= errors[1] <= errors[2]


def test_choose_ridge_held_out_errors_equal_direct_fits():
    x, w, keep = _blend_problem(300)
    fold_a, fold_b = x[0::2], x[1::2]
    folds = (fold_a.T @ fold_a, fold_b.T @ fold_b)
    anchor = _anchor(w, folds[0] + folds[1], keep)
    choice = choose_ridge(w, folds, keep, anchor, grid=(0.01, 0.3))
    for r in (0.01, 0.3):
        direct = (refit_relative_error(w, folds[1], keep, ridge_refit(w, folds[0], keep, anchor, r))
                  + refit_relative_error(w, folds[0], keep, ridge_refit(w, folds[1], keep, anchor, r))) / 2
        assert choice.heldout[r] == pytest.approx(direct, rel=1e-7)
    mask = (refit_relative_error(w, folds[1], keep, anchor) + refit_relative_error(w, folds[0], keep, anchor)) / 2
    assert choice.mask_heldout == pytest.approx(mask, rel=1e-9)
    best = min(choice.heldout.values())
    assert choice.ridge == (min(choice.heldout, key=choice.heldout.get) if best < mask else math.inf)


def test_choose_ridge_follows_the_tokens_per_column():
    """Plenty of tokens: a weak ridge (close to the refit) wins on held-out data. Fewer tokens per fold than
    kept columns: the refit interpolates noise, so the choice moves to a strong ridge or the mask itself."""
    x, w, keep = _blend_problem(4000, d_in=24, d_out=6, seed=1)
    w_true = w.clone()
    noise = torch.Generator().manual_seed(9)
    # the layer's real inputs carry a nonlinear part the kept columns can partly explain
    x = x + 0.3 * torch.tanh(x).roll(1, dims=1) + 0.05 * torch.randn(x.shape, generator=noise, dtype=torch.float64)

    def choice_for(tokens: int):
        part = x[:tokens]
        folds = (part[0::2].T @ part[0::2], part[1::2].T @ part[1::2])
        return choose_ridge(w_true, folds, keep, _anchor(w_true, folds[0] + folds[1], keep))

    rich, poor = choice_for(4000), choice_for(24)
    assert rich.ridge <= 0.01
    assert poor.ridge >= 0.3
    assert min(rich.heldout.values()) < rich.mask_heldout


# ---------------------------------------------------------------------------------------------------------
# properties (hypothesis): checked on generated inputs instead of a few hand-picked ones
# ---------------------------------------------------------------------------------------------------------

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

@st.composite
def dense_problems(draw):
    d_out, d_in = draw(st.integers(1, 12)), draw(st.integers(2, 16))
    tokens = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, d_in, generator=generator, dtype=torch.float64)  # (N, d_in)
    n_removed = draw(st.integers(1, d_in - 1))
    order = torch.randperm(d_in, generator=generator)
    damp = draw(st.sampled_from([1e-8, 1e-4, 1e-2, 0.1]))
    return weight, x, order, n_removed, damp


@FAST
@given(dense_problems())
def test_mask_tuning_never_increases_the_calibration_reconstruction_error(case):
    weight, x, order, n_removed, damp = case
    coeff = coefficient_matrix(weight, x.T @ x)  # undamped: the error the calibration sees
    keep = order[n_removed:]
    untuned = torch.zeros(coeff.shape[0], dtype=coeff.dtype)
    untuned[keep] = 1.0
    tuned = untuned.clone()
    tuned[keep] = solve_mask(damped(coeff, damp), keep)
    before, after = reconstruction_error(coeff, untuned), reconstruction_error(coeff, tuned)
    assert after <= before * (1 + 1e-9) + 1e-9 * float(coeff.diagonal().sum())


@FAST
@given(dense_problems())
def test_the_mask_path_equals_a_fresh_solve_at_every_prefix(case):
    weight, x, order, n_removed, damp = case
    coeff = damped(coefficient_matrix(weight, x.T @ x), damp)
    path = mask_path(coeff, order, n_removed, keep_masks=True)
    plain = mask_variance_plain(coeff, order, n_removed)
    assert torch.allclose(path.variance, plain, rtol=1e-5, atol=1e-10)
    for k in range(n_removed + 1):
        keep = path.keep_index(k)
        reference = solve_mask(coeff, keep)
        # two exact routes to one solve agree to the kept system's conditioning: a rank-1 Gram damped by 1e-8
        # (condition number ~3e8) gave a fresh solve and the path's downdates 1.7e-5 apart (a fresh clone's run)
        cond = float(torch.linalg.cond(coeff[keep][:, keep]))
        assert torch.allclose(path.mask(k), reference, rtol=max(1e-6, 1e-12 * cond), atol=1e-8)


@FAST
@given(st.integers(3, 12), st.integers(0, 2**31 - 1))
def test_the_mask_path_stays_exact_when_the_cholesky_needs_more_damping(d_in, seed):
    """A dead input (a zero weight column) makes C singular: the factorisation retries with damping, and the
    path must then solve the damped system on both sides, as solve_mask on that same matrix does."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, d_in, generator=generator, dtype=torch.float64)
    weight[:, seed % d_in] = 0.0
    x = torch.randn(32, d_in, generator=generator, dtype=torch.float64)
    coeff = coefficient_matrix(weight, x.T @ x)
    _, retry = cholesky(coeff)
    assert retry > 0
    order = torch.randperm(d_in, generator=generator)
    path = mask_path(coeff, order, d_in - 1, keep_masks=True)
    system = damped(coeff, retry)  # what the path factorised
    for k in range(d_in):
        assert torch.allclose(path.mask(k), solve_mask(system, path.keep_index(k)), rtol=1e-6, atol=1e-6), k


def test_the_mask_path_agrees_with_a_fresh_solve_on_a_rank_one_gram():
    """The case a fresh clone's random draw found: one calibration token, damping 1e-8 (condition ~3e8)."""
    weight = torch.tensor([[-1.6928, 0.7788, -0.9727, -0.6992, -0.5572, -0.9217, 0.3024, -0.5698, 0.2641, -0.0710],
                           [-0.6962, 1.0115, -0.4542, -0.7648, -1.6179, -0.0931, 0.9381, 0.8533, -0.5493, -1.5722],
                           [0.3446, -0.1238, -1.1814, 0.8541, -0.9998, 0.6988, 0.6539, 0.2847, -0.0987, 1.8202],
                           [0.3145, -1.4871, -0.7751, 0.5262, -0.6134, 0.2903, -0.7619, -1.0174, -0.6549, -0.4431]],
                          dtype=torch.float64)
    x = torch.tensor([[-0.4733, 0.1551, -0.8894, 0.3307, -0.1562, 2.0551, 0.0929, -0.1253, 1.3930, 0.3175]],
                     dtype=torch.float64)
    coeff = damped(coefficient_matrix(weight, x.T @ x), 1e-8)
    path = mask_path(coeff, torch.tensor([7, 6, 5, 0, 1, 2, 9, 3, 8, 4]), 3, keep_masks=True)
    for k in range(4):
        keep = path.keep_index(k)
        reference = solve_mask(coeff, keep)
        assert float(((path.mask(k) - reference).abs() / reference.abs()).max()) < 1e-4
        # and both are solutions: the same objective value
        full = [torch.zeros(10, dtype=torch.float64) for _ in range(2)]
        full[0][keep], full[1][keep] = path.mask(k), reference
        errors = [reconstruction_error(coeff, m) for m in full]
        assert errors[0] == pytest.approx(errors[1], rel=1e-9, abs=1e-12)

"""Neuron importance scores: definitions, the OBS brute force, and the condition-number score's ranking quality."""
from __future__ import annotations

import math

import pytest
import torch

from comp_core.math.linalg import STAT_DTYPE, damped, damping
from comp_core.math.mask_tuning import coefficient_matrix, reconstruction_error, solve_mask
from comp_core.math.scoring import (SCORES, activation_score, condition_score, diagonal_score, exact_condition_score,
                               log_condition, logdet_score, magnitude_score, obs_score, score_neurons,
                               sequential_obs_score,
                               submatrix_extreme_eigenvalues)


def _problem(d_in: int, d_out: int, n_tokens: int, generator: torch.Generator, spread: float = 1.0):
    """Random W (d_out × d_in), X (d_in × N) with per-neuron scales; returns W, Gram, raw C."""
    w = torch.randn(d_out, d_in, generator=generator, dtype=STAT_DTYPE)
    w = w * torch.exp(spread * torch.randn(d_in, generator=generator, dtype=STAT_DTYPE))
    x = torch.randn(d_in, n_tokens, generator=generator, dtype=STAT_DTYPE)
    x = x * torch.exp(spread * torch.randn(d_in, 1, generator=generator, dtype=STAT_DTYPE))
    gram = x @ x.T
    return w, gram, coefficient_matrix(w, gram)


def _drop(matrix: torch.Tensor, j: int) -> torch.Tensor:
    rest = [i for i in range(matrix.shape[0]) if i != j]
    return matrix[rest][:, rest]


def _ranks(v: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(v, dtype=torch.float64)
    out[torch.argsort(v)] = torch.arange(v.numel(), dtype=torch.float64)
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (continuous data: no ties to handle)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_spearman_helper():
    a = torch.tensor([0.1, 0.5, 0.3, 2.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------------------
# OBS
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_obs_score_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    d = 9
    _, _, raw = _problem(d, 14, 30, g)
    coeff = damped(raw, 0.01)
    score = obs_score(coeff)
    inverse_diag = torch.linalg.inv(coeff).diagonal()
    for j in range(d):
        keep = torch.tensor([i for i in range(d) if i != j])
        # min over m_{-j} of (1 − m)ᵀ C (1 − m) with m_j = 0: re-tune every other entry
        m = torch.zeros(d, dtype=STAT_DTYPE)
        m[keep] = solve_mask(coeff, keep)
        brute = reconstruction_error(coeff, m)
        # the same minimum in closed form: Schur complement C_jj − C_j,-j C_-j,-j⁻¹ C_-j,j
        c_rest = coeff[j, keep]
        schur = float(coeff[j, j] - c_rest @ torch.linalg.solve(_drop(coeff, j), c_rest))
        assert brute == pytest.approx(schur, rel=1e-9)
        assert float(score[j]) == pytest.approx(brute, rel=1e-9)
        assert float(score[j]) == pytest.approx(1.0 / float(inverse_diag[j]), rel=1e-12)
        # and it is a minimum: any other mask with m_j = 0 does no better
        other = m.clone()
        other[keep] += 0.01 * torch.randn(d - 1, generator=g, dtype=STAT_DTYPE)
        assert reconstruction_error(coeff, other) >= brute


# ---------------------------------------------------------------------------------------------------------
# plain definitions
# ---------------------------------------------------------------------------------------------------------

def test_diagonal_magnitude_activation_definitions():
    g = torch.Generator().manual_seed(3)
    w32 = torch.randn(7, 5, generator=g)
    x = torch.randn(20, 5, generator=g, dtype=STAT_DTYPE)  # (tokens, d_in)
    gram = x.T @ x
    coeff = coefficient_matrix(w32, gram)
    w = w32.double()
    col_w = (w ** 2).sum(0)  # ‖W_:,j‖²
    col_x = (x ** 2).sum(0)  # ‖X_j‖²
    torch.testing.assert_close(diagonal_score(coeff), col_w * col_x)
    torch.testing.assert_close(magnitude_score(w32), col_w)
    torch.testing.assert_close(activation_score(gram), col_x)
    assert magnitude_score(w32).dtype == STAT_DTYPE
    # scores are copies: changing them leaves the statistics alone
    d = diagonal_score(coeff)
    d += 1
    a = activation_score(gram)
    a += 1
    torch.testing.assert_close(coeff.diagonal(), col_w * col_x)
    torch.testing.assert_close(gram.diagonal(), col_x)


def test_score_neurons_dispatch():
    g = torch.Generator().manual_seed(4)
    w, gram, raw = _problem(6, 8, 25, g)
    coeff = damped(raw, 0.01)
    eps = damping(raw, 0.01)
    fisher = torch.rand(6, generator=g)
    expected = {
        "diag": diagonal_score(coeff),
        "obs": obs_score(coeff),
        "cond": condition_score(coeff, eps),
        "cond-exact": exact_condition_score(coeff),
        "logdet": logdet_score(coeff),
        "magnitude": magnitude_score(w),
        "obs-greedy": sequential_obs_score(w, gram),
        "activation": activation_score(gram),
        "fisher": fisher.double(),
    }
    assert set(expected) == set(SCORES)
    for name, value in expected.items():
        got = score_neurons(name, coeff, w, gram, damp=eps, fisher=fisher)
        assert got.dtype == STAT_DTYPE, name
        assert got.shape == (6,), name
        torch.testing.assert_close(got, value, msg=name)


def test_score_neurons_errors():
    g = torch.Generator().manual_seed(5)
    w, gram, raw = _problem(4, 5, 10, g)
    coeff = damped(raw, 0.01)
    with pytest.raises(ValueError, match="unknown importance score"):
        score_neurons("wanda++", coeff, w, gram)
    with pytest.raises(ValueError, match="gradients"):
        score_neurons("fisher", coeff, w, gram)


# ---------------------------------------------------------------------------------------------------------
# condition-number score
# ---------------------------------------------------------------------------------------------------------

def test_condition_score_gradient_matches_finite_difference():
    """g_j = ∂ log κ(D_m C₀ D_m + εI)/∂m_j at m = 1, which the score is built from."""
    g = torch.Generator().manual_seed(6)
    d = 8
    _, _, raw = _problem(d, 12, 30, g, spread=0.5)
    eps = damping(raw, 0.01)
    coeff = damped(raw, 0.01)

    def f(m: torch.Tensor) -> float:
        return log_condition(torch.diag(m) @ raw @ torch.diag(m) + eps * torch.eye(d, dtype=STAT_DTYPE))

    h = 1e-6
    grad = torch.tensor([(f(torch.ones(d, dtype=STAT_DTYPE) + h * torch.eye(d, dtype=STAT_DTYPE)[j])
                          - f(torch.ones(d, dtype=STAT_DTYPE) - h * torch.eye(d, dtype=STAT_DTYPE)[j])) / (2 * h)
                         for j in range(d)], dtype=STAT_DTYPE)
    # the score is |−g + g²/2|; recover it from the numerical gradient
    torch.testing.assert_close(condition_score(coeff, eps), (-grad + 0.5 * grad ** 2).abs(), rtol=1e-5, atol=1e-8)


def _spearman_trials(n_trials: int = 30, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    score_corr, chance_corr = [], []
    for _ in range(n_trials):
        _, _, raw = _problem(d, 24, 48, g)
        coeff = damped(raw, 0.01)
        score = condition_score(coeff, damp=damping(raw, 0.01))
        base = log_condition(coeff)
        # removing neuron j leaves the principal submatrix of the mask-tuning system
        truth = torch.tensor([abs(log_condition(_drop(coeff, j)) - base) for j in range(d)], dtype=STAT_DTYPE)
        score_corr.append(spearman(score, truth))
        chance_corr.append(spearman(torch.rand(d, generator=g, dtype=STAT_DTYPE), truth))
    return torch.tensor(score_corr), torch.tensor(chance_corr)


def test_condition_score_ranks_true_condition_change_better_than_chance():
    """Measured on this setup: mean Spearman 0.80, positive in 30/30 trials, chance baseline mean 0.02."""
    score_corr, chance_corr = _spearman_trials()
    assert float(score_corr.mean()) > 0.65
    assert float((score_corr > 0).float().mean()) >= 0.9
    assert abs(float(chance_corr.mean())) < 0.2
    assert float(score_corr.mean()) > float(chance_corr.mean()) + 0.4


# ---------------------------------------------------------------------------------------------------------
# whole-spectrum condition scores: exact log det and exact log κ change per removed column
# ---------------------------------------------------------------------------------------------------------

def _brute_extremes(coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """λ_min, λ_max of every principal submatrix C_{-j,-j} by a full eigvalsh each."""
    eig = [torch.linalg.eigvalsh(_drop(coeff, j)) for j in range(coeff.shape[0])]
    return torch.stack([e[0] for e in eig]), torch.stack([e[-1] for e in eig])


@pytest.mark.parametrize("seed, d", [(0, 12), (1, 25), (2, 40)])
def test_exact_condition_score_equals_brute_force(seed, d):
    g = torch.Generator().manual_seed(seed)
    _, _, raw = _problem(d, 2 * d, 3 * d, g)
    coeff = damped(raw, 0.01)
    mu_min, mu_max = submatrix_extreme_eigenvalues(coeff)
    brute_min, brute_max = _brute_extremes(coeff)
    torch.testing.assert_close(mu_min, brute_min, rtol=1e-10, atol=0)
    torch.testing.assert_close(mu_max, brute_max, rtol=1e-10, atol=0)
    truth = log_condition(coeff) - torch.log(brute_max / brute_min)  # drop of log κ, ≥ 0 by interlacing
    score = exact_condition_score(coeff)
    assert bool((score >= 0).all())
    torch.testing.assert_close(score, truth, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("seed, d", [(3, 12), (4, 25), (5, 40)])
def test_logdet_score_equals_brute_force(seed, d):
    g = torch.Generator().manual_seed(seed)
    _, _, raw = _problem(d, 2 * d, 3 * d, g)
    coeff = damped(raw, 0.01)
    full = torch.linalg.slogdet(coeff)
    assert float(full.sign) == 1.0
    brute = torch.stack([full.logabsdet - torch.linalg.slogdet(_drop(coeff, j)).logabsdet for j in range(d)])
    score = logdet_score(coeff)
    torch.testing.assert_close(score, brute, rtol=1e-8, atol=1e-10)
    # the identity behind it: log det C − log det C_{-j,-j} = log of the OBS error, so both rank alike
    torch.testing.assert_close(score, torch.log(obs_score(coeff)), rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.argsort(score), torch.argsort(obs_score(coeff)))


def test_exact_condition_score_degenerate_spectra():
    """u_kj = 0 (block-diagonal and diagonal C) and repeated eigenvalues keep the eigenvalue, as brute force."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(5, 9, generator=g, dtype=STAT_DTYPE)
    b = torch.randn(4, 9, generator=g, dtype=STAT_DTYPE)
    block = torch.block_diag(a @ a.T, 3.0 * (b @ b.T)) + 0.1 * torch.eye(9, dtype=STAT_DTYPE)
    diagonal = torch.diag(torch.tensor([3.0, 1.0, 7.0, 2.0, 5.0], dtype=STAT_DTYPE))
    low = torch.randn(8, 3, generator=g, dtype=STAT_DTYPE)
    repeated = low @ low.T + 0.5 * torch.eye(8, dtype=STAT_DTYPE)  # λ = 0.5 five times
    for coeff in (block, diagonal, repeated):
        mu_min, mu_max = submatrix_extreme_eigenvalues(coeff)
        brute_min, brute_max = _brute_extremes(coeff)
        torch.testing.assert_close(mu_min, brute_min, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(mu_max, brute_max, rtol=1e-10, atol=1e-13)
    # a diagonal C: only removing the smallest (1.0) or largest (7.0) entry changes κ, by log(2) and log(7/5)
    expected = torch.tensor([0.0, math.log(2.0), math.log(7 / 5), 0.0, 0.0], dtype=STAT_DTYPE)
    torch.testing.assert_close(exact_condition_score(diagonal), expected, rtol=1e-12, atol=1e-14)
    # repeated λ_min: every submatrix keeps it, so only the top of the spectrum can move
    torch.testing.assert_close(submatrix_extreme_eigenvalues(repeated)[0], torch.full((8,), 0.5, dtype=STAT_DTYPE))


def test_whole_spectrum_scores_finite_when_ill_conditioned():
    """Fewer tokens than columns (a rank-deficient Gram) plus light damping: finite, interlaced scores."""
    g = torch.Generator().manual_seed(8)
    d = 40
    _, _, raw = _problem(d, 6, 10, g, spread=1.5)  # the Gram has rank 10 < d
    coeff = damped(raw, 1e-6)  # 1e-2 caps κ near 100·d; this one is far worse
    eig = torch.linalg.eigvalsh(coeff)
    assert float(eig[-1] / eig[0]) > 1e7
    for score in (exact_condition_score(coeff), logdet_score(coeff)):
        assert score.shape == (d,) and score.dtype == STAT_DTYPE
        assert bool(torch.isfinite(score).all())
    assert bool((exact_condition_score(coeff) >= 0).all())
    mu_min, mu_max = submatrix_extreme_eigenvalues(coeff)
    assert bool((mu_min >= eig[0]).all() and (mu_min <= eig[1]).all())
    assert bool((mu_max <= eig[-1]).all() and (mu_max >= eig[-2]).all())
    # still equal to brute force where brute force itself is accurate (absolute error ~ eps·λ_max)
    brute_min, brute_max = _brute_extremes(coeff)
    torch.testing.assert_close(mu_min, brute_min, rtol=1e-6, atol=1e-12 * float(eig[-1]))
    torch.testing.assert_close(mu_max, brute_max, rtol=1e-10, atol=0)


def test_whole_spectrum_scores_by_name():
    g = torch.Generator().manual_seed(9)
    w, gram, raw = _problem(10, 12, 30, g)
    coeff = damped(raw, 0.01)
    eps = damping(raw, 0.01)
    for name, fn in (("cond-exact", exact_condition_score), ("logdet", logdet_score)):
        assert name in SCORES
        got = score_neurons(name, coeff, w, gram, damp=eps)
        assert got.dtype == STAT_DTYPE and got.shape == (10,)
        torch.testing.assert_close(got, fn(coeff), msg=name)


def _refit_error(w: torch.Tensor, h: torch.Tensor, removed: list[int]) -> float:
    """min over the kept columns of tr((W − Ŵ) H (W − Ŵ)ᵀ), Ŵ zero on ``removed``: the refit objective."""
    keep = [j for j in range(h.shape[0]) if j not in removed]
    new = torch.zeros_like(w)
    new[:, keep] = torch.linalg.solve(h[keep][:, keep], (w @ h[:, keep]).T).T
    diff = w - new
    return float(torch.einsum("ij,jk,ik->", diff, h, diff))


@pytest.mark.parametrize("seed", range(3))
def test_sequential_obs_is_the_greedy_refit_order(seed):
    generator = torch.Generator().manual_seed(seed)
    w, gram, _ = _problem(9, 5, 40, generator)
    h = gram.clone()
    h.diagonal().add_(0.01 * float(gram.diagonal().mean()))
    removed: list[int] = []
    for _ in range(8):  # brute-force greedy: each step removes the column whose removal (with refit) costs least
        removed.append(min((j for j in range(9) if j not in removed), key=lambda j: _refit_error(w, h, removed + [j])))
    order = torch.argsort(sequential_obs_score(w, gram, group=1))
    assert order[:8].tolist() == removed
    # with groups it is still a ranking: every column gets a distinct step
    grouped = sequential_obs_score(w, gram, group=4)
    assert sorted(grouped.tolist()) == list(range(9))
    assert "obs-greedy" in SCORES

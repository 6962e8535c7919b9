"""The blend of mask tuning and the full refit (ridge towards the mask solution) and its held-out choice."""
import math

import pytest
import torch

from comp_core.math.mask_tuning import (choose_ridge, coefficient_matrix, refit_relative_error, ridge_refit,
                                   solve_mask)


def _problem(tokens: int, d_in: int = 12, d_out: int = 5, seed: int = 0):
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
    x, w, keep = _problem(200)
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
    x, w, keep = _problem(400)
    gram = x.T @ x
    anchor = _anchor(w, gram, keep)
    refit = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(ridge_refit(w, gram, keep, anchor, 1e-12), refit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ridge_refit(w, gram, keep, anchor, 1e9), anchor, rtol=1e-6, atol=1e-6)
    # the refit never fits the calibration worse than the blend, the blend never worse than the mask
    errors = [refit_relative_error(w, gram, keep, ridge_refit(w, gram, keep, anchor, r)) for r in (1e-9, 0.1, 1e9)]
    assert errors[0] <= errors[1] <= errors[2]


def test_choose_ridge_held_out_errors_equal_direct_fits():
    x, w, keep = _problem(300)
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
    x, w, keep = _problem(4000, d_in=24, d_out=6, seed=1)
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

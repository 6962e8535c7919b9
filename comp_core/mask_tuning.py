"""Least-squares mask tuning of a dense's input columns, and its variance path.

For a dense with weight W (d_out × d_in) and calibration inputs X (d_in × N), pruning input set P and
rescaling the kept set U by a mask m minimises

    ‖W X − W diag(m) X‖²  =  (1 − m)ᵀ C (1 − m),      C = (WᵀW) ⊙ (X Xᵀ)   (d_in × d_in)

with m_P = 0. Setting the gradient in m_U to zero gives the normal equations C_UU m_U = C_U,: · 1.
We solve them with C replaced by C + εI (ε relative to the mean diagonal). With the same C on both sides,
this is the minimiser of the objective plus ε‖m_U − 1‖²: it shrinks the mask towards "unchanged", never
towards zero, and m = 1 exactly when nothing is pruned.

The paper prunes one neuron at a time and re-solves every step (the slow part: 30 min for a 7B model).
``mask_path`` gets the exact masks for *every* prefix of a fixed pruning order from one Cholesky factor:
order the columns most-important first; the leading k×k block of C has as Cholesky factor the leading
block of L, and L⁻¹'s leading block is that block's inverse, so with y = L⁻¹ b (a prefix-stable forward
substitution) the mask of the first k columns is  m_k[i] = Σ_{p<k} (L⁻¹)[p, i] · y[p]  — the row-wise
cumulative sum of Z = L⁻¹ ⊙ y. One O(n³/3) factorisation instead of n re-factorisations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linalg import STAT_DTYPE, cholesky, damped


def coefficient_matrix(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """C = (WᵀW) ⊙ G, float64, (d_in × d_in). ``gram`` is X Xᵀ over calibration tokens."""
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    return (w.T @ w) * gram


def solve_mask(coeff: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask of the kept columns: solve C_UU m_U = C_U,: · 1 by Cholesky (C already damped)."""
    c_uu = coeff[keep][:, keep]  # (k, k)
    rhs = coeff[keep].sum(dim=1)  # (k,)
    lower, _ = cholesky(c_uu)
    return torch.cholesky_solve(rhs.unsqueeze(1), lower).squeeze(1)


def reconstruction_error(coeff: torch.Tensor, mask: torch.Tensor) -> float:
    """(1 − m)ᵀ C (1 − m): squared output error ‖WX − W diag(m) X‖² for a full-length mask."""
    delta = 1.0 - mask.to(coeff.dtype)
    return float(delta @ coeff @ delta)


def relative_error(coeff: torch.Tensor, mask: torch.Tensor) -> float:
    """Reconstruction error relative to ‖W X‖² = 1ᵀ C 1 (0 = perfect, 1 = output lost)."""
    total = float(coeff.sum())
    return reconstruction_error(coeff, mask) / total if total > 0 else 0.0


@dataclass
class MaskPath:
    """Masks and their variance for every prefix of one pruning order of one dense.

    ``prune_order``: all d_in columns, least important (pruned first) first. ``variance[k]`` is the
    variance of the kept mask entries after pruning the first k columns, for k = 0..max_removed.
    """

    prune_order: torch.Tensor  # (d_in,)
    variance: torch.Tensor  # (max_removed + 1,)
    _cumulative: torch.Tensor | None = None  # (d_in, d_in) rows = masks in keep order; None when not kept

    def keep_index(self, n_removed: int) -> torch.Tensor:
        """Kept columns (positions in W), in keep order, after removing ``n_removed``."""
        keep_order = self.prune_order.flip(0)
        return keep_order[: self.prune_order.numel() - n_removed]

    def mask(self, n_removed: int) -> torch.Tensor:
        """Mask for ``keep_index(n_removed)`` taken from the path (exact, no extra solve)."""
        if self._cumulative is None:
            raise ValueError("mask path built with keep_masks=False")
        k = self.prune_order.numel() - n_removed
        return self._cumulative[k - 1, :k]


def mask_path(coeff: torch.Tensor, prune_order: torch.Tensor, max_removed: int, *, keep_masks: bool = False,
              chunk: int = 512) -> MaskPath:
    """Exact variance of the tuned mask after removing each prefix of ``prune_order`` (C already damped).

    Cost: one Cholesky and one triangular inverse of the permuted C; the cumulative sums are streamed in
    row chunks, so unless ``keep_masks`` only O(chunk × d_in) extra memory is used.
    """
    n = coeff.shape[0]
    max_removed = int(min(max_removed, n - 1))
    keep_order = prune_order.flip(0)
    permuted = coeff[keep_order][:, keep_order]  # (n, n)
    rhs = permuted.sum(dim=1)  # C_{U,:}·1 in keep order, (n,)
    lower, _ = cholesky(permuted)
    eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
    lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False)  # (n, n) lower triangular
    y = lower_inv @ rhs  # (n,)

    first_row = n - max_removed - 1  # row k'-1 for the smallest kept count k' = n - max_removed
    running = (lower_inv[:first_row] * y[:first_row, None]).sum(dim=0) if first_row > 0 else torch.zeros_like(y)
    sums, squares, rows = [], [], []
    for start in range(first_row, n, chunk):
        stop = min(start + chunk, n)
        block = torch.cumsum(lower_inv[start:stop] * y[start:stop, None], dim=0) + running  # (c, n)
        running = block[-1]
        sums.append(block.sum(dim=1))
        squares.append((block * block).sum(dim=1))
        if keep_masks:
            rows.append(block)
    kept = torch.arange(first_row + 1, n + 1, dtype=coeff.dtype, device=coeff.device)  # k' per row
    s1, s2 = torch.cat(sums), torch.cat(squares)
    var_by_kept = (s2 / kept - (s1 / kept) ** 2).clamp_min(0.0)  # index: k' - first_row - 1
    variance = var_by_kept.flip(0)  # index: removed count 0..max_removed
    cumulative = None
    if keep_masks:
        cumulative = torch.zeros(n, n, dtype=coeff.dtype, device=coeff.device)
        cumulative[first_row:] = torch.cat(rows)
    return MaskPath(prune_order=prune_order, variance=variance, _cumulative=cumulative)


def mask_variance_plain(coeff: torch.Tensor, prune_order: torch.Tensor, max_removed: int) -> torch.Tensor:
    """Reference implementation of ``mask_path(...).variance``: re-solve from scratch at every step."""
    n = coeff.shape[0]
    out = []
    keep_order = prune_order.flip(0)
    for k in range(min(max_removed, n - 1) + 1):
        m = solve_mask(coeff, keep_order[: n - k])
        out.append(m.var(unbiased=False))
    return torch.stack(out)


def damped_coefficients(weight: torch.Tensor, gram: torch.Tensor, relative_damp: float) -> torch.Tensor:
    return damped(coefficient_matrix(weight, gram), relative_damp)


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, relative_damp: float) -> torch.Tensor:
    """Full least-squares refit of the kept columns: argmin_W' ‖W X − W' X_U‖², float64 (d_out × k).

    W' = W G_{:,U} (G_UU + εI)⁻¹. A free weight per kept entry instead of one scalar per column: better
    with plenty of calibration tokens, catastrophic when tokens < d_in (G_UU is then rank-deficient and the
    solve fits noise; shared notes/calibration.md measured 3 299 vs 68.6 perplexity at 10 × 128 tokens).
    """
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    g_uu = damped(gram[keep][:, keep], relative_damp)  # (k, k)
    rhs = (w @ gram[:, keep]).T  # (k, d_out)
    lower, _ = cholesky(g_uu)
    return torch.cholesky_solve(rhs, lower).T  # (d_out, k)


def refit_relative_error(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, new_weight: torch.Tensor) -> float:
    """‖W X − W' X_U‖² / ‖W X‖² computed from the Gram (no activations needed)."""
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)
    delta = w.clone()
    delta[:, keep] -= new_weight
    total = float(((w @ gram) * w).sum())
    return float(((delta @ gram) * delta).sum()) / total if total > 0 else 0.0


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation: the removed inputs' mean contribution W_:,R μ_R, to add to the output bias (d_out,).

    Exact when the removed inputs are constant over the calibration tokens; in general it leaves only their
    fluctuation around the mean as output error (``removal_error`` with ``centred=True``).
    """
    w = weight.detach().to(device=mean.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    return w[:, removed] @ mean[removed]


def removal_error(weight: torch.Tensor, gram: torch.Tensor, removed: torch.Tensor, *,
                  total: torch.Tensor | None = None, n_tokens: int = 0) -> float:
    """‖W_:,R X_R − b‖² / ‖W X‖² for dropping input columns R: with ``total`` (Σ_t x_t) and ``n_tokens`` the
    bias b = W_:,R μ_R is subtracted (centred Gram G − n μμᵀ), else b = 0."""
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    g_rr = gram[removed][:, removed]
    if total is not None and n_tokens > 0:
        mu = total[removed] / n_tokens
        g_rr = g_rr - n_tokens * torch.outer(mu, mu)
    w_r = w[:, removed]
    lost = float(((w_r @ g_rr) * w_r).sum())
    whole = float(((w @ gram) * w).sum())
    return max(lost, 0.0) / whole if whole > 0 else 0.0

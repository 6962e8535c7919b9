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

Paired inputs (the paper's accumulated form, Table III): the dense reads X̃ from the pruned model but the
target stays the unpruned model's W X. With A = WᵀW, G̃ = X̃X̃ᵀ, M = X̃Xᵀ (rows: pruned stream), G = XXᵀ,

    ‖W X − W diag(m) X̃‖²  =  1ᵀ(A ⊙ G)1 − 2 bᵀm + mᵀ C̃ m,      C̃ = A ⊙ G̃,  b = (A ⊙ M) · 1,

so the normal equations become C̃_UU m_U = b_U: the same solves with another right-hand side (``rhs``),
and with X̃ = X, b = C · 1 is today's. Damping keeps the convention above: C̃ + εI on the left, b + ε·1 on
the right and 1ᵀ(A⊙G)1 + d_in·ε as the total (``damped_target``), i.e. the objective plus ε‖1 − m‖².
The full refit generalises the same way: W' = W (M_U,:)ᵀ (G̃_UU + εI)⁻¹.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import STAT_DTYPE, cholesky, damped, damping


def coefficient_matrix(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """C = (WᵀW) ⊙ G, float64, (d_in × d_in). ``gram`` is X Xᵀ over calibration tokens."""
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    return (w.T @ w) * gram


def target_terms(weight: torch.Tensor, cross: torch.Tensor, target_gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """b = ((WᵀW) ⊙ M) · 1 (d_in,) and ‖W X‖² = 1ᵀ((WᵀW) ⊙ G)1, float64, undamped.

    ``cross`` is M = X̃Xᵀ (rows: the inputs the dense reads, columns: the target's inputs), ``target_gram``
    G = XXᵀ: what paired inputs need besides C̃ to fit the unpruned output W X from X̃.
    """
    w = weight.detach().to(device=cross.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    a = w.T @ w  # (d_in, d_in)
    return (a * cross).sum(dim=1), float((a * target_gram).sum())


def damped_target(rhs: torch.Tensor, total: float, eps: float) -> tuple[torch.Tensor, float]:
    """The right-hand side and total that go with C̃ + εI: b + ε·1 and total + d_in·ε, so the damped
    objective is ‖WX − W diag(m) X̃‖² + ε‖1 − m‖², exactly the unpaired convention when X̃ = X."""
    return rhs + eps, total + rhs.numel() * eps


def solve_mask(coeff: torch.Tensor, keep: torch.Tensor, rhs: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the kept columns: solve C_UU m_U = b_U by Cholesky (C already damped).

    ``rhs``: the full-length b (d_in,), already damped; None = C · 1 (target and inputs from one stream).
    """
    c_uu = coeff[keep][:, keep]  # (k, k)
    lower, retry = cholesky(c_uu)
    b = coeff[keep].sum(dim=1) if rhs is None else rhs[keep].to(coeff.dtype)  # (k,)
    b = b + _retry_eps(c_uu, retry)  # a retry's damping goes on both sides, as the first damping did
    return torch.cholesky_solve(b.unsqueeze(1), lower).squeeze(1)


def _retry_eps(matrix: torch.Tensor, retry: float) -> float:
    """The absolute damping a Cholesky retry added to ``matrix`` (0 when the first try succeeded).

    The convention of this module is C + εI on the left and b + ε·1 on the right (the objective plus
    ε‖1 − m‖²); a retry adds more ε to the left, so the right-hand side must be built *after* the
    factorisation and get the same ε, or the mask solves a system that belongs to no objective."""
    return damping(matrix, retry) if retry > 0 else 0.0


def reconstruction_error(coeff: torch.Tensor, mask: torch.Tensor, rhs: torch.Tensor | None = None,
                         total: float | None = None) -> float:
    """Squared output error for a full-length mask: (1 − m)ᵀ C (1 − m) = ‖WX − W diag(m) X‖², or with
    ``rhs`` b and ``total`` ‖WX‖² (paired inputs) total − 2 bᵀm + mᵀ C m = ‖WX − W diag(m) X̃‖²."""
    if rhs is None:
        delta = 1.0 - mask.to(coeff.dtype)
        return float(delta @ coeff @ delta)
    if total is None:
        raise ValueError("a paired error needs the total ‖WX‖² as well as the right-hand side")
    m = mask.to(coeff.dtype)
    return total - 2.0 * float(rhs.to(coeff.dtype) @ m) + float(m @ coeff @ m)


def relative_error(coeff: torch.Tensor, mask: torch.Tensor, rhs: torch.Tensor | None = None,
                   total: float | None = None) -> float:
    """Reconstruction error relative to ‖W X‖² (1ᵀ C 1, or ``total`` with ``rhs``): 0 = perfect, 1 = output lost."""
    if rhs is None:
        total = float(coeff.sum())
        return reconstruction_error(coeff, mask) / total if total > 0 else 0.0
    error = reconstruction_error(coeff, mask, rhs, total)  # checks that ``total`` is given
    return error / total if total > 0 else 0.0


@dataclass
class MaskPath:
    """Masks and their variance for every prefix of one pruning order of one dense.

    ``prune_order``: all d_in columns, least important (pruned first) first. ``variance[k]`` is the
    variance of the kept mask entries after pruning the first k columns, for k = 0..max_removed.
    """

    prune_order: torch.Tensor  # (d_in,)
    variance: torch.Tensor  # (max_removed + 1,)
    _cumulative: torch.Tensor | None = None  # (d_in, d_in) rows = masks in keep order; None when not kept
    retry_damp: float = 0.0  # relative damping a failed Cholesky added (0: none); the path is exact for
    # C + εI with ε = retry_damp × mean diag(C), on both sides of the normal equations

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
              chunk: int = 512, rhs: torch.Tensor | None = None) -> MaskPath:
    """Exact variance of the tuned mask after removing each prefix of ``prune_order`` (C already damped).

    ``rhs``: full-length b (d_in,) as in ``solve_mask``; None = C · 1. Any b keeps the path exact: the
    forward substitution y = L⁻¹ b_perm is prefix-stable whatever b is.
    Cost: one Cholesky and one triangular inverse of the permuted C; the cumulative sums are streamed in
    row chunks, so unless ``keep_masks`` only O(chunk × d_in) extra memory is used.
    """
    n = coeff.shape[0]
    max_removed = int(min(max_removed, n - 1))
    keep_order = prune_order.flip(0)
    permuted = coeff[keep_order[:, None], keep_order]  # (n, n), one copy
    lower, retry = cholesky(permuted)  # first: a retry's damping must reach the right-hand side too
    if rhs is None:
        rhs = permuted.sum(dim=1)  # C_{U,:}·1 in keep order, (n,)
    else:
        rhs = rhs.to(coeff.dtype)[keep_order]  # b in keep order, (n,)
    rhs = rhs + _retry_eps(permuted, retry)
    del permuted  # at most three n × n matrices alive at once (streaming keeps a block's peak small)
    lower_inv = torch.eye(n, dtype=lower.dtype, device=lower.device)
    lower_inv = torch.linalg.solve_triangular(lower, lower_inv, upper=False)  # (n, n) lower triangular
    del lower
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
    return MaskPath(prune_order=prune_order, variance=variance, _cumulative=cumulative, retry_damp=retry)


def mask_variance_plain(coeff: torch.Tensor, prune_order: torch.Tensor, max_removed: int,
                        rhs: torch.Tensor | None = None) -> torch.Tensor:
    """Reference implementation of ``mask_path(...).variance``: re-solve from scratch at every step."""
    n = coeff.shape[0]
    out = []
    keep_order = prune_order.flip(0)
    for k in range(min(max_removed, n - 1) + 1):
        m = solve_mask(coeff, keep_order[: n - k], rhs)
        out.append(m.var(unbiased=False))
    return torch.stack(out)


def damped_coefficients(weight: torch.Tensor, gram: torch.Tensor, relative_damp: float) -> torch.Tensor:
    return damped(coefficient_matrix(weight, gram), relative_damp)


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, relative_damp: float, *,
                  cross: torch.Tensor | None = None) -> torch.Tensor:
    """Full least-squares refit of the kept columns: argmin_W' ‖W X − W' X̃_U‖², float64 (d_out × k).

    W' = W (M_U,:)ᵀ (G̃_UU + εI)⁻¹ with G̃ = ``gram`` (what the dense reads) and M = ``cross`` = X̃Xᵀ; without
    ``cross`` X̃ = X and M = G: W' = W G_{:,U} (G_UU + εI)⁻¹. A free weight per kept entry instead of one
    scalar per column: better with plenty of calibration tokens, catastrophic when tokens < d_in (G_UU is
    then rank-deficient and the solve fits noise; shared notes/calibration.md measured 3 299 vs 68.6
    perplexity at 10 × 128 tokens).
    """
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)  # (d_out, d_in)
    g_uu = damped(gram[keep][:, keep], relative_damp)  # (k, k)
    rhs = (w @ gram[:, keep]).T if cross is None else cross[keep] @ w.T  # (k, d_out)
    lower, _ = cholesky(g_uu)
    return torch.cholesky_solve(rhs, lower).T  # (d_out, k)


def refit_relative_error(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, new_weight: torch.Tensor, *,
                         cross: torch.Tensor | None = None, target_gram: torch.Tensor | None = None) -> float:
    """‖W X − W' X̃_U‖² / ‖W X‖² computed from second moments (no activations needed).

    Without ``cross`` X̃ = X (one Gram). With it: (tr(W G Wᵀ) − 2 tr(W' M_U,: Wᵀ) + tr(W' G̃_UU W'ᵀ)) / tr(W G Wᵀ),
    ``gram`` = G̃, ``cross`` = M, ``target_gram`` = G.
    """
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)
    if cross is None:
        delta = w.clone()
        delta[:, keep] -= new_weight
        total = float(((w @ gram) * w).sum())
        return float(((delta @ gram) * delta).sum()) / total if total > 0 else 0.0
    if target_gram is None:
        raise ValueError("a paired refit error needs the target Gram as well as the cross moment")
    v = new_weight.to(device=gram.device, dtype=STAT_DTYPE)  # (d_out, k)
    total = float(((w @ target_gram) * w).sum())
    mixed = float(((v @ cross[keep]) * w).sum())  # tr(W' M_U,: Wᵀ)
    fitted = float(((v @ gram[keep][:, keep]) * v).sum())
    return max(total - 2.0 * mixed + fitted, 0.0) / total if total > 0 else 0.0


def ridge_refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, anchor: torch.Tensor,
                ridge: float) -> torch.Tensor:
    """The blend of the two compensations: argmin_W' ‖W X − W' X_U‖² + λ‖W' − A‖², float64 (d_out × k).

    W' = (W G_{:,U} + λA)(G_UU + λI)⁻¹ with λ = ``ridge`` × mean diag(G_UU) and A = ``anchor``, the mask-tuned
    weight W_U diag(m_U). ridge → 0 is the full refit (a free weight per entry), ridge → ∞ the mask solution
    (one scalar per column): in between, the refit's extra freedom is spent only where the calibration
    tokens support it, which is what a rank-deficient or noisy G_UU cannot do alone.
    """
    g_uu = gram[keep][:, keep]  # (k, k)
    lam = damping(g_uu, ridge)
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE)
    rhs = (w @ gram[:, keep]).T + lam * anchor.to(device=gram.device, dtype=STAT_DTYPE).T  # (k, d_out)
    lower, _ = cholesky(g_uu + lam * torch.eye(g_uu.shape[0], dtype=g_uu.dtype, device=g_uu.device))
    return torch.cholesky_solve(rhs, lower).T


@dataclass
class RidgeChoice:
    """The blend strength a dense gets, chosen on held-out calibration sequences.

    ``heldout[r]``: relative error ‖W X_B − W'_A X_B,U‖² / ‖W X_B‖² of the blend fitted on one fold (ridge r)
    and measured on the other, averaged over both directions; ``mask_heldout`` the same for the anchor alone
    (ridge = ∞). ``ridge`` is the arg-min (``math.inf`` = keep the mask solution)."""

    ridge: float
    heldout: dict[float, float]
    mask_heldout: float


RIDGE_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def choose_ridge(weight: torch.Tensor, folds: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor,
                 anchor: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID) -> RidgeChoice:
    """Two-fold cross-validation of ``ridge_refit`` over ``grid`` (relative to the fitting fold's mean diagonal).

    One eigendecomposition of the fitting fold's G_UU = Q diag(e) Qᵀ gives every blend at once:
    W'(λ) = V_λ Qᵀ with V_λ = (P + λR) diag(1/(e + λ)), P = W G_{:,U} Q, R = A Q. The held-out error
    ‖W X_c − W' X_c,U‖² = tr(W G_c Wᵀ) − 2 tr(W' (G_c)_{U,:} Wᵀ) + tr(W' (G_c)_UU W'ᵀ) then reduces, with
    T = W (G_c)_{:,U} Q and S = Qᵀ (G_c)_UU Q, to sums of d_j (P_:j·T_:j + λ R_:j·T_:j) and quadratic forms
    dᵀ(S ⊙ (PᵀP + λ(PᵀR + RᵀP) + λ²RᵀR))d: O(k²) per ridge after a fixed number of matrix products, so the
    grid costs about one refit per fold. Only the folds' Grams are needed, no activations.
    """
    w = weight.detach().to(device=folds[0].device, dtype=STAT_DTYPE)
    a = anchor.to(device=folds[0].device, dtype=STAT_DTYPE)  # (d_out, k)
    sums = {r: 0.0 for r in grid}
    mask_sum = 0.0
    keep = torch.nonzero(keep).flatten() if keep.dtype == torch.bool else keep  # indices, for the 2-D gathers
    rows, cols = keep[:, None], keep
    for fit, check in ((folds[0], folds[1]), (folds[1], folds[0])):
        wc = w @ check  # (d_out, d_in)
        total = float((wc * w).sum())
        if total <= 0:
            continue
        g_uu = fit[rows, cols]  # (k, k)
        mean_diag = float(g_uu.diagonal().mean()) or 1.0
        values, q = torch.linalg.eigh(g_uu)  # ascending (k,), (k, k)
        del g_uu
        values = values.clamp_min(0.0)
        p_ = (w @ fit[:, keep]) @ q  # (d_out, k)
        r_ = a @ q  # (d_out, k)
        t_ = wc[:, keep] @ q  # (d_out, k)
        del wc
        s_ = q.T @ check[rows, cols]  # (k, k)
        s_ = s_ @ q
        del q
        pt, rt = (p_ * t_).sum(0), (r_ * t_).sum(0)  # (k,)
        del t_
        # d^T (S ⊙ M) d for M = PᵀP, RᵀR and PᵀR + RᵀP, one k × k product at a time (S is symmetric, so the
        # mixed term is twice d^T (S ⊙ PᵀR) d): two k × k matrices alive instead of six
        ds = [1.0 / (values + r * mean_diag) for r in grid]
        forms = {}
        for name, left, right in (("pp", p_, p_), ("rr", r_, r_), ("pr", p_, r_)):
            m = left.T @ right
            m.mul_(s_)
            forms[name] = [float(d @ m @ d) for d in ds]
            if name == "rr":
                srr_sum = float(m.sum())
            del m
        for j, r in enumerate(grid):
            lam = r * mean_diag
            mixed = float((ds[j] * (pt + lam * rt)).sum())
            fitted = forms["pp"][j] + 2.0 * lam * forms["pr"][j] + lam * lam * forms["rr"][j]
            sums[r] += max(total - 2.0 * mixed + fitted, 0.0) / total
        mask_sum += max(total - 2.0 * float(rt.sum()) + srr_sum, 0.0) / total
    heldout = {r: v / 2 for r, v in sums.items()}
    mask_heldout = mask_sum / 2
    best = min(heldout, key=heldout.get)
    ridge = best if heldout[best] < mask_heldout else math.inf
    return RidgeChoice(ridge=ridge, heldout=heldout, mask_heldout=mask_heldout)


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

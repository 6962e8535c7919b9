"""Input-neuron importance scores for one dense (tensors in, a score per input column out; higher = keep).

Every score reads the damped mask-tuning coefficient matrix C = (WᵀW) ⊙ (X Xᵀ) + εI (d_in × d_in) and/or
the weight and Gram directly. ``SCORE_TABLE`` maps every name the CLI/GUI offer to a ``Score`` (its summary and
a function of one signature, ``compute(coeff, weight, gram, damp, fisher) -> Tensor[d_in]``); ``SCORES`` is
its name → summary view.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .linalg import STAT_DTYPE, spd_inverse


def diagonal_score(coeff: torch.Tensor) -> torch.Tensor:
    """C_jj = ‖W_:,j‖² · ‖X_j‖²: the output energy that column j carries (Wanda's score, squared and summed)."""
    return coeff.diagonal().clone()


def obs_score(coeff: torch.Tensor) -> torch.Tensor:
    """1 / [C⁻¹]_jj: the error left after removing j and re-tuning every other mask entry.

    Minimising δᵀCδ subject to δ_j = 1 (δ = 1 − m) gives δ = C⁻¹e_j / [C⁻¹]_jj and error 1/[C⁻¹]_jj,
    the Optimal-Brain-Surgeon saliency of the mask-tuning problem.
    """
    return 1.0 / spd_inverse(coeff).diagonal()


def condition_score(coeff: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """Sensitivity of the condition number κ of the mask-tuning matrix to removing neuron j.

    Derivation. Parametrise the coefficient matrix by the mask, C(m) = D_m C₀ D_m + εI with D_m = diag(m),
    C₀ the undamped matrix and ε the damping (``damp``, absolute), and let f(m) = log κ(C(m)) =
    log λ_max − log λ_min. At the full mask m = 1, ∂C/∂m_j = e_j c_jᵀ + c_j e_jᵀ (c_j the j-th column of
    C₀). First-order eigenvalue perturbation gives, for the unit eigenvector u_k of λ_k,

        ∂λ_k/∂m_j = u_kᵀ (∂C/∂m_j) u_k = 2 u_kj (C₀ u_k)_j = 2 (λ_k − ε) u_kj²,

    so g_j = ∂f/∂m_j = 2 [(1 − ε/λ_max) u_max,j² − (1 − ε/λ_min) u_min,j²].
    Removing neuron j moves m_j from 1 to 0 (Δm = −e_j). The second-order Taylor expansion
    f(1 − e_j) − f(1) ≈ −g_j + ½ H_jj, with the Hessian replaced by its diagonal empirical-Fisher
    approximation H ≈ diag(g ⊙ g), gives the predicted change Δ̂_j = −g_j + ½ g_j². The score is its
    magnitude |Δ̂_j|: a neuron whose removal would move the conditioning of the re-tuning problem a lot
    is one the mask solve depends on, so it is kept. ``tests/math/test_scoring.py`` checks on random matrices
    that |Δ̂| ranks neurons by the true |Δ log κ| better than chance.
    """
    eigvals, eigvecs = torch.linalg.eigh(coeff)  # ascending
    lam_min, lam_max = eigvals[0], eigvals[-1]
    u_min, u_max = eigvecs[:, 0], eigvecs[:, -1]
    grad = 2.0 * ((1.0 - damp / lam_max) * u_max**2 - (1.0 - damp / lam_min) * u_min**2)
    predicted_change = -grad + 0.5 * grad**2
    return predicted_change.abs()


def log_condition(matrix: torch.Tensor) -> float:
    eig = torch.linalg.eigvalsh(matrix)
    return float(torch.log(eig[-1] / eig[0]))


def logdet_score(coeff: torch.Tensor) -> torch.Tensor:
    """−Δ_j log det C = −log [C⁻¹]_jj: the log-volume of the re-tuning problem that only column j carries.

    Exact. The Schur-complement (rank-one downdate) identity det C = det C_{-j,-j} · r_j with
    r_j = C_jj − C_j,-j C_{-j,-j}⁻¹ C_-j,j = 1/[C⁻¹]_jj gives, for every j at once from one inverse,

        Δ_j = log det C_{-j,-j} − log det C = log [C⁻¹]_jj = log Σ_k u_kj² / λ_k   (the whole spectrum).

    The score is −Δ_j = log r_j, higher = keep. Why this sign: r_j is the part of column j's output that the
    other columns cannot reproduce (its residual after projecting on them), so removing a neuron with large
    r_j shrinks the volume of the re-tuning problem most: nothing can stand in for it. A small r_j (large
    [C⁻¹]_jj) means j is nearly collinear with the rest and the mask solve can absorb its removal, so it goes
    first. Note: r_j is exactly the OBS error (``obs_score``), so this score is log(obs) and ranks neurons as
    ``obs`` does (an identity, not an approximation); it adds the volume reading, not new information.
    """
    return -torch.log(spd_inverse(coeff).diagonal())


def _nearest_interlaced_root(pivot: torch.Tensor, weights: torch.Tensor, gaps: torch.Tensor,
                             max_iter: int = 100) -> torch.Tensor:
    """For every column j, the root t_j ∈ [0, gaps[0]] of t · Σ_k weights[k, j] / (gaps[k] − t) = pivot_j.

    This is the secular equation of a principal submatrix, written in the distance t of its extreme
    eigenvalue from the full matrix's one (so t keeps full relative precision when it is tiny). With g = gaps
    it is multiplied by (g_0 − t) to remove the nearest pole:

        G(t) = t · Σ_k w_k r_k(t) − p · (g_0 − t),   r_k = (g_0 − t)/(g_k − t) ∈ [0, 1]  (r_k = 1 where g_k = g_0),

    smooth on [0, g_0], G(0) = −p g_0 ≤ 0, G(g_0) = g_0 Σ_{g_k = g_0} w_k ≥ 0, with one sign change (that of the
    increasing secular function). So the root is unique; if G < 0 up to g_0 (the next eigenvector does not
    touch j) Cauchy interlacing caps the answer at g_0. Safeguarded Newton inside a bracket [lo, hi], all
    columns at once, O(d²) per step; steps that leave the bracket are replaced by bisection. Without the
    pole removal a root next to g_0 (a column that carries most of the extreme eigenvector) converged only
    linearly. pivot: (d,) ≥ 0; weights: (d−1, d) ≥ 0; gaps: (d−1,) ascending ≥ 0. Returns t: (d,).
    """
    g0 = gaps[0]
    gap_col = gaps.unsqueeze(1)  # (d−1, 1)
    tied = gap_col == g0  # (d−1, 1) r_k = 1 identically

    def pole_free(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = torch.where(tied, torch.zeros((), dtype=t.dtype), 1.0 / (gap_col - t))  # (d−1, d)
        ratio = torch.where(tied, torch.ones((), dtype=t.dtype), (g0 - t) * inv)  # (d−1, d)
        total = (weights * ratio).sum(0)  # (d,)
        slope = (weights * (g0 - gap_col) * inv * inv).sum(0)  # (d,) Σ w_k r_k'(t)
        return t * total - pivot * (g0 - t), total + t * slope + pivot

    lo = torch.zeros_like(pivot)
    hi = g0.expand_as(pivot).clone()  # interlacing bound
    if float(g0) > 0:
        # t·Σ w_k/(g_k − t) ≥ t·Σ w_k/g_k, so the root is at most pivot / Σ w_k/g_k
        h0 = (weights / gap_col).sum(0)  # (d,)
        hi = torch.minimum(hi, torch.where(h0 > 0, pivot / h0, hi))
    done = (pivot <= 0) | (hi <= 0)
    hi = torch.where(done, torch.zeros_like(hi), hi)
    tol = 16 * torch.finfo(pivot.dtype).eps
    t = hi.clone()
    for _ in range(max_iter):
        f, df = pole_free(t)
        lo = torch.where(f < 0, t, lo)
        hi = torch.where(f > 0, t, hi)
        exact = f == 0
        lo, hi = torch.where(exact, t, lo), torch.where(exact, t, hi)
        newton = t - f / df
        inside = (newton > lo) & (newton < hi)  # False for nan/inf
        new_t = torch.where(inside, newton, 0.5 * (lo + hi))
        new_t = torch.where(done | exact, hi, new_t)
        converged = done | exact | (hi - lo <= tol * hi) | (inside & ((new_t - t).abs() <= tol * new_t))
        t = new_t
        if bool(converged.all()):
            break
    return torch.clamp(t, min=0.0, max=float(g0))


def submatrix_extreme_eigenvalues(coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """λ_min and λ_max of every principal submatrix C_{-j,-j}, from one eigendecomposition of C.

    Exact up to the root tolerance. With C = U diag(λ) Uᵀ and w_kj = u_kj², the eigenvalues μ of C_{-j,-j}
    are roots of Σ_k w_kj / (λ_k − μ) = 0 (plus the λ_k whose eigenvector vanishes at j), and they interlace
    λ (Cauchy), so λ_min(C_{-j,-j}) ∈ [λ_1, λ_2] and λ_max ∈ [λ_{d−1}, λ_d]. Both are found as the nearest root
    of the same secular form (``_nearest_interlaced_root``), bottom from λ_1 upward, top from λ_d downward.
    coeff: (d, d) SPD, d ≥ 2. Returns (mu_min, mu_max), each (d,).
    """
    eigvals, t, s = _extreme_shifts(coeff)
    return eigvals[0] + t, eigvals[-1] - s


def _extreme_shifts(coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues λ of C (ascending) and, per column j, t_j = λ_min(C_{-j,-j}) − λ_1 ≥ 0 and
    s_j = λ_d − λ_max(C_{-j,-j}) ≥ 0 (kept as shifts: full relative precision when they are tiny)."""
    if coeff.shape[0] < 2:
        raise ValueError("a principal submatrix needs d ≥ 2")
    eigvals, eigvecs = torch.linalg.eigh(coeff)  # ascending
    weights = eigvecs.T.pow(2)  # (k, j): w_kj = u_kj² (eigenvector k at column j), each column sums to 1
    t = _nearest_interlaced_root(weights[0], weights[1:], eigvals[1:] - eigvals[0])
    s = _nearest_interlaced_root(weights[-1], weights[:-1].flip(0), eigvals[-1] - eigvals[:-1].flip(0))
    return eigvals, t, s


def exact_condition_score(coeff: torch.Tensor) -> torch.Tensor:
    """|Δ_j log κ|: the exact drop of log κ(C) when column/row j is removed, for every j (higher = keep).

    Exact (up to the root tolerance), not a Taylor estimate: with λ_min, λ_max of each principal submatrix
    from ``submatrix_extreme_eigenvalues``,

        Δ_j = log(μ_max,j / μ_min,j) − log(λ_max / λ_min) = log1p(−s_j/λ_max) − log1p(t_j/λ_min) ≤ 0,

    (t_j = μ_min,j − λ_min, s_j = λ_max − μ_max,j; interlacing makes Δ_j ≤ 0: removing a column never worsens
    κ). The whole spectrum enters through the secular weights, but Δ_j is still driven by how much column j
    loads the two extreme eigenvectors. Heuristic part: the score is the magnitude |Δ_j| = −Δ_j with
    higher = keep (as ``cond``): a neuron whose removal moves the conditioning of the re-tuning problem a
    lot is one the extreme directions are built on (the dominant-energy direction or the near-collinear
    one); that this predicts accuracy is an assumption that the perplexity runs test, not a theorem.
    Cost: one eigh plus O(d²) per root-finding step.
    """
    eigvals, t, s = _extreme_shifts(coeff)
    return torch.log1p(t / eigvals[0]) - torch.log1p(-s / eigvals[-1])


def sequential_obs_score(weight: torch.Tensor, gram: torch.Tensor, *, relative_damp: float = 0.01,
                         group: int = 16) -> torch.Tensor:
    """Structured OBS with weight updates between removals (SlimGPT's column pruning, Ling et al. 2024):
    the score of column j is the step at which greedy removal takes it (higher = later = keep).

    The objective is the refit one, ‖W X − Ŵ X‖² with the kept columns of Ŵ free. With H⁻¹ = (G + εI)⁻¹
    restricted to the columns F still present, removing a set R costs tr(W_R [(H⁻¹)_RR]⁻¹ W_Rᵀ) and the
    optimal update is W ← W − W_R [(H⁻¹)_RR]⁻¹ (H⁻¹)_R,: ; H⁻¹ then becomes the inverse over F∖R by the same
    Schur step. Each step removes the ``group`` columns of lowest saliency ‖W_:,j‖² / (H⁻¹)_jj (as SlimGPT
    batches its columns), recomputed after every update — unlike ``obs``, which scores once. ε is SparseGPT's
    1 % of the mean diagonal.
    """
    w = weight.detach().to(device=gram.device, dtype=STAT_DTYPE).clone()  # (d_out, d_in)
    d = gram.shape[0]
    h = gram.clone()
    h.diagonal().add_(relative_damp * float(gram.diagonal().mean()) or relative_damp)
    h_inv = spd_inverse(h)  # (d, d)
    rank = torch.empty(d, dtype=STAT_DTYPE, device=gram.device)
    alive = torch.ones(d, dtype=torch.bool, device=gram.device)
    step = 0
    while step < d:
        saliency = (w * w).sum(dim=0) / h_inv.diagonal().clamp_min(1e-300)
        saliency[~alive] = float("inf")
        chosen = torch.argsort(saliency, stable=True)[: min(group, d - step)]  # (g,) lowest first
        rank[chosen] = torch.arange(step, step + chosen.numel(), dtype=STAT_DTYPE, device=gram.device)
        step += chosen.numel()
        alive[chosen] = False
        if step == d:
            break
        inv_rr = torch.linalg.inv(h_inv[chosen][:, chosen])  # (g, g)
        rows = h_inv[chosen]  # (g, d)
        w -= (w[:, chosen] @ inv_rr) @ rows
        h_inv -= rows.T @ inv_rr @ rows
        w[:, chosen] = 0.0
        h_inv[chosen] = 0.0
        h_inv[:, chosen] = 0.0
    return rank


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """‖W_:,j‖²: weights alone (the classic magnitude baseline)."""
    return weight.detach().to(STAT_DTYPE).pow(2).sum(dim=0)


def activation_score(gram: torch.Tensor) -> torch.Tensor:
    """‖X_j‖²: activations alone."""
    return gram.diagonal().clone()


ScoreFn = Callable[..., torch.Tensor]


def _fisher_score(coeff: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, damp: float,
                  fisher: torch.Tensor | None) -> torch.Tensor:
    if fisher is None:
        raise ValueError("the fisher score needs gradients: collect them with comp_core.loop.fisher first")
    return fisher.to(device=coeff.device, dtype=STAT_DTYPE)


@dataclass(frozen=True)
class Score:
    """One neuron score: what it measures, and how, from (coeff, weight, gram, damp, fisher)."""

    summary: str
    compute: ScoreFn  # (coeff (d_in, d_in), weight (d_out, d_in), gram (d_in, d_in), damp, fisher | None) -> (d_in,)


# The table every face offers and ``score_neurons`` dispatches on: one entry per score, nothing else to edit.
SCORE_TABLE: dict[str, Score] = {
    "diag": Score("‖W_:,j‖²·‖X_j‖² (diagonal of the mask-tuning matrix)",
                  lambda coeff, weight, gram, damp, fisher: diagonal_score(coeff)),
    "obs": Score("error left after removing j and re-tuning the rest, 1/[C⁻¹]_jj",
                 lambda coeff, weight, gram, damp, fisher: obs_score(coeff)),
    "cond": Score("condition-number sensitivity (second-order Taylor, diagonal empirical Fisher)",
                  lambda coeff, weight, gram, damp, fisher: condition_score(coeff, damp)),
    "cond-exact": Score("exact drop of log κ when j is removed (secular equation, whole spectrum)",
                        lambda coeff, weight, gram, damp, fisher: exact_condition_score(coeff)),
    "logdet": Score("log-volume only j carries, −log [C⁻¹]_jj (exact; ranks as obs)",
                    lambda coeff, weight, gram, damp, fisher: logdet_score(coeff)),
    "fisher": Score("Fisher information of the next-token loss w.r.t. the mask (FPT style)", _fisher_score),
    "obs-greedy": Score("step at which sequential OBS with weight updates removes j (SlimGPT's columns)",
                        lambda coeff, weight, gram, damp, fisher: sequential_obs_score(weight, gram)),
    "magnitude": Score("‖W_:,j‖² (weights only)",
                       lambda coeff, weight, gram, damp, fisher: magnitude_score(weight).to(coeff.device)),
    "activation": Score("‖X_j‖² (activations only)",
                        lambda coeff, weight, gram, damp, fisher: activation_score(gram)),
}
SCORES: dict[str, str] = {name: score.summary for name, score in SCORE_TABLE.items()}


def score_neurons(name: str, coeff: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, *,
                  damp: float = 0.0, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Look the score up in ``SCORE_TABLE``; returns float64 importances of the d_in input columns (higher = keep)."""
    score = SCORE_TABLE.get(name)
    if score is None:
        raise ValueError(f"unknown importance score '{name}'; choose one of: {', '.join(SCORES)}")
    return score.compute(coeff, weight, gram, damp, fisher)

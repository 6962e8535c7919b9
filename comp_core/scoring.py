"""Input-neuron importance scores for one dense (tensors in, a score per input column out; higher = keep).

Every score reads the damped mask-tuning coefficient matrix C = (WᵀW) ⊙ (X Xᵀ) + εI (d_in × d_in) and/or
the weight and Gram directly. The registry ``SCORES`` maps the names the CLI/GUI offer to functions with one
signature, ``score(coeff, weight, gram, fisher) -> Tensor[d_in]``.
"""
from __future__ import annotations

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
    is one the mask solve depends on, so it is kept. ``tests/test_scoring.py`` checks on random matrices
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


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """‖W_:,j‖²: weights alone (the classic magnitude baseline)."""
    return weight.detach().to(STAT_DTYPE).pow(2).sum(dim=0)


def activation_score(gram: torch.Tensor) -> torch.Tensor:
    """‖X_j‖²: activations alone."""
    return gram.diagonal().clone()


ScoreFn = Callable[..., torch.Tensor]

SCORES: dict[str, str] = {
    "diag": "‖W_:,j‖²·‖X_j‖² (diagonal of the mask-tuning matrix)",
    "obs": "error left after removing j and re-tuning the rest, 1/[C⁻¹]_jj",
    "cond": "condition-number sensitivity (second-order Taylor, diagonal empirical Fisher)",
    "fisher": "Fisher information of the next-token loss w.r.t. the mask (FPT style)",
    "magnitude": "‖W_:,j‖² (weights only)",
    "activation": "‖X_j‖² (activations only)",
}


def score_neurons(name: str, coeff: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor, *,
                  damp: float = 0.0, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch by score name; returns float64 importances of the d_in input columns (higher = keep)."""
    if name == "diag":
        return diagonal_score(coeff)
    if name == "obs":
        return obs_score(coeff)
    if name == "cond":
        return condition_score(coeff, damp)
    if name == "magnitude":
        return magnitude_score(weight).to(coeff.device)
    if name == "activation":
        return activation_score(gram)
    if name == "fisher":
        if fisher is None:
            raise ValueError("the fisher score needs gradients: collect them with comp_core.fisher first")
        return fisher.to(device=coeff.device, dtype=STAT_DTYPE)
    raise ValueError(f"unknown importance score '{name}'; choose one of: {', '.join(SCORES)}")

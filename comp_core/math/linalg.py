"""Damped symmetric solves: the numerics every method shares (the Grams themselves come from ``stats``).

All statistics are float64 on the compute device: Grams of 1 000-odd tokens in a 1 536-wide space are
rank-deficient, and the mask-tuning solve needs the extra digits (shared notes/calibration.md).
"""
from __future__ import annotations

import logging

import torch

# The precision of every statistic and solve (the block statistics in ``stats`` accumulate in it too).
STAT_DTYPE = torch.float64

log = logging.getLogger(__name__)


def damping(matrix: torch.Tensor, relative: float) -> float:
    """ε = relative × mean diagonal (as SparseGPT's percdamp); never 0 for an all-zero matrix."""
    mean_diag = matrix.diagonal().mean().item()
    return relative * mean_diag if mean_diag > 0 else relative


def damped(matrix: torch.Tensor, relative: float) -> torch.Tensor:
    """``matrix + ε I`` with ε relative to the diagonal."""
    out = matrix.clone()
    out.diagonal().add_(damping(matrix, relative))
    return out


def cholesky(matrix: torch.Tensor, relative_damp: float = 0.0, max_tries: int = 6) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of ``matrix + ε I``.

    If the factorisation fails (the matrix is not numerically positive definite), the damping is
    multiplied by 10 and tried again; the damping actually used is returned so callers can report it.
    """
    damp = relative_damp
    for _ in range(max_tries):
        lower, info = torch.linalg.cholesky_ex(damped(matrix, damp) if damp > 0 else matrix)
        if int(info) == 0:
            return lower, damp
        damp = max(damp * 10.0, 1e-8)
        log.warning("Cholesky failed; retrying with relative damping %.1e (more calibration data helps)", damp)
    raise torch.linalg.LinAlgError(f"matrix is not positive definite even with relative damping {damp:g}")


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ x = rhs`` for an SPD matrix (already damped) via Cholesky."""
    lower, _ = cholesky(matrix)
    if rhs.dim() == 1:
        return torch.cholesky_solve(rhs.unsqueeze(1), lower).squeeze(1)
    return torch.cholesky_solve(rhs, lower)


def spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    lower, _ = cholesky(matrix)
    return torch.cholesky_inverse(lower)

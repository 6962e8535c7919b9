"""Optimal Brain Surgeon solvers for masks: SparseGPT (one weight at a time) and APT (several jointly).

Both minimise the layer's reconstruction error ‖W X − Ŵ X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ), H = X Xᵀ, row by row,
with the pruned weights forced to zero and the others compensating. Shared numerics, as in SparseGPT's
reference ``fasterprune``: dead inputs (H_jj = 0) get H_jj = 1 and weight 0; damping = ``percdamp`` × mean
diagonal; U = the upper Cholesky factor of H⁻¹, so that for the columns F = {j, j+1, …} still free,
(H_FF)⁻¹ = U_FFᵀ U_FF; columns are processed in blocks of ``blocksize`` with lazy updates of the rest.

* ``sparsegpt`` (Frantar & Alistarh 2023, IST-DASLab/sparsegpt ``sparsegpt.py``): inside a block, column by
  column: zero the pruned weights of column j and push the error (w − q)/U_jj onto the later columns along
  U_j,:. Mask selection: unstructured — the lowest w²/U_jj² over the whole block; N:M — per group of M
  columns, chosen when the group's first column is reached.
* ``apt`` (Zhao, Sun et al. 2024, "Pruning Foundation Models for High Accuracy without Retraining",
  arXiv 2410.15567): the removed weights of one row are removed *together*: for row w, the free columns F
  and the removed set Q ⊂ F, the optimal update is Δw = −w_Q [(H_F⁻¹)_QQ]⁻¹ (H_F⁻¹)_Q,F, which also moves
  the kept weights of the same block, unlike SparseGPT's sequence of single-weight updates. The paper's
  repository holds only a README; what follows the paper is this formula and the blocking (so the cost stays
  near SparseGPT's: per block one batched |block|×|block| solve per row, then one lazy update). **Our reading**:
  the mask of a block is chosen, before the joint update, by the OBS saliency w_j² / (H_F⁻¹)_jj at the
  block's start (SparseGPT's saliency in the same frame), per row for N:M groups and over the whole block
  for unstructured, as SparseGPT does; the solves run in float64.

With one block covering every column, APT's result is the exact least-squares refit of the kept weights
(``least_squares_given_mask``), tested in tests/math/test_obs_solvers.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparsity import SparsityPattern, nm_mask

OBS_DTYPE = torch.float32  # SparseGPT's working precision for W; H⁻¹ and its factor are computed in float64


@dataclass
class ObsResult:
    weight: torch.Tensor  # (d_out, d_in) new weight, pruned entries exactly 0, in the input's dtype
    mask: torch.Tensor  # (d_out, d_in) bool, True = pruned
    loss: float  # ½ Σ of the OBS error terms (SparseGPT's "error" print)


def _blocksize(blocksize: int, pattern: SparsityPattern) -> int:
    """N:M groups must not straddle two blocks: round the block up to a multiple of M."""
    return -(-blocksize // pattern.m) * pattern.m if pattern.is_nm else blocksize


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float):
    """(W float32 copy, U upper Cholesky factor of (H + damp I)⁻¹ float64, dead columns)."""
    w = weight.detach().to(OBS_DTYPE).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    # U (upper, H⁻¹ = UᵀU) without forming H⁻¹: with J the reversal, J H J = L̃ L̃ᵀ gives U = J L̃⁻¹ J.
    # Same factor as SparseGPT's cholesky(cholesky_inverse(cholesky(H)), upper=True), one factorisation fewer.
    flipped = torch.linalg.cholesky(h.flip(0, 1))
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    upper = torch.linalg.solve_triangular(flipped, eye, upper=False).flip(0, 1)
    return w, upper, dead


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, *, blocksize: int = 128,
              percdamp: float = 0.01, mask: torch.Tensor | None = None) -> ObsResult:
    """SparseGPT's ``fasterprune`` (sparsity only, no quantisation); ``mask`` fixes the mask instead."""
    w, upper, _ = _prepare(weight, hessian, percdamp)
    u = upper.to(OBS_DTYPE)
    rows, cols = w.shape
    pattern.check_width(cols)
    blocksize = _blocksize(blocksize, pattern)
    full_mask = torch.zeros_like(w, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=OBS_DTYPE, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        loss1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        if mask is not None:
            mask1 = mask[:, i1:i2].clone()
        elif not pattern.is_nm:
            saliency = w1 ** 2 / torch.diag(u1).reshape(1, -1) ** 2
            k = int(saliency.numel() * pattern.fraction)
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                mask1.view(-1)[torch.sort(saliency.flatten(), stable=True).indices[:k]] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            d = u1[i, i]
            if mask is None and pattern.is_nm and i % pattern.m == 0:
                saliency = w1[:, i:i + pattern.m] ** 2 / torch.diag(u1)[i:i + pattern.m].reshape(1, -1) ** 2
                mask1[:, i:i + pattern.m] = nm_mask(saliency, pattern.n, pattern.m)
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            loss1[:, i] = (col - q) ** 2 / d ** 2
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ u1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        full_mask[:, i1:i2] = mask1
        losses += loss1.sum(dim=1) / 2
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return ObsResult(weight=w.to(weight.dtype), mask=full_mask, loss=float(losses.sum()))


def apt(weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, *, blocksize: int = 128,
        percdamp: float = 0.01, mask: torch.Tensor | None = None) -> ObsResult:
    """Joint multi-weight OBS per row and block (see the module docstring); ``mask`` fixes the mask."""
    w, upper, _ = _prepare(weight, hessian, percdamp)
    rows, cols = w.shape
    pattern.check_width(cols)
    blocksize = _blocksize(blocksize, pattern)
    w = w.to(torch.float64)
    full_mask = torch.zeros_like(w, dtype=torch.bool)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        u_rows = upper[i1:i2, i1:]  # (b, |F|): rows of U that reach the free columns F = {i1, …}
        g_block = u_rows[:, : i2 - i1].T @ u_rows  # (H_F⁻¹)_{block, F}  (b, |F|)
        g_bb = g_block[:, : i2 - i1]  # (b, b)
        w1 = w[:, i1:i2]
        if mask is not None:
            mask1 = mask[:, i1:i2].clone()
        else:
            saliency = w1 ** 2 / torch.diag(g_bb).reshape(1, -1)  # OBS saliency in the block's frame
            if pattern.is_nm:
                mask1 = nm_mask(saliency, pattern.n, pattern.m)
            else:
                k = int(saliency.numel() * pattern.fraction)
                mask1 = torch.zeros_like(w1, dtype=torch.bool)
                if k:
                    mask1.view(-1)[torch.sort(saliency.flatten(), stable=True).indices[:k]] = True
        lam = _joint_multipliers(w1, g_bb, mask1)  # (rows, b), zero outside each row's removed set
        loss += float((lam * w1.masked_fill(~mask1, 0.0)).sum()) / 2
        w[:, i1:] -= lam @ g_block
        w[:, i1:i2][mask1] = 0.0  # exact zeros (the update leaves rounding-level residues)
        full_mask[:, i1:i2] = mask1
    return ObsResult(weight=w.to(weight.dtype), mask=full_mask, loss=loss)


def _joint_multipliers(w1: torch.Tensor, g_bb: torch.Tensor, mask1: torch.Tensor) -> torch.Tensor:
    """λ_r = [(H_F⁻¹)_{Q_r Q_r}]⁻¹ w_{r,Q_r} for every row r, as one batched solve.

    Each row's system is gathered to the largest |Q_r| of the block (rows with fewer removed weights are
    padded with identity rows and zero right-hand sides), so the cost is rows × k³/3 with k ≈ the removed
    share of the block, not the block size. (rows, b) float64, zero outside each row's removed set.
    """
    rows, b = w1.shape
    counts = mask1.sum(dim=1)  # (rows,)
    k = int(counts.max()) if rows else 0
    lam = torch.zeros_like(w1)
    if k == 0:
        return lam
    # removed columns first (stable), so position p < counts[r] holds row r's p-th removed column
    order = torch.sort((~mask1).to(torch.int8), dim=1, stable=True).indices[:, :k]  # (rows, k)
    valid = torch.arange(k, device=w1.device).unsqueeze(0) < counts.unsqueeze(1)  # (rows, k)
    system = g_bb[order.unsqueeze(2), order.unsqueeze(1)]  # (rows, k, k)
    both = valid.unsqueeze(2) & valid.unsqueeze(1)
    system = torch.where(both, system, torch.zeros((), dtype=system.dtype)) + torch.diag_embed((~valid).to(system.dtype))
    rhs = torch.where(valid, torch.gather(w1, 1, order), torch.zeros((), dtype=w1.dtype)).unsqueeze(2)  # (rows, k, 1)
    lower, info = torch.linalg.cholesky_ex(system)
    if int(info.max()) != 0:  # a numerically singular sub-block: fall back to a general solve
        solved = torch.linalg.solve(system, rhs)
    else:
        solved = torch.cholesky_solve(rhs, lower)
    solved = torch.where(valid, solved.squeeze(2), torch.zeros((), dtype=w1.dtype))
    return lam.scatter_(1, order, solved)


def least_squares_given_mask(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor,
                             percdamp: float = 0.01) -> torch.Tensor:
    """Brute force: every row's kept weights refit by least squares on (H + damp I), pruned ones 0 (tests)."""
    h = hessian.detach().to(torch.float64).clone()
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    w = weight.detach().to(torch.float64)
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        keep = ~mask[r]
        # minimise (w − v) H (w − v)ᵀ over v with v_Q = 0:  H_KK v_K = (H w)_K
        out[r, keep] = torch.linalg.solve(h[keep][:, keep], (h @ w[r])[keep])
    return out


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ): the share of the layer's output energy lost."""
    h = hessian.to(torch.float64)
    delta = (weight.to(torch.float64) - new_weight.to(torch.float64))
    whole = float(((weight.to(torch.float64) @ h) * weight.to(torch.float64)).sum())
    return float(((delta @ h) * delta).sum()) / whole if whole > 0 else 0.0

"""Sparsity patterns and the masks they allow: unstructured (a share of weights) or N:M (N zeros in every M
consecutive weights of a row, along the input dimension — the layout 2:4 sparse tensor cores run).

Pure tensor functions: ``scores`` are importance (higher = keep), masks are bool with True = pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class SparsityPattern:
    """``"0.5"`` (unstructured, that share of every pruned linear's weights) or ``"2:4"``/``"4:8"`` (N:M)."""

    fraction: float
    n: int = 0  # N:M: zeros per group (0 = unstructured)
    m: int = 0  # N:M: group size

    @classmethod
    def parse(cls, text: "str | float | SparsityPattern") -> "SparsityPattern":
        if isinstance(text, SparsityPattern):
            return text
        spec = str(text).strip()
        if ":" in spec:
            left, _, right = spec.partition(":")
            try:
                n, m = int(left), int(right)
            except ValueError:
                raise ValueError(f"N:M sparsity must be two integers like 2:4, got '{spec}'") from None
            if not 0 < n < m:
                raise ValueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
            return cls(fraction=n / m, n=n, m=m)
        try:
            fraction = float(spec)
        except ValueError:
            raise ValueError(f"sparsity must be a share in [0, 1) like 0.5, or N:M like 2:4; got '{spec}'") from None
        if not 0.0 <= fraction < 1.0 or math.isnan(fraction):
            raise ValueError(f"sparsity must be in [0, 1), got {fraction}")
        return cls(fraction=fraction)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.fraction:g}"

    def check_width(self, d_in: int, name: str = "linear") -> None:
        if self.is_nm and d_in % self.m:
            raise ValueError(f"{name} has {d_in} inputs, not a multiple of M={self.m}: {self.label} does not fit")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest scores of every group of ``m`` consecutive inputs of each row. (d_out, d_in) bool."""
    d_out, d_in = scores.shape
    groups = scores.reshape(d_out, d_in // m, m)  # (d_out, groups, m)
    lowest = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(d_out, d_in)


def row_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the lowest ``int(d_in · fraction)`` scores of every output row (Wanda's and RIA's comparison group)."""
    k = int(scores.shape[1] * fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    return mask


def matrix_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Prune the lowest ``int(numel · fraction)`` scores of the whole matrix (layer-wise magnitude pruning)."""
    k = int(scores.numel() * fraction)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = True
    return mask.reshape(scores.shape)


def pattern_mask(scores: torch.Tensor, pattern: SparsityPattern, per_row: bool = True) -> torch.Tensor:
    """The mask ``pattern`` allows for ``scores``: N:M groups, or the lowest share per row / per matrix."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return row_mask(scores, pattern.fraction) if per_row else matrix_mask(scores, pattern.fraction)


def holds_pattern(mask: torch.Tensor, pattern: SparsityPattern) -> bool:
    """True when every group of M inputs of every row has exactly N pruned (N:M), or the share matches."""
    if pattern.is_nm:
        d_out, d_in = mask.shape
        return bool((mask.reshape(d_out, d_in // pattern.m, pattern.m).sum(-1) == pattern.n).all())
    return abs(float(mask.float().mean()) - pattern.fraction) <= 1.0 / mask.shape[1]


def zero_counts(model: nn.Module, linears: list[nn.Module], blocks: Sequence[nn.Module] = ()) -> dict:
    """Sparsity over ``linears`` and the share of ALL parameters (embeddings included) that are exactly zero;
    with ``blocks`` (the decoder blocks), also the share of the blocks' parameters that are zero."""
    pruned_zero = sum(int((m.weight == 0).sum()) for m in linears)
    pruned_total = sum(m.weight.numel() for m in linears)
    in_blocks = {p.data_ptr() for block in blocks for p in block.parameters()}
    seen, total, zero, block_total, block_zero = set(), 0, 0, 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        zeros = int((p == 0).sum())
        total += p.numel()
        zero += zeros
        if p.data_ptr() in in_blocks:
            block_total += p.numel()
            block_zero += zeros
    counts = {"linear_sparsity": pruned_zero / pruned_total if pruned_total else 0.0,
              "zero_share": zero / total if total else 0.0, "zeros": zero, "params": total,
              "pruned_linear_params": pruned_total}
    if blocks:
        counts["block_zero_share"] = block_zero / block_total if block_total else 0.0
    return counts

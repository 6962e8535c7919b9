"""The statistics every method reads, collected once per block: one accumulator per dense input.

A dense's input X (tokens × d) gives everything the methods need from three running sums:
the Gram ``XᵀX`` (COMP's mask tuning, SparseGPT/APT Hessians), the column sums (FLAP's mean input for
bias compensation) and the token count. Squared column norms ‖X_j‖² (Wanda, RIA) are the Gram's diagonal
and the per-channel sample variance (FLAP's fluctuation) follows from the diagonal and the mean, so no
method keeps a second pass or a second accumulator. All sums are float64 (shared notes/calibration.md).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from .models.adapters import ArchAdapter

STAT_DTYPE = torch.float64


class InputStats:
    """Running ``XᵀX`` (a sum, not a mean: mask tuning is scale-free), ``Σ_t x_t`` and the token count."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(width, width, dtype=STAT_DTYPE, device=device)  # (d, d)
        self.total = torch.zeros(width, dtype=STAT_DTYPE, device=device)  # (d,)
        self.n_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.gram.device, dtype=STAT_DTYPE)  # (N, d)
        self.gram.addmm_(x.T, x)
        self.total.add_(x.sum(dim=0))
        self.n_tokens += x.shape[0]

    @property
    def width(self) -> int:
        return self.gram.shape[0]

    @property
    def sq_norms(self) -> torch.Tensor:
        """‖X_j‖² per input column (d,): Wanda's and RIA's activation statistic, squared."""
        return self.gram.diagonal().clone()

    @property
    def mean(self) -> torch.Tensor:
        """Mean input per column (d,): what FLAP folds into the bias for removed columns."""
        return self.total / max(self.n_tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of every input column over the calibration tokens (d,), FLAP's fluctuation."""
        n = self.n_tokens
        if n < 2:
            return torch.zeros_like(self.total)
        centred = self.gram.diagonal() - self.total * self.total / n
        return centred.clamp_min(0.0) / (n - 1)


def own_gram(module: nn.Module, gram: torch.Tensor) -> torch.Tensor:
    """The Gram of the inputs a dense really reads (an already pruned dense reads a subset of the shared input)."""
    if hasattr(module, "input_index"):
        index = module.input_index.to(gram.device)
        return gram[index][:, index]
    return gram


@contextlib.contextmanager
def collect_block_stats(block: nn.Module, adapter: ArchAdapter, device: torch.device | str = "cpu"
                        ) -> Iterator[dict[str, InputStats]]:
    """While active, every forward of ``block`` adds its denses' inputs to one ``InputStats`` per input group.

    Denses that read the same tensor (q/k/v, gate/up) share one accumulator; the dict maps every dense name
    to its group's accumulator. Hooks are always removed on exit.
    """
    stats: dict[str, InputStats] = {}
    handles = []
    for group in adapter.input_groups:
        first = adapter.dense(block, group[0])
        acc = InputStats(first.in_features, device)
        for name in group:
            stats[name] = acc

        def hook(_module, args, acc=acc):
            acc.update(args[0])
        handles.append(first.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()

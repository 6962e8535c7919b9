"""Low-rank adapters on a pruned model's denses, merged into their weights when healing ends.

The update is LoRA's (Hu et al., arXiv 2106.09685; as peft's ``lora.Linear``): W + (α / r) · B A with A Kaiming-
uniform, B zero, so the adapted model starts as the model. Our own small module rather than peft's, because
peft's adapter reads a dense's whole input, and COMP's pruned denses (``IndexedInputLinear``) read only their
kept input columns — an update to the pruned columns could never be merged. ``LoraDense`` reads what the dense
reads, so the merge is exact; on a mask method's dense the update is masked the same way (a pruned weight stays
zero, during training and after the merge).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..models.surgery import IndexedInputLinear


class LoraDense(nn.Module):
    """``base(x) + (α / r) · x_kept ((B A) ⊙ mask)ᵀ`` around a dense (``nn.Linear`` or ``IndexedInputLinear``)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base = base
        out_features, in_features = base.weight.shape
        self.scale = alpha / rank
        weight = base.weight
        a = torch.empty(rank, in_features, dtype=torch.float32)
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=√5), as nn.Linear and peft initialise A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        self.register_buffer("mask", mask.to(device=weight.device, dtype=weight.dtype) if mask is not None else None,
                             persistent=False)

    def delta(self) -> torch.Tensor:
        """The update to the base weight, (out, kept inputs)."""
        update = self.scale * (self.lora_b @ self.lora_a)
        return update * self.mask if self.mask is not None else update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x.index_select(-1, self.base.input_index) if isinstance(self.base, IndexedInputLinear) else x
        if self.mask is not None:  # a masked update is a dense product, exact to what the merge will hold
            return self.base(x) + F.linear(kept, self.delta())
        return self.base(x) + self.scale * F.linear(F.linear(kept, self.lora_a), self.lora_b)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base dense with the update added to its weight (in place), to stand where this module stood."""
        self.base.weight.add_(self.delta().to(self.base.weight.dtype))
        return self.base


def add_adapters(denses: dict[str, tuple[nn.Module, str, nn.Module]], rank: int, alpha: float,
                 masks: dict[str, torch.Tensor], seed: int) -> dict[str, LoraDense]:
    """Wrap every dense (``name -> (parent, attribute, dense)``) in a ``LoraDense``, in place."""
    generator = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name, (parent, attribute, dense) in denses.items():
        adapter = LoraDense(dense, rank, alpha, masks.get(name), generator)
        setattr(parent, attribute, adapter)
        wrapped[name] = adapter
    return wrapped


def merge_adapters(denses: dict[str, tuple[nn.Module, str, nn.Module]], wrapped: dict[str, LoraDense]) -> None:
    """Put every base dense back where its adapter stood, with the update merged into its weight."""
    for name, (parent, attribute, _dense) in denses.items():
        setattr(parent, attribute, wrapped[name].merged())

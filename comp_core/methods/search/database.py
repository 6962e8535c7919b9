"""The search's database: every searched layer pruned alone at every level, on the original model's inputs.

A variant is the layer's block as the method prunes it at that level — a module ready to stand in the
model's block list, so scoring a candidate swaps modules instead of copying weights. It holds only what
pruning changed: tensors equal to the original block's (norms, denses the method left whole) are the
original's own parameters, shared, and ``Variant.nbytes`` counts the rest (kept rows and columns, compensated
weights, in the weight dtype). For a streamed model a variant is a streamed block of its own: what pruning
changed waits in the spill folder, the rest is read from where the original's tensors are
(``models.streaming.stream_copy``), so the database costs disk, not memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ...models.streaming import copy_block, is_streamed, stream_copy
from ...results import DenseReport, LayerReport


@dataclass
class Variant:
    """One layer pruned at one level: the pruned block, its reports and the bytes it holds of its own."""

    layer: int
    level: int
    block: nn.Module
    report: LayerReport
    denses: list[DenseReport]
    nbytes: int

    @property
    def removed_params(self) -> int:
        """Parameters the variant removes — or, for a mask method (nothing removed), zeroes."""
        if self.report.sparsity is not None:
            return int(round(self.report.sparsity * self.report.params))
        return self.report.removed_params


@dataclass
class VariantDatabase:
    """``variants[(layer, level)]``; ``seconds`` to build it."""

    variants: dict[tuple[int, int], Variant] = field(default_factory=dict)
    seconds: float = 0.0

    def __getitem__(self, key: tuple[int, int]) -> Variant:
        return self.variants[key]

    def add(self, variant: Variant) -> None:
        self.variants[(variant.layer, variant.level)] = variant

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.variants.values())

    @property
    def megabytes(self) -> float:
        return self.nbytes / 2**20


def share_unchanged(pruned: nn.Module, original: nn.Module) -> int:
    """Point every parameter and buffer of ``pruned`` that equals the original's (same name, shape, dtype and
    values) at the original's tensor; returns the bytes ``pruned`` still holds of its own."""
    own = 0
    originals = dict(original.named_parameters())
    for name, param in list(pruned.named_parameters()):
        source = originals.get(name)
        if source is not None and source.shape == param.shape and source.dtype == param.dtype and torch.equal(
                source, param):
            owner, attr = _owner(pruned, name)
            setattr(owner, attr, source)
        else:
            own += param.numel() * param.element_size()
    return own


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    for part in path:
        root = getattr(root, part)
    return root, attr


PruneAt = Callable[[nn.Module, int, float], tuple[LayerReport, list[DenseReport]]]


def layer_variants(block: nn.Module, layer: int, levels: range, removed_at: Callable[[int], float],
                   prune_at: PruneAt) -> list[Variant]:
    """``block`` pruned at every level (a copy each; ``block`` itself unchanged): ``prune_at(copy, layer,
    removed parameters)`` is the method's block step, in place on the copy."""
    out = []
    keep = stream_copy if is_streamed(block) else share_unchanged
    for level in levels:
        t0 = time.perf_counter()
        pruned = copy_block(block)
        report, denses = prune_at(pruned, layer, removed_at(level))
        report.seconds = time.perf_counter() - t0
        out.append(Variant(layer=layer, level=level, block=pruned, report=report, denses=denses,
                           nbytes=keep(pruned, block)))
    return out

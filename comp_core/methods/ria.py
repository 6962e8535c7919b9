"""RIA — Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models", ICLR 2024), with its channel permutation for N:M sparsity.

Score of weight W_ij (output i, input j), from the statistics pass every mask method shares::

    RIA_ij = ( |W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik| ) · (‖X_j‖₂)^a        a = ``alpha`` = 0.5

(relative importance within its input column plus within its output row, times the input's activation
norm). Unstructured: the lowest share is pruned within every output row (``per_row``; RIA's own code
compares over the whole matrix unless ``--per_outneuron`` is given, ``per_row=False`` does that); N:M:
the N lowest of every M consecutive inputs.

**Channel permutation (N:M only, ``permute``).** ``comp_core.math.permutation`` picks an order of the input
channels that spreads important weights over the M-groups (RIA's heuristic reallocation, then a
Hungarian refinement per slot), never keeping less importance than the unpermuted order; the N:M mask is
taken in that order (``MaskedWeight.input_order``; ``MaskMethod.relayout`` applies it after the block
loop, ``surgery.apply_input_order``). The model computes with the permutation *exactly*, and the pruned weight is stored
in permuted column order, so every group of M stored columns holds exactly N zeros — the layout sparse
N:M kernels and ``comp_core.export.compressed`` need:

* down_proj / fc2 (input = the block's own MLP activations): the permutation is folded into its
  producers — gate/up (fc1) output rows and fc1's bias are permuted the same way, so the activations
  arrive already permuted: no runtime cost, stock module types and shapes;
* q/k/v, gate/up, fc1 (input = the normed residual stream, shared with other readers) and o_proj /
  out_proj (input = the attention heads' outputs): the dense becomes an ``IndexedInputLinear`` whose
  ``input_index`` is the full permutation, i.e. one gather of the input before the matmul.

A permuted model is no longer stock-shaped in its index buffers, so ``comp_core.export.save_pruned``
saves it as ``comp_<type>`` (``load_pruned`` reads it back). ``result.extra["permutation"]`` reports the
retained importance (sum of the kept scores) with and without the permutation, per dense and in total.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import get_adapter
from ..math.permutation import compute_permutation
from ..math.sparsity import SparsityPattern, nm_mask, pattern_mask
from ..models.surgery import apply_input_order
from .registry import register_method
from .sparse import MaskedWeight, MaskMethod, SparseSettings


def ria_score(weight: torch.Tensor, sq_norms: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA score (d_out, d_in) float32 of ``weight`` (d_out, d_in) given ‖X_j‖² per input (d_in,).

    A column or row whose |W| sums to zero gets relative importance 0 there (no 0/0)."""
    magnitude = weight.detach().abs().float()  # (d_out, d_in)
    tiny = torch.finfo(torch.float32).tiny
    by_column = magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)  # Σ_k |W_kj| per input j
    by_row = magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)  # Σ_k |W_ik| per output i
    activation = sq_norms.to(magnitude.device, torch.float32).clamp_min(0.0).sqrt().pow(alpha)  # (d_in,)
    return (by_column + by_row) * activation.unsqueeze(0)


@dataclass
class RIASettings(SparseSettings):
    """alpha: exponent a of ‖X_j‖₂. permute: channel permutation before an N:M mask (ignored when
    unstructured). per_row: unstructured masks compare within each output row (False: over the whole
    matrix). permute_block: groups per assignment problem of the refinement (0 = the whole matrix)."""

    alpha: float = 0.5
    permute: bool = True
    per_row: bool = True
    permute_block: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if math.isnan(self.alpha) or math.isinf(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha}")
        if self.permute_block < 0:
            raise ValueError("permute_block must be >= 0 (0 = one assignment problem per matrix)")


@register_method("ria", summary="RIA: relative importance × ‖X‖^a per row; N:M with channel permutation")
class RIA(MaskMethod):
    settings_class = RIASettings

    def mask_dense(self, weight, stats, gram, pattern: SparsityPattern, settings) -> MaskedWeight:
        scores = ria_score(weight, gram.diagonal(), settings.alpha)  # gram diagonal = ‖X_j‖²
        if not pattern.is_nm or not settings.permute:
            mask = pattern_mask(scores, pattern, per_row=settings.per_row)
            return MaskedWeight(weight=weight.masked_fill(mask, 0), mask=mask, scores=scores)
        found = compute_permutation(scores, pattern.n, pattern.m, block_groups=settings.permute_block)
        order = found.order.to(scores.device)
        mask = torch.empty_like(scores, dtype=torch.bool)
        mask[:, order] = nm_mask(scores[:, order], pattern.n, pattern.m)  # N:M in stored order
        report = {"retained_identity": found.retained_identity, "retained_reallocated": found.retained_reallocated,
                  "retained": found.retained, "start": "identity" if found.is_identity else found.start}
        return MaskedWeight(weight=weight.masked_fill(mask, 0), mask=mask, scores=scores, input_order=found.order,
                            report=report)

    def summarize(self, reports, pattern):
        if not reports:
            return {}, []
        identity = sum(d["retained_identity"] for d in reports)
        retained = sum(d["retained"] for d in reports)
        summary = {"pattern": pattern.label, "denses": len(reports), "permuted": sum(d["permuted"] for d in reports),
                   "retained_identity": identity, "retained": retained,
                   "gain": retained / identity - 1.0 if identity else 0.0, "per_dense": reports}
        note = (f"channel permutation: {summary['permuted']} of {summary['denses']} denses permuted; retained "
                f"importance {identity:.6g} -> {retained:.6g} ({100 * summary['gain']:+.3f} %)")
        return {"permutation": summary}, [note]


def stored_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``weight == 0`` of every dense of every block, in the layout the weights are stored in."""
    adapter = get_adapter(model)
    return {f"{layer}.{spec.name}": adapter.dense(block, spec.name).weight.detach() == 0
            for layer, block in enumerate(adapter.blocks(model)) for spec in adapter.denses}


__all__ = ["RIA", "RIASettings", "apply_input_order", "ria_score", "stored_masks"]

"""RIA — Relative Importance and Activations (Zhang et al., "Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models", ICLR 2024), with its channel permutation for N:M sparsity.

Score of weight W_ij (output i, input j), from the statistics pass every mask method shares::

    RIA_ij = ( |W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik| ) · (‖X_j‖₂)^a        a = ``alpha`` = 0.5

(relative importance within its input column plus within its output row, times the input's activation
norm). Unstructured: the lowest share is pruned within every output row (``per_row``; RIA's own code
compares over the whole matrix unless ``--per_outneuron`` is given, ``per_row=False`` does that); N:M:
the N lowest of every M consecutive inputs.

**Channel permutation (N:M only, ``permute``).** ``comp_core.permutation`` picks an order of the input
channels that spreads important weights over the M-groups (RIA's heuristic reallocation, then a
Hungarian refinement per slot), never keeping less importance than the unpermuted order; the N:M mask is
taken in that order. The model computes with the permutation *exactly*, and the pruned weight is stored
in permuted column order, so every group of M stored columns holds exactly N zeros — the layout sparse
N:M kernels and ``comp_core.sparse_export`` need:

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

import contextvars
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.adapters import ArchAdapter, get_adapter
from ..permutation import compute_permutation
from ..sparsity import SparsityPattern, nm_mask, pattern_mask
from ..surgery import IndexedInputLinear, input_index_of, replace_submodule
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


@dataclass
class _Permuted:
    """One dense's permutation, recorded while masking and applied to the module afterwards."""

    order: torch.Tensor  # (d_in,) stored position -> original input channel
    retained_identity: float
    retained_reallocated: float
    retained: float
    start: str


# The permutations chosen during the current ``prune`` call, keyed by the storage of the weight that was
# masked. A context variable, not an attribute: the registered method is one shared instance.
_RECORD: contextvars.ContextVar[dict[int, _Permuted] | None] = contextvars.ContextVar("ria_permutations",
                                                                                        default=None)


def apply_input_order(block: nn.Module, adapter: ArchAdapter, name: str, order: torch.Tensor) -> None:
    """Store dense ``name``'s weight with its input columns in ``order`` and make its input arrive in that
    order, without changing what the block computes.

    A plain coupled consumer (down_proj, fc2) gets its producers' output rows (and biases) permuted; any
    other dense becomes an ``IndexedInputLinear`` reading ``input[..., index[order]]``."""
    module = adapter.dense(block, name)
    spec = adapter.dense_spec(name)
    order = order.to(module.weight.device)
    if order.numel() != module.weight.shape[1]:
        raise ValueError(f"{name}: order has {order.numel()} entries, the weight {module.weight.shape[1]} columns")
    weight = module.weight.data[:, order].contiguous()  # (d_out, d_in) in stored order
    if spec.coupled_producers and not isinstance(module, IndexedInputLinear):
        module.weight.data = weight
        for producer in spec.coupled_producers:
            source = adapter.dense(block, producer)
            source.weight.data = source.weight.data[order].contiguous()  # output rows in stored order
            if source.bias is not None:
                source.bias.data = source.bias.data[order].contiguous()
        return
    bias = module.bias.data.clone() if module.bias is not None else None
    index = input_index_of(module)[order]
    replace_submodule(block, name, IndexedInputLinear(weight, bias, index, module.in_features))


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
        record = _RECORD.get()
        if record is not None:  # inside prune(): the dense is re-laid out in stored order afterwards
            record[weight.data_ptr()] = _Permuted(
                order=found.order, retained_identity=found.retained_identity,
                retained_reallocated=found.retained_reallocated, retained=found.retained,
                start="identity" if found.is_identity else found.start)
        return MaskedWeight(weight=weight.masked_fill(mask, 0), mask=mask, scores=scores)

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        """MaskMethod's loop masks with the permuted N:M masks (weights still in original column order, so
        every later block is calibrated on exactly the masked model); then each permuted dense is re-laid
        out in stored order. The re-layout changes no output, so doing it after the loop is equivalent."""
        record: dict[int, _Permuted] = {}
        token = _RECORD.set(record)
        try:
            pruned, result = super().prune(model, samples, settings, on_event=on_event, inplace=inplace)
        finally:
            _RECORD.reset(token)
        if record:
            result.extra["permutation"] = self._apply_permutations(pruned, record, settings.pattern)
            summary = result.extra["permutation"]
            result.plan.notes.append(
                f"channel permutation: {summary['permuted']} of {summary['denses']} denses permuted; retained "
                f"importance {summary['retained_identity']:.6g} -> {summary['retained']:.6g} "
                f"({100 * summary['gain']:+.3f} %)")
        return pruned, result

    @staticmethod
    def _apply_permutations(model: nn.Module, record: dict[int, _Permuted], pattern: SparsityPattern) -> dict:
        adapter = get_adapter(model)
        per_dense, matched = [], 0
        for layer, block in enumerate(adapter.blocks(model)):
            for spec in adapter.denses:
                module = adapter.dense(block, spec.name)
                found = record.get(module.weight.data.data_ptr())
                if found is None:
                    continue
                matched += 1
                d_in = module.weight.shape[1]
                width = found.order.numel()
                permuted = not torch.equal(found.order, torch.arange(width))
                if permuted:
                    order = torch.cat([found.order, torch.arange(width, d_in)])  # a ragged tail stays in place
                    apply_input_order(block, adapter, spec.name, order)
                per_dense.append({"layer": layer, "name": spec.name, "permuted": permuted,
                                  "retained_identity": found.retained_identity,
                                  "retained_reallocated": found.retained_reallocated,
                                  "retained": found.retained, "start": found.start})
        if matched != len(record):
            raise AssertionError(f"{len(record) - matched} masked weights were not found in the model again; "
                                 "the mask loop must mask the denses' own weight tensors in place")
        identity = sum(d["retained_identity"] for d in per_dense)
        retained = sum(d["retained"] for d in per_dense)
        return {"pattern": pattern.label, "denses": len(per_dense),
                "permuted": sum(d["permuted"] for d in per_dense),
                "retained_identity": identity, "retained": retained,
                "gain": retained / identity - 1.0 if identity else 0.0, "per_dense": per_dense}


def stored_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``weight == 0`` of every dense of every block, in the layout the weights are stored in."""
    adapter = get_adapter(model)
    return {f"{layer}.{spec.name}": adapter.dense(block, spec.name).weight.detach() == 0
            for layer, block in enumerate(adapter.blocks(model)) for spec in adapter.denses}


__all__ = ["RIA", "RIASettings", "apply_input_order", "ria_score", "stored_masks"]

"""Layer importance by cosine redundancy, and iterative layer removal (COMP step 1–2, ShortGPT-like).

I_l = 1 − mean_t cos(x_l,t, y_l,t): a block whose output points where its input did changes little and
can go. Removing one block changes the inputs of every later block, so after each removal the
importances are recomputed on the shortened model before the next victim is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .capture import BlockInputs, capture_block_inputs
from .similarity import LayerDistanceTally
from ..events import ProgressCallback, emit
from .blocks import BlockVisit, block_loop


def cosine_importance(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of 1 − cos(x_t, y_t) and the token count (to average over batches).

    Each cosine in the stream's own precision (float32: ~1e-7, far below any gap between layers), the sum
    over tokens in float64; converting the (N, d) streams to float64 first cost six times as long."""
    x = x.reshape(-1, x.shape[-1])  # (N, d)
    y = y.reshape(-1, y.shape[-1])
    return float((1.0 - F.cosine_similarity(x, y, dim=-1)).sum(dtype=torch.float64)), x.shape[0]


class ImportanceTally:
    """Mean 1 − cos over every token a block saw, summed batch by batch (``add``) wherever the batches come
    from: a block loop's replay or the capture forward."""

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        s, n = cosine_importance(x, y)
        self.sums[index] = self.sums.get(index, 0.0) + s
        self.counts[index] = self.counts.get(index, 0) + n

    def importances(self) -> dict[int, float]:
        return {i: self.sums[i] / self.counts[i] for i in sorted(self.sums)}


def layer_importances(blocks: list[nn.Module], active: list[int], inputs: BlockInputs) -> dict[int, float]:
    """Importance of every active block (original indices), running the active blocks in order."""
    tally = ImportanceTally()

    def measure(visit: BlockVisit) -> None:
        for x, y in zip(visit.inputs, visit.outputs):
            tally.add(visit.index, x, y)

    block_loop(blocks, inputs, active, measure)
    return tally.importances()


def capture_with_importances(model: nn.Module, adapter, samples: torch.Tensor, *, batch_size: int = 8,
                             distance: LayerDistanceTally | None = None) -> tuple[BlockInputs, dict[int, float]]:
    """Block inputs and every block's importance on the unpruned model from one forward pass: the capture
    forward runs the blocks in order anyway, so the removal search's first measurement comes with it.
    ``distance``: a tally (one per model's depth) that the same forward fills with the layer-distance matrix
    (``similarity``); read it with ``distance.distances()`` afterwards."""
    tally = ImportanceTally()

    def observe(index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        tally.add(index, x, y)
        if distance is not None:
            distance.observe(index, x, y)

    inputs = capture_block_inputs(model, adapter, samples, batch_size=batch_size, observe=observe)
    return inputs, tally.importances()


def layers_for_ratio(ratio: float, params_total: int, block_params: list[int], candidates: int) -> int:
    """How many whole blocks a layer-removal-only method removes for ``ratio`` of all parameters: the count
    whose parameters come closest to the target (blocks of one model are the same size), at most ``candidates``."""
    mean_block = sum(block_params) / len(block_params)
    return min(int(round(ratio * params_total / mean_block)), candidates)


def layers_within(ratio: float, n_remove: int, params_total: int, block_params: list[int]) -> int:
    """How many of ``n_remove`` whole blocks a hybrid method removes at ``ratio``: never more than the ratio's
    budget holds (ratio 0 removes none)."""
    mean_block = sum(block_params) / len(block_params)
    return min(int(n_remove), int(ratio * params_total // mean_block))


@dataclass
class RemovalResult:
    """Removal order and how every remaining layer's importance moved after each removal."""

    removal_order: list[int]
    history: list[dict[int, float]] = field(default_factory=list)  # history[k]: importances after k removals

    def removed(self, n: int) -> list[int]:
        return sorted(self.removal_order[:n])

    def importances_after(self, n: int) -> dict[int, float]:
        return self.history[n]


def iterative_removal(blocks: list[nn.Module], inputs: BlockInputs, n_remove: int, protected: set[int],
                      on_event: ProgressCallback | None = None,
                      initial: dict[int, float] | None = None,
                      measured: RemovalResult | None = None) -> RemovalResult:
    """Remove the least important non-protected block ``n_remove`` times, re-measuring after each.
    ``initial``: the importances of all blocks, if already measured (``capture_with_importances``).
    ``measured``: a shorter result of the same search (same protected set) to go on from: its steps are not
    measured again, so a deeper order costs only the removals it adds."""
    active = list(range(len(blocks)))
    candidates = [i for i in active if i not in protected]
    if n_remove > len(candidates):
        raise ValueError(f"cannot remove {n_remove} layers: only {len(candidates)} are not protected")
    result = RemovalResult(removal_order=[])
    if measured is not None and measured.history:
        done = min(len(measured.removal_order), n_remove)
        result = RemovalResult(removal_order=list(measured.removal_order[:done]), history=list(measured.history[:done]))
        active = [i for i in active if i not in result.removal_order]
    for step in range(len(result.removal_order), n_remove + 1):
        if step == 0 and initial is not None:
            importances = initial
        elif measured is not None and step < len(measured.history):
            importances = measured.history[step]
        else:
            emit(on_event, "layer-removal", step, n_remove + 1, f"measuring the importance of {len(active)} layers")
            importances = layer_importances(blocks, active, inputs)
        result.history.append(importances)
        if step == n_remove:
            break
        victim = min((i for i in active if i not in protected), key=lambda i: importances[i])
        result.removal_order.append(victim)
        active.remove(victim)
    if n_remove:
        emit(on_event, "layer-removal", n_remove + 1, n_remove + 1,
             f"the {n_remove} least important layers, in order: {', '.join(map(str, result.removal_order))}")
    return result

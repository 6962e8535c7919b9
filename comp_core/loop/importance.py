"""Layer importance by cosine redundancy, and iterative layer removal (COMP step 1–2, ShortGPT-like).

I_l = 1 − mean_t cos(x_l,t, y_l,t): a block whose output points where its input did changes little and
can go. Removing one block changes the inputs of every later block, so after each removal the
importances are recomputed on the shortened model before the next victim is chosen.

With ``rescale`` (Prune&Comp's magnitude compensation, ``math.magnitude``) each victim's scale s is measured
on the stream that chooses it, and every later measurement replays the shortened model with the stream
multiplied by s where the victim was — the paper's iterative use: importances of the compensated model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .capture import BlockInputs, capture_block_inputs
from .similarity import LayerDistanceTally
from ..events import ProgressCallback, emit
from ..math.magnitude import entering_scales, magnitude_ratio_sum
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

    measure = staticmethod(cosine_importance)  # (x, y) -> (sum over the batch, count)

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        s, n = self.measure(x, y)
        self.sums[index] = self.sums.get(index, 0.0) + s
        self.counts[index] = self.counts.get(index, 0) + n

    def importances(self) -> dict[int, float]:
        return {i: self.sums[i] / self.counts[i] for i in sorted(self.sums)}


class ScaleTally(ImportanceTally):
    """Prune&Comp's scale of every block (``math.magnitude``: the mean over sequences and channels of
    mean_t |y| / mean_t |x|), summed batch by batch like the importances; read with ``scales()``."""

    measure = staticmethod(magnitude_ratio_sum)

    def scales(self) -> dict[int, float]:
        return self.importances()


def layer_importances(blocks: list[nn.Module], active: list[int], inputs: BlockInputs, *,
                      gaps: Mapping[int, float] | None = None, scales: ScaleTally | None = None) -> dict[int, float]:
    """Importance of every active block (original indices), running the active blocks in order.
    ``gaps``: {removed block: its Prune&Comp scale}; the replay multiplies the stream by it where the block was.
    ``scales``: a tally that the same replay fills with every active block's own scale."""
    tally = ImportanceTally()

    def measure(visit: BlockVisit) -> None:
        for x, y in zip(visit.inputs, visit.outputs):
            tally.add(visit.index, x, y)
            if scales is not None:
                scales.add(visit.index, x, y)

    block_loop(blocks, inputs, active, measure, input_scales=entering_scales(active, gaps) if gaps else None)
    return tally.importances()


def block_scale(blocks: list[nn.Module], active: list[int], inputs: BlockInputs, index: int,
                gaps: Mapping[int, float] | None = None) -> float:
    """Prune&Comp's scale of active block ``index``: the active blocks before it are replayed (the stream
    multiplied by ``gaps``' scales where removed blocks were), then its own input and output are compared."""
    upto = active[:active.index(index) + 1]
    tally = ScaleTally()

    def measure(visit: BlockVisit) -> None:
        if visit.index == index:
            for x, y in zip(visit.inputs, visit.outputs):
                tally.add(index, x, y)

    block_loop(blocks, inputs, upto, measure, input_scales=entering_scales(upto, gaps) if gaps else None)
    return tally.scales()[index]


def gap_scales(blocks: list[nn.Module], inputs: BlockInputs, removed: Iterable[int]) -> dict[int, float]:
    """{removed block: its Prune&Comp scale}, gap by gap in layer order on the pruned stream: each removed
    block's input is what the shortened model hands it (the kept blocks before it run, every earlier gap's
    scale applied), its output is its own forward on that input. One pass over the blocks up to the last gap
    (for a one-shot removal such as ShortGPT's)."""
    removed = sorted(set(removed))
    scales: dict[int, float] = {}
    hidden = inputs.hidden
    done = -1  # the blocks up to here are behind the stream ``hidden``
    for r in removed:
        segment = list(range(done + 1, r)) + [r]  # the kept blocks since the last gap, then block r
        tally = ScaleTally()
        entering: list[torch.Tensor] = []

        def measure(visit: BlockVisit) -> None:
            if visit.index == r:
                entering.extend(visit.inputs)
                for x, y in zip(visit.inputs, visit.outputs):
                    tally.add(r, x, y)

        block_loop(blocks, replace(inputs, hidden=hidden), segment, measure)
        scales[r] = tally.scales()[r]
        hidden = [x * scales[r] for x in entering]  # block r skipped, the stream compensated
        done = r
    return scales


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
    """Removal order and how every remaining layer's importance moved after each removal; with Prune&Comp's
    rescaling, the scale measured for each removed layer."""

    removal_order: list[int]
    history: list[dict[int, float]] = field(default_factory=list)  # history[k]: importances after k removals
    scales: list[float] | None = None  # scales[k]: removal_order[k]'s scale (None: searched without rescaling)

    def removed(self, n: int) -> list[int]:
        return sorted(self.removal_order[:n])

    def importances_after(self, n: int) -> dict[int, float]:
        return self.history[n]

    def scales_after(self, n: int) -> dict[int, float]:
        """{removed layer: its scale} for the first ``n`` removals ({} when searched without rescaling). Each
        scale was measured with the earlier ones applied, so the first n are valid for any n."""
        if self.scales is None:
            return {}
        return dict(zip(self.removal_order[:n], self.scales[:n]))


def iterative_removal(blocks: list[nn.Module], inputs: BlockInputs, n_remove: int, protected: set[int],
                      on_event: ProgressCallback | None = None,
                      initial: dict[int, float] | None = None,
                      measured: RemovalResult | None = None, *, rescale: bool = False) -> RemovalResult:
    """Remove the least important non-protected block ``n_remove`` times, re-measuring after each.
    ``initial``: the importances of all blocks, if already measured (``capture_with_importances``).
    ``measured``: a shorter result of the same search (same protected set) to go on from: its steps are not
    measured again, so a deeper order costs only the removals it adds.
    ``rescale``: Prune&Comp — measure each victim's scale on the stream that chose it (``RemovalResult.scales``)
    and replay every later measurement with the stream multiplied by it where the victim was."""
    active = list(range(len(blocks)))
    candidates = [i for i in active if i not in protected]
    if n_remove > len(candidates):
        raise ValueError(f"cannot remove {n_remove} layers: only {len(candidates)} are not protected")
    if measured is not None and (measured.scales is not None) != rescale:
        raise ValueError("the measured removal order was searched " + ("without" if rescale else "with")
                         + " Prune&Comp's rescaling; measure it again with the same setting")
    result = RemovalResult(removal_order=[], scales=[] if rescale else None)
    if measured is not None and measured.history:
        done = min(len(measured.removal_order), n_remove)
        result = RemovalResult(removal_order=list(measured.removal_order[:done]), history=list(measured.history[:done]),
                               scales=list(measured.scales[:done]) if rescale else None)
        active = [i for i in active if i not in result.removal_order]
    gaps = result.scales_after(len(result.removal_order))  # {removed: scale}, applied by every later replay
    for step in range(len(result.removal_order), n_remove + 1):
        tally = None  # this step's scales, when its replay measures them
        if step == 0 and initial is not None:
            importances = initial
        elif measured is not None and step < len(measured.history):
            importances = measured.history[step]
        else:
            emit(on_event, "layer-removal", step, n_remove + 1, f"measuring the importance of {len(active)} layers")
            tally = ScaleTally() if rescale else None
            importances = layer_importances(blocks, active, inputs, gaps=gaps, scales=tally)
        result.history.append(importances)
        if step == n_remove:
            break
        victim = min((i for i in active if i not in protected), key=lambda i: importances[i])
        if rescale:
            scale = tally.scales()[victim] if tally is not None else block_scale(blocks, active, inputs, victim, gaps)
            result.scales.append(scale)
            gaps[victim] = scale
        result.removal_order.append(victim)
        active.remove(victim)
    if n_remove:
        scaled = (" (Prune&Comp scales " + ", ".join(f"{s:.3f}" for s in result.scales) + ")") if rescale else ""
        emit(on_event, "layer-removal", n_remove + 1, n_remove + 1,
             f"the {n_remove} least important layers, in order: {', '.join(map(str, result.removal_order))}{scaled}")
    return result

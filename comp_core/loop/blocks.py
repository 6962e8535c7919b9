"""The one block loop every method uses: visit the blocks in order on captured calibration inputs.

For each active block the loop replays the block on the hidden states entering it (collecting the input
statistics of its denses in the same pass when asked), hands the method a ``BlockVisit`` — block, inputs,
unpruned outputs, statistics — and moves on with either

* **identical** inputs: the next block sees this block's *unpruned* outputs (COMP's and FLAP's default:
  every block is calibrated on the unpruned model's activations), or
* **accumulated** inputs: the next block sees this block's outputs *after* the method changed it
  (SparseGPT/Wanda style), replayed only when the method says it changed something, or
* **paired** inputs (the COMP paper's accumulated form): both streams at once — ``reference`` (unpruned
  blocks, what identical propagates) and ``shifted`` (pruned blocks, what accumulated propagates) — and
  statistics that pair what a dense reads on the shifted stream with its input on the reference one
  (``stats.collect_paired_block_stats``), so a method can fit the unpruned output from pruned inputs.

Methods never write a loop of their own: they pass a visitor, and global steps (allocation, thresholds
across layers, layer removal) run before or after the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable, Mapping

import torch
from torch import nn

from .capture import BlockInputs, replay, run_block
from ..events import ProgressCallback, emit
from ..models.adapters import ArchAdapter
from .stats import InputStats, collect_block_stats, collect_paired_block_stats
from ..models.streaming import mark_modified, resident

PROPAGATION = ("identical", "accumulated", "paired")


@dataclass
class BlockVisit:
    """What a method sees of one block. ``index`` is the block's original layer index."""

    index: int
    step: int  # position among the visited blocks
    block: nn.Module
    inputs: list[torch.Tensor]  # per calibration batch: (batch, seq, d_model)
    kwargs: list[dict]
    outputs: list[torch.Tensor]  # the block's outputs before the visitor changed anything
    stats: dict[str, InputStats] | None  # dense name -> its input statistics (None when not collected)
    shifted_inputs: list[torch.Tensor] | None = None  # paired only: the pruned model's hidden states entering


# A visitor returns None when it left the block as it was, else the module whose outputs the next block
# should see in accumulated mode (usually ``visit.block`` itself after pruning it; a pruned copy when it
# only predicts what pruning would do).
Visitor = Callable[[BlockVisit], "nn.Module | None"]


def block_loop(blocks: list[nn.Module], inputs: BlockInputs, active: Iterable[int], visit: Visitor, *,
               adapter: ArchAdapter | None = None, with_stats: Callable[[int], bool] | None = None,
               propagation: str = "identical", stat_device: torch.device | str | None = None,
               stat_folds: int = 0, stat_denses: Collection[str] | None = None,
               on_event: ProgressCallback | None = None, stage: str = "blocks",
               describe: Callable[[int], str] | None = None,
               input_scales: Mapping[int, float] | None = None) -> list[torch.Tensor]:
    """Visit ``active`` blocks (original indices into ``blocks``) in order; returns the last hidden states
    (with paired propagation: the shifted stream's, what the pruned model computes).

    ``with_stats(i)`` says whether block i's input statistics are collected (needs ``adapter``); statistics
    are gathered during the same replay that produces the block's outputs, so no block runs twice unless
    accumulated propagation must see a changed block. Paired propagation runs every block on both streams
    (until a block changes they are one list, and a block without statistics then runs once);
    ``visit.inputs``/``visit.outputs`` are then the reference stream's, ``visit.shifted_inputs`` the other.
    ``stat_folds=2`` also keeps every input Gram split by calibration sequence (``InputStats.fold_grams``);
    ``stat_denses`` names the denses whose statistics the visitor reads (None: all).
    ``input_scales``: {block i: factor} multiplies the hidden states entering block i (both streams) by the
    factor before the visit — Prune&Comp's compensation where removed blocks left a gap just before i
    (``math.magnitude.entering_scales``); the captured inputs themselves are never changed.
    """
    if propagation not in PROPAGATION:
        raise ValueError(f"propagation must be one of {PROPAGATION}, got '{propagation}'")
    paired = propagation == "paired"
    active = list(active)
    hidden = inputs.hidden
    shifted = hidden  # paired only: the pruned model's stream; the same list until a block changes
    for step, i in enumerate(active):
        block = blocks[i]
        if input_scales and i in input_scales:
            factor = input_scales[i]
            scaled = [h * factor for h in hidden]
            shifted = scaled if shifted is hidden or shifted is None else [h * factor for h in shifted]
            hidden = scaled
        with resident(block):  # a streamed block is read once per visit (``streaming``)
            hidden, shifted = _visit_block(block, i, step, hidden, shifted, inputs, visit, adapter, with_stats,
                                           propagation, stat_device, stat_folds, stat_denses)
        emit(on_event, stage, step + 1, len(active), describe(i) if describe else f"layer {i}", layer=i)
    return shifted if paired else hidden


def _visit_block(block: nn.Module, i: int, step: int, hidden: list[torch.Tensor], shifted: list[torch.Tensor] | None,
                 inputs: BlockInputs, visit: Visitor, adapter: ArchAdapter | None,
                 with_stats: Callable[[int], bool] | None, propagation: str, stat_device, stat_folds: int,
                 stat_denses: Collection[str] | None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """One step of ``block_loop``: replay (with statistics), visit; returns the next (hidden, shifted)."""
    paired = propagation == "paired"
    kwargs = [inputs.kwargs_for(block, b) for b in range(len(hidden))]
    stats = None
    shifted_outputs = None
    if with_stats is not None and with_stats(i):
        if adapter is None:
            raise ValueError("collecting statistics needs the model's adapter")
        device = stat_device if stat_device is not None else next(block.parameters()).device
        if paired:
            stats, outputs, shifted_outputs = collect_paired_block_stats(
                block, adapter, lambda b: run_block(block, hidden[b], kwargs[b]).to(hidden[b].device),
                lambda b: run_block(block, shifted[b], kwargs[b]).to(shifted[b].device), len(hidden), device,
                only=stat_denses)
            if shifted is hidden:  # same inputs, same block: keep one stream until something changes
                shifted_outputs = outputs
        else:
            with collect_block_stats(block, adapter, device, folds=stat_folds, only=stat_denses) as stats:
                outputs = replay(block, hidden, kwargs)
    else:
        outputs = replay(block, hidden, kwargs)
        if paired:
            shifted_outputs = outputs if shifted is hidden else replay(block, shifted, kwargs)
    changed = visit(BlockVisit(index=i, step=step, block=block, inputs=hidden, kwargs=kwargs,
                               outputs=outputs, stats=stats, shifted_inputs=shifted if paired else None))
    if propagation == "accumulated" and changed is not None:
        outputs = replay(changed, hidden, kwargs)
    if paired and changed is not None:
        shifted_outputs = replay(changed, shifted, kwargs)
    if changed is block:
        mark_modified(block)
    return outputs, shifted_outputs

"""What every method shares: the checks of its settings against the model, and the scaffold of a run.

A method's ``prune`` is then its own decisions between the same four steps::

    run = Run.begin(model, inplace)                       # timer, parameter count, working copy, blocks
    with run.calibration():
        inputs = run.capture(samples, plan, batch_size=…)   # block 0's inputs (timed as "capture")
        run.loop(inputs, visit, plan, timing="…", …)        # ``loop.blocks.block_loop`` over the blocks (timed)
    return run.model, run.finish(plan)                   # ``registry.finish``: accounting checked, result timed

``protected_layers`` and ``check_dense_kinds`` are the one place a protected block or a dense kind is
checked, so every method refuses the same mistake with the same message.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..events import ProgressCallback, emit
from ..loop.blocks import BlockVisit, block_loop
from ..loop.capture import BlockInputs, calibration_context, capture_block_inputs
from ..math.magnitude import cumulative_scales
from ..models.adapters import ArchAdapter, get_adapter
from ..models.streaming import resident
from ..models.surgery import rescale_outputs
from ..results import Plan, PruneResult
from ..runtime import count_parameters
from .registry import finish, working_copy


def protected_layers(protected: Iterable[int], n_layers: int, *, ratio: float = 0.0) -> set[int]:
    """The protected blocks as indices 0..n_layers−1 (negative ones count from the end). Refuses an index the
    model does not have and, when something is to be pruned (``ratio`` > 0), a model whose every block is
    protected."""
    protected = list(protected)
    bad = [i for i in protected if not -n_layers <= i < n_layers]
    if bad:
        raise ValueError(f"protected layers {bad} do not exist: the model has layers 0..{n_layers - 1}")
    out = {i % n_layers for i in protected}
    if ratio > 0 and len(out) >= n_layers:
        raise ValueError("every layer is protected: nothing can be pruned")
    return out


def check_dense_kinds(kinds: Iterable[str] | None, adapter: ArchAdapter, *, allow_empty: bool = False) -> None:
    """Refuse dense kinds (``DenseSpec.kind``: "q", "o", "down", …) this model's blocks do not have, and an empty
    choice unless ``allow_empty`` (None = every dense)."""
    if kinds is None:
        return
    kinds = list(kinds)
    known = [d.kind for d in adapter.denses]
    unknown = [k for k in kinds if k not in known]
    if unknown or (not kinds and not allow_empty):
        raise ValueError(f"dense kinds {unknown or '()'} do not exist in this {adapter.family} model; "
                         f"its denses are: {', '.join(known)}")


def fold_layer_scales(blocks: list[nn.Module], adapter: ArchAdapter, scales: Mapping[int, float]) -> None:
    """Prune&Comp's compensation, folded: divide the output projections of every kept block after a removed one
    by the product of the scales of all removed blocks before it (``math.magnitude.cumulative_scales``), each
    block resident while it changes. ``blocks``: the original list (``scales`` is keyed by original index);
    the removed blocks themselves are left alone (the caller drops them)."""
    kept = [i for i in range(len(blocks)) if i not in scales]
    for i, factor in cumulative_scales(kept, scales).items():
        if factor != 1.0:
            with resident(blocks[i], modifies=True):
                rescale_outputs(blocks[i], adapter, 1.0 / factor)


def scales_note(scales: Mapping[int, float]) -> str:
    """The plan note of a rescaled removal: each removed layer's scale."""
    listed = ", ".join(f"layer {i}: {s:.4f}" for i, s in sorted(scales.items()))
    return (f"Prune&Comp rescaling: the stream where each removed layer was is multiplied by its scale ({listed}); "
            "folded as 1/(product of earlier scales) into the o/down projections of every later kept layer")


@dataclass
class Run:
    """One prune in progress: the model it changes (a copy unless in place), that model's adapter and blocks,
    the parameter count before and the start time."""

    model: nn.Module
    adapter: ArchAdapter
    blocks: list[nn.Module]
    params_before: int
    start: float

    @classmethod
    def begin(cls, model: nn.Module, inplace: bool) -> "Run":
        start = time.perf_counter()
        params_before = count_parameters(model)
        target = working_copy(model, inplace)
        adapter = get_adapter(target)
        return cls(model=target, adapter=adapter, blocks=list(adapter.blocks(target)), params_before=params_before,
                   start=start)

    @property
    def layer_params(self) -> list[int]:
        return [sum(p.numel() for p in b.parameters()) for b in self.blocks]

    def calibration(self) -> contextlib.AbstractContextManager:
        """``loop.capture.calibration_context`` of the model (no grad, no KV cache, eval mode, restored after)."""
        return calibration_context(self.model)

    def capture(self, samples: torch.Tensor, plan: Plan, *, batch_size: int,
                on_event: ProgressCallback | None = None, message: str | None = None) -> BlockInputs:
        """Block 0's inputs for every calibration sample; the time goes to ``plan.timings["capture"]``."""
        t0 = time.perf_counter()
        if message:
            emit(on_event, "capture", 0, 1, message)
        inputs = capture_block_inputs(self.model, self.adapter, samples, batch_size=batch_size)
        plan.timings["capture"] = time.perf_counter() - t0
        return inputs

    def loop(self, inputs: BlockInputs, visit: Callable[[BlockVisit], nn.Module | None], plan: Plan, *,
             timing: str, layers: Iterable[int] | None = None, **loop_settings) -> None:
        """``loop.blocks.block_loop`` over ``layers`` (all blocks by default); the time goes to
        ``plan.timings[timing]``. ``loop_settings``: the loop's keywords (with_stats, propagation, stage, …)."""
        t0 = time.perf_counter()
        block_loop(self.blocks, inputs, range(len(self.blocks)) if layers is None else layers, visit,
                   adapter=self.adapter, **loop_settings)
        plan.timings[timing] = time.perf_counter() - t0

    def finish(self, plan: Plan) -> PruneResult:
        """``registry.finish``: the plan's parameter count checked against the model, the run timed."""
        return finish(self.model, plan, self.params_before, self.start)


@contextlib.contextmanager
def timed(plan: Plan, key: str) -> Iterator[None]:
    """Add the seconds of the ``with`` body to ``plan.timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        plan.timings[key] = plan.timings.get(key, 0.0) + time.perf_counter() - t0

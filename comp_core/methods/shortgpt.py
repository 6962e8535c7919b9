"""ShortGPT (Men et al., 2024): one-shot removal of the blocks with the lowest Block Influence.

BI_l = 1 − mean over calibration tokens of cos(x_l, y_l), block input vs output, measured once on the
unpruned model; the n lowest go (no re-measuring, unlike COMP's iterative order). n is the number of
whole blocks whose parameters come closest to the ratio (``removal.layers_for_ratio``), or ``n_layers``.

``layer_rescale`` (off by default: ShortGPT itself compensates nothing) adds Prune&Comp's magnitude
compensation after the one-shot choice: each removed block's scale, gap by gap in layer order on the pruned
stream (``loop.importance.gap_scales``), folded into the output projections of the kept blocks after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..events import emit
from ..loop.importance import capture_with_importances, gap_scales, layers_for_ratio
from ..models.surgery import check_stream_rescale
from .base import Run, fold_layer_scales, protected_layers, scales_note
from .registry import Method, register_method
from .structured import structured_plan


@dataclass
class ShortGPTSettings:
    """ratio: share of all parameters to remove (rounded to whole blocks); n_layers: remove exactly this many
    instead; protected: blocks never removed (ShortGPT itself protects none); layer_rescale: Prune&Comp's
    magnitude compensation of the removed blocks (not ShortGPT's own)."""

    ratio: float = 0.2
    n_layers: int | None = None
    protected: tuple[int, ...] = ()
    batch_size: int = 8
    layer_rescale: bool = False  # Prune&Comp: rescale the stream where a layer was removed

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.n_layers is not None and self.n_layers < 0:
            raise ValueError("n_layers must be >= 0")
        self.protected = tuple(sorted({int(i) for i in self.protected}))


@register_method("shortgpt", summary="ShortGPT: remove the blocks with the lowest Block Influence, one shot")
class ShortGPT(Method):
    kind = "structured"
    settings_class = ShortGPTSettings
    streams = True

    def prune(self, model, samples, settings, *, on_event=None, inplace=False):
        run = Run.begin(model, inplace)
        target, adapter, blocks, params_before = run.model, run.adapter, run.blocks, run.params_before
        n_layers = len(blocks)
        protected = protected_layers(settings.protected, n_layers)
        candidates = [i for i in range(n_layers) if i not in protected]
        block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
        n_remove = settings.n_layers if settings.n_layers is not None else layers_for_ratio(
            settings.ratio, params_before, block_params, len(candidates))
        if n_remove > len(candidates):
            raise ValueError(f"cannot remove {n_remove} layers: only {len(candidates)} are not protected")
        rescale = settings.layer_rescale and n_remove > 0
        if rescale:
            check_stream_rescale(blocks[0], adapter)
        t0 = time.perf_counter()
        scales: dict[int, float] = {}
        with run.calibration():
            emit(on_event, "capture", 0, 1, f"measuring Block Influence of {n_layers} layers")
            inputs, influence = capture_with_importances(target, adapter, samples, batch_size=settings.batch_size)
            capture_s = time.perf_counter() - t0
            order = sorted(candidates, key=lambda i: influence[i])[:n_remove]
            if rescale:
                emit(on_event, "layer-removal", 0, 1, f"measuring the Prune&Comp scales of layers {sorted(order)}")
                scales = gap_scales(blocks, inputs, order)
        del inputs
        plan = structured_plan(target, settings, method="shortgpt", params_total=params_before,
                               layer_params=block_params, protected=sorted(protected), removed_layers=order,
                               initial_importance=[influence[i] for i in range(n_layers)])
        plan.importance_history = [influence]
        plan.timings = {"capture": capture_s, "layer_removal": time.perf_counter() - t0 - capture_s}
        plan.planned_params_after = params_before - sum(block_params[i] for i in order)
        if scales:
            plan.layer_scales = scales
            fold_layer_scales(blocks, adapter, scales)
            plan.notes.append(scales_note(scales))
        if order:
            adapter.keep_blocks(target, [i for i in range(n_layers) if i not in order])
        emit(on_event, "layer-removal", 1, 1, f"removed {sorted(order)}")
        return target, run.finish(plan)

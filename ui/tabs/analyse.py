"""Tab ①: layer redundancy, removal order, allocation (what-if) and neuron-importance maps.

Analyse runs COMP's public ``analyze`` once, with the removal order measured a few removals deeper
(``removal_depth``); every later move of the ratio, layer and protected controls is an instant
``comp_core.methods.comp.whatif.what_if`` over that plan. The plan is kept so that Prune with unchanged settings can
apply it instead of measuring everything again (``ui.tabs.runs``).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import gradio as gr
import numpy as np

from comp_core import CompConfig, CompPlan, count_parameters
from comp_core.methods.comp import layer_caps
from comp_core.methods.comp.whatif import WhatIf, analyze_nearest, neuron_maps, stale_reasons, what_if

from .. import common, plots, sidebar
from ..session import Session


@dataclass
class Analysis:
    """What the GUI keeps after one analysis: the plan (with its deep removal order), how it was made, and
    the per-dense score maps."""

    plan: CompPlan  # plan.removal: measured to ``depth`` removals (≥ the plan's own)
    cfg: CompConfig
    calib_key: tuple | None
    model_key: str | None
    seconds: float
    plan_ratio: float  # the ratio the plan used (the requested one unless it was unreachable)
    heatmaps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # kind -> (log-scores, pruned)

    @property
    def removal(self):
        return self.plan.removal

    @property
    def depth(self) -> int:
        return len(self.plan.removal.removal_order)

    @property
    def n_layers(self) -> int:
        return self.plan.n_layers

    @property
    def protected(self) -> list[int]:
        return list(self.plan.protected)

    @property
    def kinds(self) -> list[str]:
        return list(self.heatmaps)


def run_analysis(model, samples, cfg: CompConfig, depth: int, on_event=None, *, calib_key=None,
                 model_key=None) -> Analysis:
    """Analyse a private copy of ``model`` (capture hooks must not touch the shared original)."""
    start = time.perf_counter()
    work = copy.deepcopy(model)
    plan, plan_ratio = analyze_nearest(work, samples, cfg, depth, on_event)
    del work
    return Analysis(plan=plan, cfg=cfg, calib_key=calib_key, model_key=model_key,
                    seconds=time.perf_counter() - start, plan_ratio=plan_ratio, heatmaps=neuron_maps(plan))


# ------------------------------------------------------------------------------------------- handlers


def plan_summary(session: Session, plan: WhatIf | None, stale: list[str] | None = None, auto: bool = False) -> str:
    """HTML: the parameter count of the plan now shown, and what the analysis does not cover."""
    if session.analysis is None or plan is None:
        if session.loaded is None:
            return "<span class='cx-muted'>Click <b>Analyse</b> to compute layer importances and the plan.</span>"
        params = count_parameters(session.loaded.model)
        return (f"<span class='cx-muted'>{params / 1e6:.1f} M parameters. Click <b>Analyse</b> to see what COMP "
                "would remove.</span>")
    total = plan.params_total
    lines = []
    if plan.message:
        lines.append(f"<div class='cx-error'>⚠ {plan.message}</div>")
    removed = (f"layer {plan.removed[0]} removed" if len(plan.removed) == 1 else
               f"layers {', '.join(map(str, plan.removed))} removed" if plan.removed else "no layer removed")
    rows = [("original", total, None)]
    if not plan.message:
        rows += [(removed, plan.params_removed_layers, plan.params_removed_layers / total),
                 (f"neurons in {len(plan.layer_ratios)} layers", plan.params_removed_neurons,
                  plan.params_removed_neurons / total),
                 ("after pruning", plan.params_after, -plan.planned_ratio)]

    def cell(name, share):
        if share is None:
            return ""
        return f"{share:+.1%}" if name == "after pruning" else f"{share:.1%}"

    lines.append("<table class='cx-plan'>" + "".join(
        f"<tr><td>{name}</td><td>{value / 1e6:,.2f} M</td><td>{cell(name, share)}</td></tr>"
        for name, value, share in rows) + "</table>")
    if plan.note:
        lines.append(f"<div class='cx-note'>{plan.note}</div>")
    if auto:
        lines.append("<div class='cx-note'>Auto: Prune tries 0…N removed layers (one full prune each) and keeps "
                     "the lowest calibration loss; the bars show the slider's value.</div>")
    if stale:
        lines.append(f"<div class='cx-note'>Changed since the analysis: {', '.join(stale)}. The neuron maps show "
                     "the analysed plan; Prune uses the new settings. Analyse again to refresh them.</div>")
    a = session.analysis
    if a.calib_key and session.calib_key and a.calib_key != session.calib_key:
        lines.append("<div class='cx-note'>The calibration data changed since the analysis.</div>")
    return "\n".join(lines)


def layer_figures(session: Session, plan: WhatIf | None):
    """(redundancy curve, removal history, ratio bars) for the current what-if."""
    a: Analysis | None = session.analysis
    if a is None or plan is None:
        msg = "Click Analyse to compute layer importances."
        figs = (plots.empty_figure(msg, "Layer importance"), plots.empty_figure(msg, "Iterative removal"),
                plots.empty_figure(msg, "Allocated pruning ratio per layer"))
    else:
        removed = plan.removed
        after = plan.importances if removed and not plan.message else None
        curve = plots.redundancy_curve(a.plan.initial_importance, plan.protected, removed,
                                       a.removal.removal_order, after=after)
        history = plots.removal_history(a.removal.history, a.removal.removal_order, a.n_layers,
                                        highlight=plan.n_remove if plan.n_remove <= a.depth else None)
        bars = plots.ratio_bars(a.n_layers, plan.layer_ratios, plan.protected, removed, target=plan.ratio,
                                layer_params=a.plan.layer_params, message=plan.message,
                                title=f"Allocated pruning ratio per layer · target {plan.ratio:.0%}")
        figs = (curve, history, bars)
    session.figures.update(zip(("redundancy_curve", "removal_history", "ratio_bars"), figs))
    return figs


def current_what_if(session: Session, ratio, n_remove, protected, cfg: CompConfig | None = None) -> WhatIf | None:
    """The what-if for the controls; ``cfg`` (the current settings) gives the caps of the ticked denses."""
    a: Analysis | None = session.analysis
    if a is None:
        return None
    caps = None
    if cfg is not None and session.loaded is not None and cfg.dense_kinds != a.cfg.dense_kinds:
        caps = layer_caps(session.loaded.model, cfg)
    protected = sidebar.protected_value(session, protected)
    return what_if(a.plan, float(ratio), int(n_remove), protected, caps)


def detail_layers(session: Session, kind: str) -> list[int]:
    a = session.analysis
    if a is None or kind not in a.heatmaps:
        return []
    scores, _ = a.heatmaps[kind]
    return [i for i in range(scores.shape[0]) if not bool(np.isnan(scores[i]).all())]


def heatmap_figure(session: Session, kind: str, sort: bool = False):
    a: Analysis | None = session.analysis
    if a is None or not kind or kind not in a.heatmaps:
        fig = plots.empty_figure("Analyse to see every neuron's importance.", "Neuron importance", height=360)
    else:
        scores, pruned = a.heatmaps[kind]
        name = next((d.name for d in a.plan.dense_reports if d.kind == kind), kind)
        title = (f"Neuron importance · {name} · {int(pruned.sum()):,} of {int((~np.isnan(scores)).sum()):,}"
                 f" pruned (red) · plan {a.plan_ratio:.0%}, {len(a.plan.removed_layers)} layers removed")
        notes = plots.row_notes(a.plan.removed_layers, a.plan.protected)
        fig = plots.neuron_heatmap(scores, pruned, kind, sort=bool(sort), row_notes=notes, title=title)
    session.figures["neuron_heatmap"] = fig
    return fig


def detail_figure(session: Session, kind: str, layer):
    a: Analysis | None = session.analysis
    layers = detail_layers(session, kind)
    if a is None or layer is None or int(layer) not in layers:
        fig = plots.empty_figure("Choose a layer to see one dense in detail.", "One dense in detail", height=340)
    else:
        layer = int(layer)
        report = a.plan.dense(layer, kind)
        scores, pruned = a.heatmaps[kind]
        title = (f"Layer {layer} · {report.name} · {report.n_removed} of {report.d_in} inputs pruned · "
                 f"fit error {report.error_no_tuning:.3g} → {report.error_tuned:.3g} with {report.compensation}"
                 + (f" (ridge {report.ridge:g}, chosen on held-out sequences)" if report.ridge is not None else ""))
        fig = plots.dense_detail(scores[layer, :report.d_in], pruned[layer, :report.d_in], title)
    session.figures["dense_detail"] = fig
    return fig


def default_detail_layer(session: Session, kind: str):
    layers = detail_layers(session, kind)
    if not layers:
        return None
    a = session.analysis
    return max(layers, key=lambda i: (a.plan.layer_ratios.get(i, 0.0), -i))


def default_kind(kinds: list[str]) -> str | None:
    """The MLP's down projection (OPT's fc2 has the same kind) is the widest, most telling heatmap."""
    if "down" in kinds:
        return "down"
    return kinds[0] if kinds else None


@common.user_errors
def analyse(session: Session, source, calib, calib_file, n_samples, seq_len, seed, ratio, n_remove, auto, protected,
            score, mask_tuning, inputs, dense_kinds, depth, progress=gr.Progress()):
    """Load if needed, analyse, and return every figure of the Analyse tab plus control updates."""
    bridge = common.Bridge(progress, session)
    started = time.perf_counter()
    with common.exclusive(session):
        memory = common.RunMemory()
        common.ensure_model(session, source, bridge)
        # the controls still hold the previous model's (or no) choices, also when Prune loaded this one: use
        # what they will show, so the analysed settings are the ones the page displays afterwards
        fresh_model = not session.controls_filled()
        protected, dense_kinds = sidebar.unfilled_defaults(session, protected, dense_kinds)
        common.ensure_samples(session, calib, calib_file, n_samples, seq_len, seed, bridge)
        cfg = sidebar.method_settings(session, "comp", ratio, n_remove, False, protected, score, mask_tuning, inputs,
                                     dense_kinds, depth)
        bridge.step("Copying the model (the original stays untouched) …", stage="copy")
        analysis = run_analysis(session.loaded.model, session.samples, cfg, int(depth), on_event=bridge,
                                calib_key=session.calib_key, model_key=session.model_key)
        session.analysis = analysis
        stages = bridge.finish()
    seconds = time.perf_counter() - started
    plan = what_if(analysis.plan, cfg.ratio, cfg.remove_layers, cfg.protected)
    curve, history, bars = layer_figures(session, plan)
    kinds = analysis.kinds
    kind = default_kind(kinds)
    layer = default_detail_layer(session, kind)
    heat = heatmap_figure(session, kind)
    detail = detail_figure(session, kind, layer)
    order = " → ".join(str(i) for i in analysis.removal.removal_order) or "—"
    status = (f"<b>Analysed in {seconds:.1f} s</b> <span class='cx-muted'>({common.stage_text(stages)}; "
              f"{memory.text()}{common.placement_note(session)})</span><br>"
              f"Removal order (least important first, measured to {analysis.depth}): {order}")
    if abs(analysis.plan_ratio - cfg.ratio) > 1e-9:
        status += (f"<div class='cx-note'>The target {cfg.ratio:.0%} cannot be reached with these settings; the "
                   f"neuron maps show the nearest reachable plan ({analysis.plan_ratio:.1%}).</div>")
    protected_u, kinds_u, slider_u = sidebar.control_updates(session)
    if not fresh_model:  # keep what the user chose
        protected_u, kinds_u = gr.update(), gr.update()
    session.controls_key = session.model_key
    return (curve, history, bars, heat, detail, plan_summary(session, plan, auto=bool(auto)), status,
            common.model_card(session), protected_u, kinds_u, slider_u,
            gr.update(choices=kinds, value=kind),
            gr.update(choices=[(f"layer {i}", i) for i in detail_layers(session, kind)], value=layer))


@common.user_errors
def update_plan(session: Session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds):
    """Instant what-if: (curve, history, bars, plan summary) for the current controls, no pruning."""
    cfg, stale = None, []
    if session.analysis is not None:
        cfg = sidebar.method_settings(session, "comp", ratio, n_remove, False, protected, score, mask_tuning, inputs,
                                     dense_kinds)
        stale = stale_reasons(session.analysis.cfg, cfg)
    plan = current_what_if(session, ratio, n_remove, protected, cfg)
    curve, history, bars = layer_figures(session, plan)
    return curve, history, bars, plan_summary(session, plan, stale, auto=bool(auto))


@common.user_errors
def update_heatmap(session: Session, kind, sort):
    """(layer × neuron map, detail layer choices, detail) for another dense kind or ordering."""
    layer = default_detail_layer(session, kind)
    return (heatmap_figure(session, kind, sort),
            gr.update(choices=[(f"layer {i}", i) for i in detail_layers(session, kind)], value=layer),
            detail_figure(session, kind, layer))


@common.user_errors
def update_detail(session: Session, kind, layer):
    return detail_figure(session, kind, layer)


# --------------------------------------------------------------------------------------------- layout


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    t.status = gr.HTML("<span class='cx-muted'>Press <b>Analyse</b> (left) to measure the chosen model's "
                       "layers and neurons with COMP. Nothing is pruned until you press <b>Prune</b>.</span>",
                       elem_id="analysis-status", elem_classes=["cx-status"])
    with gr.Row(equal_height=True):
        t.curve = gr.Plot(plots.empty_figure("Click Analyse to compute layer importances.", "Layer importance"),
                          show_label=False, elem_id="plot-curve")
        t.bars = gr.Plot(plots.empty_figure("The allocation appears after Analyse.", "Allocated pruning ratio"),
                         show_label=False, elem_id="plot-bars")
    with gr.Row(equal_height=True):
        t.history = gr.Plot(plots.empty_figure("Removal order appears after Analyse.", "Iterative removal"),
                            show_label=False, elem_id="plot-history")
        with gr.Column():
            gr.HTML("<div class='cx-h3'>Plan</div>")
            t.plan = gr.HTML("<span class='cx-muted'>Click <b>Analyse</b> to compute the plan.</span>",
                             elem_id="plan-summary")
            gr.HTML("<div class='cx-help'>Ratio, layers to remove and protected layers update these plots "
                    "instantly from the analysis. The removed layers are the first <i>n</i> of the measured "
                    "removal order; each remaining layer's ratio is inversely proportional to its importance "
                    "(capped at 90 %), so the whole model loses exactly the target share.</div>")
    gr.HTML("<div class='cx-h3'>Neuron importance</div>")
    with gr.Row():
        t.kind = gr.Dropdown(label="Dense", choices=[], value=None, scale=1, elem_id="heat-kind")
        t.sort = gr.Checkbox(label="Sort neurons by score", value=False, scale=1)
        t.layer = gr.Dropdown(label="Layer in detail", choices=[], value=None, scale=1, elem_id="heat-layer")
    t.heatmap = gr.Plot(plots.empty_figure("Analyse to see every neuron's importance.", "Neuron importance",
                                           height=360), show_label=False, elem_id="plot-heatmap")
    t.detail = gr.Plot(plots.empty_figure("Choose a layer to see one dense in detail.", "One dense in detail",
                                          height=340), show_label=False, elem_id="plot-detail")
    return t


def wire(t: SimpleNamespace, session: gr.State, tabs, c: SimpleNamespace, start, heavy: dict) -> list:
    """Analyse button, instant what-if and the heatmap controls; returns the events Cancel stops."""
    what_if_controls = [c.ratio, c.n_remove, c.auto, c.protected, c.score, c.mask, c.inputs, c.kinds]
    analysed = c.analyse.click(start("analyse"), None, [tabs, c.cancel_note], queue=False).then(
        analyse, [session, *c.data, *c.settings],
        [t.curve, t.history, t.bars, t.heatmap, t.detail, t.plan, t.status, c.card, c.protected, c.kinds,
         c.n_remove, t.kind, t.layer], show_progress_on=[t.status, t.curve, t.bars], **heavy)
    # user edits only (.input): programmatic updates from Analyse must not re-plan with half-updated values
    gr.on([control.input for control in what_if_controls], update_plan, [session, *what_if_controls],
          [t.curve, t.history, t.bars, t.plan], trigger_mode="always_last", show_progress="hidden")
    for control in (t.kind, t.sort):
        control.input(update_heatmap, [session, t.kind, t.sort], [t.heatmap, t.layer, t.detail],
                      show_progress="minimal")
    t.layer.input(update_detail, [session, t.kind, t.layer], t.detail, show_progress="minimal")
    return [analysed]

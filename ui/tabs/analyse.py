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
from comp_core.methods.comp.whatif import (WhatIf, analyze_nearest, measure_deeper, neuron_maps, stale_reasons,
                                          what_if)

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
    # the views need the cuts, not the fitted weights: Prune fits them (so Analyse costs no more than a prune)
    plan, plan_ratio = analyze_nearest(work, samples, cfg, depth, on_event, fit=False)
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
    blocks = session.analysis.plan.block_params
    if not plan.message and blocks:
        gone = plan.params_total - plan.params_after
        lines.append(f"<div class='cx-help'>The plan removes <b>{plan.planned_ratio:.1%} of all parameters</b> "
                     f"({gone / blocks:.1%} of the transformer blocks; the vocabulary table and output head stay). "
                     "Protected layers are never touched.</div>")
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


def similarity_figure(session: Session, plan: WhatIf | None):
    """How similar the hidden state stays from layer l to layer l + n (the analysis's capture measured it), with
    the layers the plan on screen removes marked."""
    a: Analysis | None = session.analysis
    if a is None or a.plan.layer_distance is None:
        fig = plots.empty_figure("Analyse to see how similar the layers' inputs are.", "Layer similarity", height=360)
    else:
        removed = plan.removed if plan is not None and not plan.message else a.plan.removed_layers
        fig = plots.layer_similarity_figure(a.plan.layer_distance, removed, a.n_layers)
    session.figures["layer_similarity"] = fig
    return fig


def current_what_if(session: Session, ratio, n_remove, protected, cfg: CompConfig | None = None,
                    ratio_of: str = "all") -> WhatIf | None:
    """The what-if for the controls; ``cfg`` (the current settings) gives the caps of the ticked denses."""
    a: Analysis | None = session.analysis
    if a is None:
        return None
    caps = None
    if cfg is not None and session.loaded is not None and cfg.dense_kinds != a.cfg.dense_kinds:
        caps = layer_caps(session.loaded.model, cfg)
    protected = sidebar.protected_value(session, protected)
    return what_if(a.plan, sidebar.ratio_of_all(session, ratio, ratio_of), int(n_remove), protected, caps)


def detail_layers(session: Session, kind: str) -> list[int]:
    a = session.analysis
    if a is None or kind not in a.heatmaps:
        return []
    scores, _ = a.heatmaps[kind]
    return [i for i in range(scores.shape[0]) if not bool(np.isnan(scores[i]).all())]


def _removed_text(removed) -> str:
    removed = list(removed)
    if not removed:
        return "no layer removed"
    return f"layer{'s' if len(removed) > 1 else ''} {', '.join(map(str, removed))} removed"


def view_note(session: Session, plan: WhatIf | None) -> str:
    """"" when the neuron maps show the plan on screen; else one plain sentence saying they show the analysed
    plan and what differs (the maps need a new analysis, the layer plots do not)."""
    a: Analysis | None = session.analysis
    if a is None or plan is None or plan.message:
        return ""
    same = (abs(plan.ratio - a.plan_ratio) < 1e-9 and list(plan.removed) == list(a.plan.removed_layers)
            and list(plan.protected) == list(a.plan.protected))
    if same:
        return ""
    return (f"These neurons are the analysed plan's ({a.plan_ratio:.0%}, {_removed_text(a.plan.removed_layers)}). "
            f"The plan above is now {plan.ratio:.0%} with {_removed_text(plan.removed)}: Analyse again to see "
            "its neurons.")


def heatmap_figure(session: Session, kind: str, sort: bool = True, plan: WhatIf | None = None):
    """Every layer's input neurons of one dense kind, red where the analysed plan removes them; rows the current
    what-if removes are labelled, and the title says when the marks are not the plan on screen."""
    a: Analysis | None = session.analysis
    if a is None or not kind or kind not in a.heatmaps:
        fig = plots.empty_figure("Analyse to see every neuron's importance.", "Neuron importance", height=360)
    else:
        scores, pruned = a.heatmaps[kind]
        name = next((d.name for d in a.plan.dense_reports if d.kind == kind), kind)
        stale = view_note(session, plan)
        plan_text = (f"analysed plan {a.plan_ratio:.0%}, {_removed_text(a.plan.removed_layers)}" if stale else
                     f"plan {a.plan_ratio:.0%}, {_removed_text(a.plan.removed_layers)}")
        title = (f"Input neurons of {name} in every layer · red: the {int(pruned.sum()):,} of "
                 f"{int((~np.isnan(scores)).sum()):,} the {plan_text} removes")
        if stale:
            title += "<br><sup>⚠ the plan above differs: Analyse again to see its neurons</sup>"
        removed = plan.removed if plan is not None and not plan.message else a.plan.removed_layers
        protected = plan.protected if plan is not None else a.plan.protected
        notes = plots.row_notes(removed, protected)
        fig = plots.neuron_heatmap(scores, pruned, kind, sort=bool(sort), row_notes=notes, title=title)
    session.figures["neuron_heatmap"] = fig
    return fig


def detail_figure(session: Session, kind: str, layer, plan: WhatIf | None = None):
    """One layer's dense in detail, with a plain note when the plan on screen removes or protects that layer."""
    a: Analysis | None = session.analysis
    layers = detail_layers(session, kind)
    if a is None or layer is None or int(layer) not in layers:
        fig = plots.empty_figure("Choose a layer to see one dense in detail.", "One dense in detail", height=340)
    else:
        layer = int(layer)
        report = a.plan.dense(layer, kind)
        scores, pruned = a.heatmaps[kind]
        title = f"Layer {layer} · {report.name} · {report.n_removed} of {report.d_in} input neurons removed (red)"
        if plan is not None and not plan.message and layer in plan.removed:
            title += f"<br><sup>⚠ the plan above removes layer {layer} whole; this is the analysed plan</sup>"
        elif plan is not None and layer in plan.protected and layer not in a.plan.protected:
            title += f"<br><sup>⚠ layer {layer} is protected in the plan above; this is the analysed plan</sup>"
        elif view_note(session, plan):
            title += "<br><sup>the analysed plan (the plan above differs: Analyse again to see it)</sup>"
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
            score, mask_tuning, inputs, dense_kinds, depth, ratio_of="all", progress=gr.Progress()):
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
                                     dense_kinds, depth, ratio_of=ratio_of)
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
    session.what_if, session.neuron_view_key = plan, None
    heat = heatmap_figure(session, kind, True, plan)
    detail = detail_figure(session, kind, layer, plan)
    order = " → ".join(str(i) for i in analysis.removal.removal_order) or "—"
    least = sorted(range(analysis.n_layers), key=lambda i: analysis.plan.initial_importance[i])
    least = [i for i in least if i not in analysis.plan.protected][:3]
    status = (f"<b>Analysed in {seconds:.0f} s.</b> The layers that change the text's representation least "
              f"(candidates to remove first): {', '.join(map(str, least))}. Nothing is pruned until you press "
              "<b>Prune</b>; moving the ratio, layers or protected layers updates the plan at once."
              + common.details_html([common.stage_text(stages), memory.text() + common.placement_note(session),
                                     f"removal order measured {analysis.depth} deep: {order}",
                                     "the cuts are decided without fitting the kept weights (Prune fits them)"]))
    if abs(analysis.plan_ratio - cfg.ratio) > 1e-9:
        status += (f"<div class='cx-note'>The target {cfg.ratio:.0%} cannot be reached with these settings; the "
                   f"neuron maps show the nearest reachable plan ({analysis.plan_ratio:.1%}).</div>")
    protected_u, kinds_u, slider_u = sidebar.control_updates(session)
    if not fresh_model:  # keep what the user chose
        protected_u, kinds_u = gr.update(), gr.update()
    session.controls_key = session.model_key
    similarity = similarity_figure(session, plan)
    return (curve, history, bars, heat, detail, similarity, plan_summary(session, plan, auto=bool(auto)),
            deeper_button(session, plan),
            status,
            common.model_card(session), protected_u, kinds_u, slider_u,
            gr.update(choices=kinds, value=kind),
            gr.update(choices=[(f"layer {i}", i) for i in detail_layers(session, kind)], value=layer),
            gr.update(value=True))


def needs_deeper(session: Session, plan: WhatIf | None) -> int:
    """How many removed layers the controls ask for beyond the measured removal order (0: none)."""
    a: Analysis | None = session.analysis
    if a is None or plan is None or plan.exact or plan.n_remove <= a.depth:
        return 0
    return plan.n_remove


def deeper_button(session: Session, plan: WhatIf | None):
    """The "measure further" button: shown only while the layer slider is past the measured removal order,
    with an estimate of its cost (one capture forward plus one forward per added removal)."""
    want = needs_deeper(session, plan)
    if not want:
        return gr.update(visible=False)
    a = session.analysis
    per_pass = a.plan.timings.get("capture", 0.0)
    seconds = per_pass * (1 + want - a.depth)
    about = f" (about {seconds:.0f} s)" if seconds >= 1 else ""
    return gr.update(visible=True, value=f"Measure which {want} layers would go{about}")


@common.user_errors
def measure_more(session: Session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds,
                 kind=None, sort=True, layer=None, ratio_of="all", progress=gr.Progress()):
    """Measure the removal order as deep as the layer slider asks (what-if material, only when asked for)."""
    a: Analysis | None = session.analysis
    if a is None or session.loaded is None:
        raise common.fail("Analyse first.", "Nothing to measure")
    bridge = common.Bridge(progress, session)
    with common.exclusive(session):
        bridge.step("Copying the model (the original stays untouched) …", stage="copy")
        work = copy.deepcopy(session.loaded.model)
        a.plan = measure_deeper(work, session.samples, a.plan, int(n_remove), on_event=bridge)
        del work
        bridge.finish()
    return update_plan(session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds, kind, sort,
                       layer, ratio_of)


@common.user_errors
def update_plan(session: Session, ratio, n_remove, auto, protected, score, mask_tuning, inputs, dense_kinds,
                kind=None, sort=True, layer=None, ratio_of="all"):
    """Instant what-if: (curve, history, bars, plan summary) for the current controls, no pruning."""
    cfg, stale = None, []
    if session.analysis is not None:
        cfg = sidebar.method_settings(session, "comp", ratio, n_remove, False, protected, score, mask_tuning, inputs,
                                     dense_kinds, ratio_of=ratio_of)
        stale = stale_reasons(session.analysis.cfg, cfg)
    plan = current_what_if(session, ratio, n_remove, protected, cfg, ratio_of)
    curve, history, bars = layer_figures(session, plan)
    maps = neuron_views(session, plan, kind, sort, layer)
    return (curve, history, bars, plan_summary(session, plan, stale, auto=bool(auto)), deeper_button(session, plan),
            *maps, similarity_figure(session, plan))


def neuron_views(session: Session, plan: WhatIf | None, kind, sort, layer) -> tuple:
    """(heatmap, detail) for the what-if now shown, or no update when what they say has not changed (the map is
    the largest figure on the page: it is sent again only when its labels or note change)."""
    key = (kind, bool(sort), layer, view_note(session, plan), tuple(plan.removed) if plan else (),
           tuple(plan.protected) if plan else ())
    previous, session.what_if = session.what_if, plan
    if session.neuron_view_key == key and previous is not None:
        return gr.update(), gr.update()
    session.neuron_view_key = key
    return heatmap_figure(session, kind, sort, plan), detail_figure(session, kind, layer, plan)


@common.user_errors
def update_heatmap(session: Session, kind, sort):
    """(layer × neuron map, detail layer choices, detail) for another dense kind or ordering."""
    layer = default_detail_layer(session, kind)
    return (heatmap_figure(session, kind, sort, session.what_if),
            gr.update(choices=[(f"layer {i}", i) for i in detail_layers(session, kind)], value=layer),
            detail_figure(session, kind, layer, session.what_if))


@common.user_errors
def update_detail(session: Session, kind, layer):
    return detail_figure(session, kind, layer, session.what_if)


# --------------------------------------------------------------------------------------------- layout


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    t.status = gr.HTML("<span class='cx-muted'>Press <b>Analyse</b> (left) to measure the chosen model's "
                       "layers and neurons with COMP. Nothing is pruned until you press <b>Prune</b>.</span>",
                       elem_id="analysis-status", elem_classes=["cx-status"])
    gr.HTML("<div class='cx-explain'><b>Importance</b> of a layer: how much it changes the hidden state (the "
            "text's representation) that passes through it, 1 − cosine of its input and output. Low: it barely "
            "changes it — a candidate to remove, or to prune more. <b>Protected</b> layers are never touched.</div>",
            elem_id="analyse-explain")
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
            t.deeper = gr.Button("Measure", visible=False, size="sm", elem_id="btn-deeper")
            gr.HTML("<div class='cx-help'>Ratio, layers to remove and protected layers update these plots "
                    "instantly from the analysis. The removed layers are the first <i>n</i> of the measured "
                    "removal order; each remaining layer's ratio is inversely proportional to its importance "
                    "(capped at 90 %), so the whole model loses exactly the target share.</div>")
    t.similarity = gr.Plot(plots.empty_figure("Analyse to see how similar the layers' inputs are.",
                                              "Layer similarity", height=360), show_label=False,
                           elem_id="plot-similarity")
    gr.HTML("<div class='cx-explain'>Each cell compares the hidden state entering layer <i>l</i> with the one "
            "entering layer <i>l + n</i>: dark = they barely differ, so the <i>n</i> layers in between change "
            "little — the picture people use to choose layers to drop. × marks the layers the plan removes.</div>")
    gr.HTML("<div class='cx-h3'>Neuron importance</div>")
    with gr.Row():
        t.kind = gr.Dropdown(label="Weight matrix (dense)", choices=[], value=None, scale=1, elem_id="heat-kind",
                             info="down: the MLP's output projection · o: attention's output")
        t.sort = gr.Checkbox(label="Sort each layer's neurons by score", value=True, scale=1,
                             info="least important on the left, where the removed ones gather")
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
        analyse, [session, *c.data, *c.settings, c.ratio_of],
        [t.curve, t.history, t.bars, t.heatmap, t.detail, t.similarity, t.plan, t.deeper, t.status, c.card, c.protected,
         c.kinds,
         c.n_remove, t.kind, t.layer, t.sort], show_progress_on=[t.status, t.curve, t.bars], **heavy)
    # user edits only (.input): programmatic updates from Analyse must not re-plan with half-updated values
    plan_outputs = [t.curve, t.history, t.bars, t.plan, t.deeper, t.heatmap, t.detail, t.similarity]
    plan_inputs = [session, *what_if_controls, t.kind, t.sort, t.layer, c.ratio_of]
    gr.on([control.input for control in [*what_if_controls, c.ratio_of]], update_plan, plan_inputs, plan_outputs,
          trigger_mode="always_last", show_progress="hidden")
    # typed protected layers: entries that are not layers of this model are named and dropped (a typed value
    # arrives as a change, not an input, in Gradio's multiselect)
    c.protected.change(sidebar.check_protected, [session, c.protected], [c.protected, c.protected_note], queue=False)
    deeper = t.deeper.click(start(), None, c.cancel_note, queue=False).then(
        measure_more, plan_inputs, plan_outputs, show_progress_on=[t.plan], **heavy)
    for control in (t.kind, t.sort):
        control.input(update_heatmap, [session, t.kind, t.sort], [t.heatmap, t.layer, t.detail],
                      show_progress="minimal")
    t.layer.input(update_detail, [session, t.kind, t.layer], t.detail, show_progress="minimal")
    return [analysed, deeper]

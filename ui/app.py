"""The GUI: ``build_app()`` lays out the sidebar and the tabs and wires every event. No side effects at import.

Start it with ``python launch.py`` (or ``demo.launch(**launch_kwargs())``); the theme and CSS are launch()
arguments in Gradio 6.
"""
from __future__ import annotations

import gradio as gr

from comp_core.scoring import SCORES

from . import handlers as h
from .session import Session
from .tabs import analyse as analyse_tab
from .tabs import export as export_tab
from .tabs import runs as runs_tab
from .tabs import try_it as try_tab
from .theme import make_theme, read_css

TITLE = "COMP Explorer"
HEADER = f"""
<div class="cx-header">
  <div class="cx-title">{TITLE} <span class="cx-sub">post-training structured pruning for LLMs</span></div>
  <div class="cx-intro">
    <b>COMP</b> shrinks a trained model without retraining, at two granularities: it <b>removes whole
    layers</b> whose output barely differs from their input (I = 1 − cos(input, output), re-measured after
    each removal), then <b>removes input neurons</b> of the remaining linear layers — more where a layer
    matters less — and re-tunes a per-neuron mask by least squares so each layer's output stays close to
    the original. <span class="cx-steps">① Analyse → ② adjust the plan → ③ Prune → ④ Evaluate, try,
    export</span>
  </div>
</div>
"""
SCORE_LABELS = {"diag": "diag — ‖W_j‖²·‖X_j‖² (default)", "obs": "obs — error after re-tuning",
                "cond": "cond — condition-number sensitivity", "fisher": "fisher — loss Fisher information",
                "magnitude": "magnitude — weights only", "activation": "activation — inputs only"}
# events that run the model: two at a time per process (the CPU is shared anyway)
HEAVY = {"concurrency_id": "heavy", "concurrency_limit": 2}


def launch_kwargs() -> dict:
    """Theme and CSS for ``Blocks.launch`` (Gradio 6 takes them there, not in ``Blocks``)."""
    return {"theme": make_theme(), "css": read_css()}


def _sidebar(default_source: str, default_calib: str):
    c = type("Controls", (), {})()
    gr.HTML("<div class='cx-h3'>Model</div>")
    c.source = gr.Textbox(value=default_source, label="Model", show_label=False, elem_id="model-source",
                          placeholder="bundled · HF id · model folder · file.gguf",
                          info="bundled (SmolLM2-135M), a Hugging Face id, a local folder or a .gguf file")
    with gr.Row():
        c.calib = gr.Dropdown(h.CALIB_CHOICES, value=default_calib, label="Calibration data", scale=3,
                              elem_id="calib-name")
    c.calib_file = gr.Textbox(label="Calibration file", placeholder="/path/to/text.txt or .jsonl(.gz)",
                              visible=default_calib == "file", elem_id="calib-file")
    with gr.Row():
        c.n_samples = gr.Number(value=10, label="Samples", precision=0, minimum=1, maximum=1024, min_width=70)
        c.seq_len = gr.Number(value=128, label="Tokens", precision=0, minimum=8, maximum=8192, min_width=70)
        c.seed = gr.Number(value=0, label="Seed", precision=0, min_width=60)
    c.load = gr.Button("Load", size="sm", elem_id="btn-load")
    c.card = gr.HTML(h.model_card(Session()), elem_id="model-card")

    gr.HTML("<div class='cx-h3'>Plan</div>")
    c.ratio = gr.Slider(0.0, 0.8, value=0.2, step=0.01, label="Target ratio",
                        info="share of all parameters to remove", elem_id="ratio")
    with gr.Row(equal_height=True):
        c.n_remove = gr.Slider(0, h.MAX_REMOVE, value=h.DEFAULT_REMOVE, step=1, label="Layers to remove", scale=3,
                               elem_id="n-remove")
        c.auto = gr.Checkbox(label="auto", value=False, scale=1, min_width=60,
                             info="sweep, keep the best")
    c.protected = gr.Dropdown([], value=[], multiselect=True, label="Protected layers",
                              info="never removed or pruned (default: first two and last)", elem_id="protected")
    c.score = gr.Dropdown([(SCORE_LABELS.get(k, k), k) for k in SCORES], value="diag", label="Neuron importance score")
    c.mask = gr.Checkbox(label="Mask tuning (least-squares compensation)", value=True)
    with gr.Accordion("Advanced", open=False):
        c.inputs = gr.Radio([("identical (paper)", "identical"), ("accumulated", "accumulated")], value="identical",
                            label="Calibration inputs of each layer")
        c.kinds = gr.CheckboxGroup([], value=[], label="Denses that may lose neurons")
        c.depth = gr.Slider(1, h.MAX_REMOVE, value=h.DEFAULT_DEPTH, step=1,
                            label="Removal order measured to (layers)",
                            info="deeper = the layer slider moves further without re-analysing, but Analyse is slower")
    with gr.Column(elem_classes=["cx-actions"], elem_id="actions"):
        with gr.Row():
            c.analyse = gr.Button("Analyse", variant="primary", elem_id="btn-analyse", min_width=80)
            c.prune = gr.Button("Prune", variant="primary", elem_id="btn-prune", min_width=80)
            c.cancel = gr.Button("Cancel", variant="stop", elem_id="btn-cancel", min_width=70)
        c.cancel_note = gr.HTML("", elem_id="cancel-note")
    return c


def build_app(default_source: str = "bundled", default_calib: str = "c4", export_folder: str = "runs/pruned"
              ) -> gr.Blocks:
    """The whole app. ``default_source`` is preselected (``launch.py --model``)."""
    with gr.Blocks(title=f"{TITLE} · structured pruning for LLMs", fill_width=True) as demo:
        session = gr.State(Session.new, delete_callback=Session.close)
        gr.HTML(HEADER)
        with gr.Sidebar(width=330, open=True, elem_id="sidebar"):
            c = _sidebar(default_source, default_calib)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("① Analyse", id="analyse", elem_id="tab-analyse"):
                a = analyse_tab.build()
            with gr.Tab("② Prune & evaluate", id="runs", elem_id="tab-runs"):
                r = runs_tab.build()
            with gr.Tab("③ Try it", id="try", elem_id="tab-try"):
                t = try_tab.build()
            with gr.Tab("④ Export", id="export", elem_id="tab-export"):
                e = export_tab.build(export_folder)
        _wire(session, tabs, c, a, r, t, e)
    demo.queue(default_concurrency_limit=None)
    return demo


def _wire(session, tabs, c, a, r, t, e) -> None:
    data = [c.source, c.calib, c.calib_file, c.n_samples, c.seq_len, c.seed]
    settings = [c.ratio, c.n_remove, c.auto, c.protected, c.score, c.mask, c.inputs, c.kinds, c.depth]
    what_if = [c.ratio, c.n_remove, c.auto, c.protected, c.score, c.mask, c.inputs, c.kinds]

    def start(tab: str | None = None):
        """First, instant step of a heavy event: clear the cancel note (and show the tab the results go to)."""
        if tab is None:
            return lambda: ""
        return lambda: (gr.Tabs(selected=tab), "")

    c.calib.change(lambda v: gr.update(visible=v == "file"), c.calib, c.calib_file, queue=False)
    c.load.click(h.load, [session, *data], [c.card, c.protected, c.kinds, c.n_remove], **HEAVY)

    analysed = c.analyse.click(start("analyse"), None, [tabs, c.cancel_note], queue=False).then(
        h.analyse, [session, *data, *settings],
        [a.curve, a.history, a.bars, a.heatmap, a.detail, a.plan, a.status, c.card, c.protected, c.kinds,
         c.n_remove, a.kind, a.layer], show_progress_on=[a.status, a.curve, a.bars], **HEAVY)

    # user edits only (.input): programmatic updates from Analyse must not re-plan with half-updated values
    gr.on([control.input for control in what_if], h.update_plan, [session, *what_if],
          [a.curve, a.history, a.bars, a.plan], trigger_mode="always_last", show_progress="hidden")
    for control in (a.kind, a.sort):
        control.input(h.update_heatmap, [session, a.kind, a.sort], [a.heatmap, a.layer, a.detail],
                      show_progress="minimal")
    a.layer.input(h.update_detail, [session, a.kind, a.layer], a.detail, show_progress="minimal")

    pruned = c.prune.click(start("runs"), None, [tabs, c.cancel_note], queue=False).then(
        h.run_prune, [session, *data, *settings], [r.prune_status, r.table, r.plot, c.card],
        show_progress_on=[r.prune_status], **HEAVY)
    evaluated = r.evaluate.click(start(), None, c.cancel_note, queue=False).then(
        h.run_evaluate, [session, r.datasets, r.mode, r.speed], [r.eval_status, r.table, r.plot],
        show_progress_on=[r.eval_status], **HEAVY)
    generate_inputs = [session, t.prompt, t.max_new, t.chat]
    generated = t.generate.click(start(), None, c.cancel_note, queue=False).then(
        h.run_generate, generate_inputs, [t.original, t.pruned], **HEAVY)
    submitted = t.prompt.submit(h.run_generate, generate_inputs, [t.original, t.pruned], **HEAVY)

    e.save.click(h.save_model, [session, e.folder, e.overwrite], [e.save_status, r.table], **HEAVY)
    e.prepare.click(h.make_downloads, [session, e.what, e.scores], [e.files, e.download_status],
                    show_progress_on=[e.download_status])

    c.cancel.click(h.request_cancel, session, c.cancel_note, queue=False,
                   cancels=[analysed, pruned, evaluated, generated, submitted])

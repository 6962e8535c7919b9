"""Tab 4: save the pruned model (core export) and download the plan, report, runs and figures."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..handlers import export_available


def build(default_folder: str = "runs/pruned") -> SimpleNamespace:
    t = SimpleNamespace()
    available = export_available()
    with gr.Group(visible=available):
        gr.HTML("<div class='cx-h3'>Save the pruned model</div><div class='cx-help'>A physically smaller "
                "safetensors folder with its tokenizer and <code>comp_report.json</code>; reload it with "
                "<code>comp_core.export.load_pruned(folder)</code>.</div>")
        with gr.Row(equal_height=True):
            t.folder = gr.Textbox(label="Folder", value=default_folder, scale=4, elem_id="export-folder")
            t.overwrite = gr.Checkbox(label="Replace if it exists", value=False, scale=1)
            t.save = gr.Button("Save model", variant="primary", scale=1, elem_id="btn-save")
        t.save_status = gr.HTML("")
    if not available:
        gr.HTML("<div class='cx-note'>Saving models needs <code>comp_core.export</code>, which this install "
                "does not have; downloads below still work.</div>")
    gr.HTML("<div class='cx-h3'>Downloads</div>")
    with gr.Row(equal_height=True):
        t.what = gr.CheckboxGroup([("Plan (JSON)", "plan"), ("Pruning report (JSON)", "report"),
                                   ("Runs table (CSV)", "runs"), ("Figures (interactive HTML)", "figures"),
                                   ("Figures (PNG)", "png")],
                                  value=["plan", "report", "runs", "figures"], label="Include", scale=4)
        t.scores = gr.Checkbox(label="Neuron scores in JSON", value=False, scale=1,
                               info="every dense's per-neuron scores (a few MB)")
        t.prepare = gr.Button("Prepare files", scale=1, elem_id="btn-prepare")
    t.download_status = gr.HTML("")
    t.files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="download-files")
    return t

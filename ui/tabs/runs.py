"""Tab 2: the latest prune, evaluation of original vs pruned, and the session's table of runs."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import plots
from ..handlers import EVAL_LABELS, EVAL_SETS, QUICK_WINDOWS, RESULT_COLUMNS, speed_available


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    t.prune_status = gr.HTML("<span class='cx-muted'>Press <b>Prune</b> (left) to prune a copy of the model with "
                             "the current plan. The original stays loaded and untouched, so every run starts "
                             "from it.</span>", elem_id="prune-status", elem_classes=["cx-status"])
    with gr.Row(equal_height=True):
        t.datasets = gr.CheckboxGroup([(EVAL_LABELS[d], d) for d in EVAL_SETS], value=["wikitext2"],
                                      label="Perplexity on", scale=2)
        t.mode = gr.Radio([(f"Quick ({QUICK_WINDOWS} windows)", "quick"), ("Full test set", "full")],
                          value="quick", label="Evaluation", scale=2,
                          info=f"quick = first {QUICK_WINDOWS} windows of 512 tokens; full is slow on a CPU")
        t.speed = gr.Checkbox(label="Generation speed", value=True, visible=speed_available(), scale=1)
        t.evaluate = gr.Button("Evaluate", variant="primary", scale=1, elem_id="btn-evaluate")
    t.eval_status = gr.HTML("", elem_id="eval-status")
    t.table = gr.Dataframe(headers=[c for c in RESULT_COLUMNS if c != "tokens/s" or speed_available()],
                           value=None, interactive=False, wrap=False, label="Runs of this session",
                           elem_id="results-table", max_height=260)
    t.plot = gr.Plot(plots.empty_figure("Evaluate a run to see perplexity against the realised ratio.",
                                        "Perplexity vs realised ratio"), show_label=False, elem_id="plot-ppl")
    return t

"""Tab 1: layer redundancy, removal order, allocation (what-if) and neuron-importance maps."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from .. import plots


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    t.status = gr.HTML("<span class='cx-muted'>Press <b>Analyse</b> (left) to measure the chosen model's "
                       "layers and neurons. Nothing is pruned until you press <b>Prune</b>.</span>",
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

"""The GUI: ``build_app()`` lays out the sidebar and the tabs and lets each tab wire its own events. No side
effects at import.

Start it with ``python launch.py`` (or ``demo.launch(**launch_kwargs())``); the theme and CSS are launch()
arguments in Gradio 6.
"""
from __future__ import annotations

import gradio as gr

from . import common, sidebar
from .session import Session
from .tabs import analyse as analyse_tab
from .tabs import compare as compare_tab
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
    export · ⑤ compare methods</span>
  </div>
</div>
"""
# events that run the model: two at a time per process (the CPU is shared anyway)
HEAVY = {"concurrency_id": "heavy", "concurrency_limit": 2}


def launch_kwargs() -> dict:
    """Theme and CSS for ``Blocks.launch`` (Gradio 6 takes them there, not in ``Blocks``)."""
    return {"theme": make_theme(), "css": read_css()}


def start(tab: str | None = None):
    """A heavy event's first, instant step: clear the cancel note (and show the tab the results go to)."""
    if tab is None:
        return lambda: ""
    return lambda: (gr.Tabs(selected=tab), "")


def build_app(default_source: str = "bundled", default_calib: str = "c4", export_folder: str | None = None
              ) -> gr.Blocks:
    """The whole app. ``default_source`` is preselected (``launch.py --model``); ``export_folder``: where the
    Export tab saves by default (``~/comp-explorer/pruned`` when None)."""
    with gr.Blocks(title=f"{TITLE} · structured pruning for LLMs", fill_width=True) as demo:
        session = gr.State(Session.new, delete_callback=Session.close)
        gr.HTML(HEADER)
        with gr.Sidebar(width=330, open=True, elem_id="sidebar"):
            c = sidebar.build(default_source, default_calib)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("① Analyse", id="analyse", elem_id="tab-analyse"):
                a = analyse_tab.build()
            with gr.Tab("② Prune & evaluate", id="runs", elem_id="tab-runs"):
                r = runs_tab.build()
            with gr.Tab("③ Try it", id="try", elem_id="tab-try"):
                t = try_tab.build()
            with gr.Tab("④ Export", id="export", elem_id="tab-export"):
                e = export_tab.build(export_folder)
            with gr.Tab("⑤ Compare methods", id="compare", elem_id="tab-compare"):
                m = compare_tab.build()
        sidebar.wire(c, session, HEAVY)
        stoppable = (analyse_tab.wire(a, session, tabs, c, start, HEAVY)
                     + runs_tab.wire(r, session, tabs, c, start, HEAVY)
                     + try_tab.wire(t, session, c, start, HEAVY)
                     + export_tab.wire(e, session, r.table, HEAVY)
                     + compare_tab.wire(m, session, c, HEAVY))
        # the comparison stops cooperatively through the same flag (its worker thread must finish its step)
        c.cancel.click(common.request_cancel, session, c.cancel_note, queue=False, cancels=stoppable).then(
            common.cancel_finished, session, c.cancel_note)
    demo.queue(default_concurrency_limit=None)
    return demo

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
  <div class="cx-title">{TITLE} <span class="cx-sub">make a trained language model smaller, and see what it costs</span></div>
  <div class="cx-intro">
    Pruning removes parts of a trained model without retraining it, so it needs less memory and runs faster.
    <b>COMP</b> measures how much every layer changes what flows through it, removes the input neurons that
    matter least — more in layers that matter less, whole layers when the target asks for it — and adjusts
    the weights that stay so each layer's output stays close to the original. Every view shows why it cut what
    it cut. <span class="cx-steps">① Analyse → ② Prune &amp; evaluate → ③ Try it → ④ Export · ⑤ Compare methods</span>
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
        sidebar.build_actions(c)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("① Analyse", id="analyse", elem_id="tab-analyse"):
                a = analyse_tab.build()
            with gr.Tab("② Prune & evaluate", id="runs", elem_id="tab-runs"):
                r = runs_tab.build(export_folder)
            with gr.Tab("③ Try it", id="try", elem_id="tab-try"):
                t = try_tab.build()
            with gr.Tab("④ Export", id="export", elem_id="tab-export"):
                e = export_tab.build(export_folder)
            with gr.Tab("⑤ Compare methods", id="compare", elem_id="tab-compare"):
                m = compare_tab.build()
        sidebar.wire(c, session, HEAVY)
        stoppable = (analyse_tab.wire(a, session, tabs, c, start, HEAVY)
                     + runs_tab.wire(r, session, tabs, c, start, HEAVY)
                     + try_tab.wire(t, session, c, start, HEAVY, r.card)
                     + export_tab.wire(e, session, r.table, HEAVY)
                     + compare_tab.wire(m, session, c, HEAVY))
        # the comparison stops cooperatively through the same flag (its worker thread must finish its step)
        c.cancel.click(common.request_cancel, session, c.cancel_note, queue=False, cancels=stoppable).then(
            common.cancel_finished, session, c.cancel_note)
    demo.queue(default_concurrency_limit=None)
    return demo

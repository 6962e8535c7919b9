"""comp-explorer's Gradio GUI: ``build_app()`` returns the Blocks; ``launch.py`` starts it.

Modules: ``app`` (composes the sidebar and the tabs), ``sidebar`` (model, calibration, method and its
settings), ``tabs/`` (one tab each: layout, handlers, wiring), ``common`` (errors, progress, loading — the
shared plumbing), ``plots`` (pure data -> plotly figures), ``session`` (per-process model cache, per-tab
state), ``theme`` (colours, theme, CSS), ``report`` (the summary card and the one-page HTML report),
``reproduce`` (the command lines that redo a run). No pruning math: that is ``comp_core`` (``comp_core.methods.comp.whatif`` for
the instant re-planning).
"""

"""comp-explorer's Gradio GUI: ``build_app()`` returns the Blocks; ``launch.py`` starts it.

Modules: ``app`` (layout + event wiring), ``tabs/`` (one tab each), ``handlers`` (event functions over a
per-tab ``Session``), ``plots`` (pure data -> plotly figures), ``whatif`` (instant re-planning from one
analysis), ``session`` (per-process model cache, per-tab state), ``theme`` (colours, theme, CSS).
"""

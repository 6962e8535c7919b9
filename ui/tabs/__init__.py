"""One module per tab; each ``build()`` lays out its components inside the current Blocks context and returns
them in a namespace. Events are wired in :mod:`ui.app`, where the sidebar's controls are known."""

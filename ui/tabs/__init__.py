"""One module per tab: its layout (``build()``, components in a namespace), its handlers, and ``wire()``, which
connects them to the shared session and the sidebar's controls. :mod:`ui.app` only composes the tabs."""

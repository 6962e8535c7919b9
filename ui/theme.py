"""One look for the app and its figures: colours shared by the Gradio theme, the CSS and every plot."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CSS_PATH = ASSETS / "style.css"

COLORS = {
    "primary": "#4f46e5",  # indigo 600: prunable layers, main lines
    "primary_light": "#a5b4fc",
    "removed": "#e11d48",  # rose 600: removed layers / pruned neurons
    "protected": "#94a3b8",  # slate 400
    "accent": "#f59e0b",  # amber 500: the target / the current choice
    "ink": "#1e293b",
    "muted": "#64748b",
    "grid": "#e2e8f0",
    "paper": "#ffffff",
}
# one colour per evaluation set, also used for the before/after table
DATASET_COLORS = {"wikitext2": "#4f46e5", "ptb": "#0d9488", "c4": "#d97706", "sample": "#db2777"}
# one colour per pruning method in the Compare tab (by registry order; COMP first in the theme's indigo)
METHOD_COLORS = ["#4f46e5", "#0d9488", "#d97706", "#db2777", "#65a30d", "#0284c7", "#7c3aed", "#b45309",
                 "#475569", "#dc2626", "#0891b2", "#a21caf", "#15803d", "#ea580c"]
HEATMAP_SCALE = "Viridis"
FONT = "Inter, ui-sans-serif, system-ui, -apple-system, 'Segoe UI', sans-serif"


def read_css() -> str:
    """The app's stylesheet (empty if the assets folder is missing, e.g. in a wheel without data files)."""
    try:
        return CSS_PATH.read_text(encoding="utf-8")
    except OSError:
        return ""


def make_theme():
    """The Gradio theme; imported lazily so plots can be built without gradio."""
    import gradio as gr

    return gr.themes.Soft(
        primary_hue=gr.themes.colors.indigo,
        secondary_hue=gr.themes.colors.rose,
        neutral_hue=gr.themes.colors.slate,
        # system fonts only: the app must look right offline (no Google Fonts download)
        font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
        radius_size=gr.themes.sizes.radius_md,
        spacing_size=gr.themes.sizes.spacing_sm,
        text_size=gr.themes.sizes.text_sm,
    ).set(
        body_background_fill="#f8fafc",
        block_title_text_weight="600",
        block_title_background_fill="none",
        block_title_padding="0",
        block_title_text_color="*neutral_700",
        block_label_background_fill="none",
        button_primary_background_fill="*primary_600",
        button_primary_background_fill_hover="*primary_700",
    )

"""Tab 3: one prompt, the original's and the pruned model's answers side by side."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    with gr.Row(equal_height=True):
        t.prompt = gr.Textbox(label="Prompt", value="Explain in two sentences why the sky is blue.", lines=2,
                              scale=4, elem_id="prompt")
        with gr.Column(scale=1, min_width=200):
            t.max_new = gr.Slider(8, 256, value=48, step=8, label="New tokens")
            t.chat = gr.Checkbox(label="Chat template", value=True,
                                 info="wrap the prompt as a user turn when the tokenizer has a template")
    t.generate = gr.Button("Generate with both", variant="primary", elem_id="btn-generate")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.HTML("<div class='cx-h3'>Original</div>")
            t.original = gr.HTML("<span class='cx-muted'>—</span>", elem_id="gen-original")
        with gr.Column():
            gr.HTML("<div class='cx-h3'>Pruned</div>")
            t.pruned = gr.HTML("<span class='cx-muted'>—</span>", elem_id="gen-pruned")
    return t

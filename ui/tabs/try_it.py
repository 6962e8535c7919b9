"""Tab ③: one prompt, the original's and the pruned model's answers side by side."""
from __future__ import annotations

import html
import time
from types import SimpleNamespace

import gradio as gr
import torch

from .. import common
from ..session import Session


def _encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt")
        ids = encoded["input_ids"] if not isinstance(encoded, torch.Tensor) else encoded
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool = True) -> tuple[str, float]:
    """Greedy continuation of ``prompt`` and its speed (new tokens / s)."""
    ids = _encode_prompt(tokenizer, prompt, chat).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_new_tokens),
                             do_sample=False, repetition_penalty=1.1, pad_token_id=pad)
    seconds = time.perf_counter() - started
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new.numel() / max(seconds, 1e-9)


def gen_card(text: str, speed: float, run: str | None = None) -> str:
    body = html.escape(text) or "<i>(empty)</i>"
    tag = f"{run} · " if run else ""
    return f"<div class='cx-gen'>{body}</div><div class='cx-muted'>{tag}{speed:.1f} tokens/s</div>"


@common.user_errors
def run_generate(session: Session, prompt, max_new_tokens, chat):
    """Generator: (original text, pruned text), the original first."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise common.fail("Type a prompt first.", "Nothing to generate")
    if session.loaded is None:
        raise common.fail("Load a model first (Analyse or Prune loads it).", "No model")
    tokenizer = session.loaded.tokenizer
    pending = "<span class='cx-muted'>generating…</span>"
    none = "<span class='cx-muted'>Prune a model to compare.</span>"
    yield pending, pending if session.pruned is not None else none
    text, speed = generate_text(session.loaded.model, tokenizer, prompt, max_new_tokens, chat)
    left = gen_card(text, speed)
    yield left, pending if session.pruned is not None else none
    if session.pruned is not None:
        text, speed = generate_text(session.pruned, tokenizer, prompt, max_new_tokens, chat)
        yield left, gen_card(text, speed, session.pruned_run)


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


def wire(t: SimpleNamespace, session: gr.State, c: SimpleNamespace, start, heavy: dict) -> list:
    """Generate (button or Enter); returns the events Cancel stops."""
    inputs = [session, t.prompt, t.max_new, t.chat]
    generated = t.generate.click(start(), None, c.cancel_note, queue=False).then(
        run_generate, inputs, [t.original, t.pruned], **heavy)
    submitted = t.prompt.submit(run_generate, inputs, [t.original, t.pruned], **heavy)
    return [generated, submitted]

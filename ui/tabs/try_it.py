"""Tab ③: one prompt, the original's and the pruned model's answers side by side."""
from __future__ import annotations

import html
import time
from types import SimpleNamespace

import gradio as gr
import torch

from comp_core import count_parameters

from .. import common, report
from ..session import Session
from . import runs


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


def heading(session: Session, which: str) -> str:
    """"Original · 134.5 M parameters · 538 MB" (or the pruned run's), so the two answers say what made them."""
    if which == "original":
        model = session.loaded.model if session.loaded is not None else None
        name = "Original"
    else:
        model = session.pruned
        name = f"Pruned · {session.pruned_run}" if session.pruned_run else "Pruned"
    if model is None:
        return f"<div class='cx-h3'>{name}</div>"
    return (f"<div class='cx-h3'>{name}</div><div class='cx-muted'>{count_parameters(model) / 1e6:,.1f} M "
            f"parameters · {common.weights_mb(model):,.0f} MB of weights</div>")


def answers_html(original_head: str, original: str, pruned_head: str, pruned: str) -> str:
    """Both answers in one two-column grid, so their headings and boxes always line up."""
    return ("<div class='cx-answer-grid'>"
            f"<div id='gen-original-head'>{original_head}</div><div id='gen-pruned-head'>{pruned_head}</div>"
            f"<div id='gen-original'>{original}</div><div id='gen-pruned'>{pruned}</div></div>")


@common.user_errors
def run_generate(session: Session, prompt, max_new_tokens, chat):
    """Generator: (both answers, summary card), the original's first. The pair is kept for the summary card and
    the report."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise common.fail("Type a prompt first.", "Nothing to generate")
    if session.loaded is None:
        raise common.fail("Load a model first (Analyse or Prune loads it).", "No model")
    tokenizer = session.loaded.tokenizer
    pending = "<div class='cx-gen cx-muted'>generating…</div>"
    none = "<div class='cx-gen cx-muted'>Prune a model to compare.</div>"
    heads = heading(session, "original"), heading(session, "pruned")
    right = pending if session.pruned is not None else none
    yield answers_html(heads[0], pending, heads[1], right), gr.update()
    text, speed = generate_text(session.loaded.model, tokenizer, prompt, max_new_tokens, chat)
    left = gen_card(text, speed)
    yield answers_html(heads[0], left, heads[1], right), gr.update()
    if session.pruned is None:
        return
    pruned_text, pruned_speed = generate_text(session.pruned, tokenizer, prompt, max_new_tokens, chat)
    session.answers[session.pruned_run] = report.Answers(prompt=prompt, before=text, after=pruned_text)
    yield (answers_html(heads[0], left, heads[1], gen_card(pruned_text, pruned_speed, session.pruned_run)),
           runs.summary_card(session))


PRESET_PROMPTS = ["Explain in two sentences why the sky is blue.",
                  "Write a short, friendly email asking a colleague to move our meeting to Friday.",
                  "What are three tips for staying focused while studying?",
                  "Summarise what a battery does, for a ten-year-old."]


def build() -> SimpleNamespace:
    t = SimpleNamespace()
    with gr.Row(equal_height=True):
        t.prompt = gr.Textbox(label="Prompt", value=PRESET_PROMPTS[0], lines=2, scale=4, elem_id="prompt")
        with gr.Column(scale=1, min_width=200):
            t.max_new = gr.Slider(8, 256, value=48, step=8, label="New tokens")
            t.chat = gr.Checkbox(label="Chat template", value=True,
                                 info="wrap the prompt as a user turn when the tokenizer has a template")
    gr.Examples([[p] for p in PRESET_PROMPTS], inputs=[t.prompt], label="Try one of these",
                elem_id="preset-prompts")
    t.generate = gr.Button("Generate with both", variant="primary", elem_id="btn-generate")
    t.answers = gr.HTML(answers_html("<div class='cx-h3'>Original</div>", "<div class='cx-gen cx-muted'>—</div>",
                                     "<div class='cx-h3'>Pruned</div>", "<div class='cx-gen cx-muted'>—</div>"),
                        elem_id="gen-answers")
    return t


def wire(t: SimpleNamespace, session: gr.State, c: SimpleNamespace, start, heavy: dict, card) -> list:
    """Generate (button or Enter); ``card`` is the Prune & evaluate tab's summary card (it shows one answer
    pair). Returns the events Cancel stops."""
    inputs = [session, t.prompt, t.max_new, t.chat]
    outputs = [t.answers, card]
    generated = t.generate.click(start(), None, c.cancel_note, queue=False).then(run_generate, inputs, outputs, **heavy)
    submitted = t.prompt.submit(run_generate, inputs, outputs, **heavy)
    return [generated, submitted]

"""A run in words a non-expert reads: the summary card at the top of "Prune & evaluate", and a one-page HTML
report to send to someone who never opened the app.

Pure: data in (:class:`RunSummary`, plotly figures, plan rows, versions, commands), HTML out; only
:func:`write_report` touches the disk, atomically. The report is one self-contained file: the CSS is inline,
plotly.js is inlined once and every figure stays interactive, and nothing is fetched from the internet
(:func:`external_references` checks that before the page is returned). No gradio, no torch, no model here:
the GUI fills a :class:`RunSummary` (by hand or with :func:`summary_from_rows` from the runs table's rows)
and passes it in.

No PDF: the well-kept HTML-to-PDF library (weasyprint) does not run JavaScript, so every plotly figure would
come out empty; the browser's "Print → Save as PDF" on the report (print CSS included) gives a faithful one.
"""
from __future__ import annotations

import html
import importlib.metadata
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comp_core.export.atomic import staging_path

from .theme import COLORS

if TYPE_CHECKING:  # only for the annotations: this module never needs plotly or torch itself
    import plotly.graph_objects as go

    from comp_core.results import Plan

# perplexity change (after / before − 1) → (band, what it means for a reader, colour class); the first band whose
# upper limit the change stays below wins
PPL_BANDS: tuple[tuple[float, str, str, str], ...] = (
    (-0.10, "better", "the pruned model predicts real text a little better than the original", "good"),
    (0.10, "nearly unchanged", "the pruned model predicts real text about as well as the original", "good"),
    (0.50, "somewhat worse", "the pruned model is a little less sure of the next word; most answers read the same",
     "fair"),
    (1.50, "noticeably worse", "the pruned model is noticeably less sure of the next word; read a few answers "
     "before relying on it", "poor"),
    (math.inf, "much worse — try a lower ratio or healing", "the pruned model often loses the thread; remove less, "
     "or heal it with a short fine-tune after pruning", "bad"),
)
PERPLEXITY_HELP = ("Perplexity measures how surprised a model is by real text: roughly how many words it hesitates "
                   "between for each next word. Lower is better; the original model is the reference.")
WORDS_HELP = ("Parameters are the numbers a model learned: fewer means a smaller model. A token is a word or a piece "
              "of one.")
SOFTWARE = ("python", "torch", "transformers", "gradio", "comp-explorer")
_URL_ATTRIBUTES = {"src", "href", "data", "poster", "srcset", "action", "formaction", "background", "xlink:href"}
_EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)  # http://, https://, ftp://, //host
_CSS_EXTERNAL = re.compile(r"(?:url\(\s*['\"]?|@import\s+['\"])\s*((?:[a-z][a-z0-9+.-]*:)?//[^'\")\s]*)",
                           re.IGNORECASE)


class ReportError(Exception):
    """The report could not be made or written; the message says why and what to do."""


class ReportWriteError(ReportError):
    """The report file could not be written (a folder that is missing and cannot be made, not writable, full)."""


@dataclass
class Answers:
    """One prompt answered by the original and by the pruned model (``after`` None: not generated yet)."""

    prompt: str
    before: str
    after: str | None = None


@dataclass
class RunSummary:
    """Everything the card and the report show about one run; the GUI fills it (see :func:`summary_from_rows`).

    Shares are fractions (0.2 = 20 %). ``kind`` is the registry's (``get_method(name).kind``): "structured"
    removes parameters, "unstructured" (mask methods) only sets weights to zero, "composed" does both.
    Perplexities are keyed by the evaluation set's name as it should read ("WikiText-2"); the first set
    measured both before and after is the headline."""

    model: str
    method: str
    params_before: int
    params_after: int
    weights_mb_before: float
    weights_mb_after: float
    removed_share: float  # of all the model's parameters (the realised ratio)
    block_removed_share: float | None = None  # of the decoder blocks' parameters (None: not known)
    method_summary: str = ""  # the registry's one line: comp_core.methods.get_method(name).summary
    kind: str = "structured"
    run_id: str = ""
    ppl_before: dict[str, float] = field(default_factory=dict)
    ppl_after: dict[str, float] = field(default_factory=dict)
    tokens_per_s_before: float | None = None
    tokens_per_s_after: float | None = None
    answers: Answers | None = None
    sparsity_pattern: str = ""  # masks: "2:4", "unstructured 50%", … ("" for structured runs)
    linear_sparsity: float | None = None  # masks: share of the pruned linears' weights that are zero
    zero_share: float | None = None  # masks: share of all parameters that are zero
    removed_layers: list[int] = field(default_factory=list)
    n_layers: int | None = None  # decoder blocks of the original
    calibration: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    prune_seconds: float | None = None
    pruned_at: datetime | None = None
    evaluated_at: datetime | None = None

    @property
    def masks(self) -> bool:
        """Whether weights were set to zero (mask and composed methods with a pattern)."""
        return self.kind == "unstructured" or bool(self.sparsity_pattern)


# ------------------------------------------------------------------------------------------- filling


def plan_table_rows(plan: Plan) -> list[dict]:
    """The report's plan table from a finished plan: one row per original block with its ``layer``,
    ``importance`` (None where the method measures none), ``ratio`` (share of the block removed; masks: zeroed)
    and ``removed`` (what happened to it, in words)."""
    removed_per_layer = plan.removed_per_layer
    sparsity = {r.index: r.sparsity for r in plan.layer_reports if r.sparsity is not None}
    whole, protected = set(plan.removed_layers), set(plan.protected)
    rows = []
    for i in range(plan.n_layers):
        importance = plan.initial_importance[i] if i < len(plan.initial_importance) else None
        if importance is not None and not math.isfinite(importance):
            importance = None
        params = plan.layer_params[i] if i < len(plan.layer_params) else 0
        n = removed_per_layer.get(i, 0)
        if i in whole:
            ratio, removed = 1.0, "whole block"
        elif n > 0:
            ratio, removed = (n / params if params else None), f"{n:,} parameters"
        elif i in sparsity:
            ratio, removed = sparsity[i], "nothing (weights set to zero)"
        else:
            ratio, removed = 0.0, "nothing (protected)" if i in protected else "nothing"
        rows.append({"layer": i, "importance": importance, "ratio": ratio, "removed": removed})
    return rows


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def summary_from_rows(original: Mapping, run: Mapping, *, method_summary: str = "",
                      block_removed_share: float | None = None, n_layers: int | None = None,
                      settings: Mapping[str, Any] | None = None, answers: Answers | None = None,
                      eval_labels: Mapping[str, str] | None = None, pruned_at: datetime | None = None,
                      evaluated_at: datetime | None = None) -> RunSummary:
    """A :class:`RunSummary` from the runs table's rows (``ui/tabs/runs.py``): ``original`` is the "original"
    row of the same model, ``run`` the pruned run's row. What the rows do not hold comes as keywords;
    ``eval_labels`` turns set names ("wikitext2") into what the card shows ("WikiText-2")."""
    labels = eval_labels or {}
    ppl_before, ppl_after = {}, {}
    for key in run:
        if isinstance(key, str) and key.startswith("ppl "):
            name = labels.get(key[4:], key[4:])
            if (value := _number(original.get(key))) is not None:
                ppl_before[name] = value
            if (value := _number(run.get(key))) is not None:
                ppl_after[name] = value
    removed = [int(part) for part in re.split(r"[,\s]+", str(run.get("removed layers") or "")) if part.isdigit()]
    return RunSummary(
        model=str(run.get("model") or original.get("model") or ""), method=str(run.get("method") or ""),
        method_summary=method_summary, kind=str(run.get("kind") or "structured"), run_id=str(run.get("run") or ""),
        params_before=int(original.get("params") or 0), params_after=int(run.get("params") or 0),
        weights_mb_before=float(original.get("weights MB") or 0.0),
        weights_mb_after=float(run.get("weights MB") or 0.0),
        removed_share=float(run.get("realised ratio") or 0.0), block_removed_share=block_removed_share,
        ppl_before=ppl_before, ppl_after=ppl_after,
        tokens_per_s_before=_number(original.get("tokens/s")), tokens_per_s_after=_number(run.get("tokens/s")),
        answers=answers, sparsity_pattern=str(run.get("sparsity") or ""),
        linear_sparsity=_number(run.get("zeros in linears")), zero_share=_number(run.get("zeros of all params")),
        removed_layers=removed, n_layers=n_layers, calibration=str(run.get("calibration") or ""),
        settings=dict(settings or {}), prune_seconds=_number(run.get("prune s")), pruned_at=pruned_at,
        evaluated_at=evaluated_at)


def software_versions() -> dict[str, str]:
    """The versions that made the run: python, torch, transformers, gradio, comp-explorer ("not installed"
    for a missing one)."""
    out = {"python": platform.python_version()}
    for name in SOFTWARE[1:]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------------ formatting

_e = html.escape


def _pct(share: float) -> str:
    """20% / 3.4% / 0% (whole percent from 10 % up, one decimal below)."""
    value = share * 100
    if value == 0:
        return "0%"
    return f"{value:.0f}%" if abs(value) >= 9.95 else f"{value:.1f}%"


def _params(n: int) -> str:
    return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"


def _mb(value: float) -> str:
    return f"{value / 1000:,.2f} GB" if value >= 10_000 else f"{value:,.0f} MB"


def _ppl(value: float) -> str:
    if not math.isfinite(value):
        return "∞"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def _stamp(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M") if when else ""


def ppl_band(before: float, after: float) -> tuple[float, str, str, str]:
    """(relative change, band, what it means, colour class) of a perplexity change; see :data:`PPL_BANDS`."""
    change = after / before - 1 if before > 0 and math.isfinite(after) else math.inf
    for limit, band, meaning, tone in PPL_BANDS:
        if change < limit:
            return change, band, meaning, tone
    return change, *PPL_BANDS[-1][1:]


def _pattern_words(pattern: str) -> str:
    """How the weights were set to zero, after "Weights set to zero": "2:4" → "in a 2:4 pattern (2 of every 4
    weights)", "0.5" (the sparsity pattern's label for unstructured) → "anywhere in each pruned layer
    (unstructured, 50%)"."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern or "")
    if match:
        n, m = match.groups()
        return f"in a {n}:{m} pattern ({n} of every {m} weights)"
    try:
        share = float(pattern)
    except ValueError:
        return f"({pattern})" if pattern else ""
    return f"anywhere in each pruned layer (unstructured, {_pct(share)})"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_value(v) for v in value) or "—"
    if value is None or value == "":
        return "—"
    return str(value)


# ------------------------------------------------------------------------------------------------ card

# colours are !important: Gradio's `.prose *` rule would otherwise paint every element of the card in the theme's
# body colour (and, in a dark theme, light text on the card's white tiles)
CARD_CSS = f"""
.cx-card, .cx-card * {{ color: {COLORS["ink"]} !important; }}
.cx-card {{ font-family: ui-sans-serif, system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif;
  background: #ffffff; border: 1px solid {COLORS["grid"]}; border-radius: 10px;
  padding: 12px 14px; line-height: 1.4; font-size: 14px; }}
.cx-card-head {{ display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 10px; margin-bottom: 8px; }}
.cx-card-title {{ font-size: 16px; font-weight: 700; }}
.cx-card-method {{ color: {COLORS["muted"]} !important; font-size: 12.5px; }}
.cx-card-tiles {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 8px; }}
.cx-card-tile {{ background: #f8fafc; border: 1px solid {COLORS["grid"]}; border-radius: 8px; padding: 8px 10px; }}
.cx-card-label {{ font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: 0.04em;
  color: {COLORS["muted"]} !important; }}
.cx-card-big {{ font-size: 18px; font-weight: 700; margin: 2px 0; font-variant-numeric: tabular-nums; }}
.cx-card-pairtext {{ white-space: nowrap; }}
.cx-card-small {{ font-size: 12.5px; color: #475569 !important; }}
.cx-card-band {{ display: inline-block; border-radius: 999px; padding: 0 8px; font-size: 12.5px; font-weight: 700; }}
.cx-card-good {{ background: #ecfdf5; color: #065f46 !important; border: 1px solid #a7f3d0; }}
.cx-card-fair {{ background: #fffbeb; color: #92400e !important; border: 1px solid #fde68a; }}
.cx-card-poor {{ background: #fff7ed; color: #9a3412 !important; border: 1px solid #fed7aa; }}
.cx-card-bad {{ background: #fff1f2; color: #9f1239 !important; border: 1px solid #fecdd3; }}
.cx-card-meaning {{ margin-top: 8px; font-size: 13.5px; }}
.cx-card-help {{ margin-top: 4px; font-size: 12px; color: {COLORS["muted"]} !important; }}
.cx-card-answers {{ margin-top: 10px; }}
.cx-card-prompt {{ font-size: 13px; margin-bottom: 4px; }}
.cx-card-pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }}
.cx-card-answer {{ white-space: pre-wrap; overflow-wrap: anywhere; font-size: 13px; background: #f8fafc;
  border: 1px solid {COLORS["grid"]}; border-radius: 8px; padding: 6px 8px; max-height: 9.5em; overflow: auto; }}
.cx-card-answer b {{ display: block; font-size: 11px; text-transform: uppercase; letter-spacing: 0.04em;
  color: {COLORS["muted"]} !important; white-space: normal; }}
"""


def _tile(label: str, big: str, small: str = "", title: str = "") -> str:
    tip = f" title='{_e(title)}'" if title else ""
    extra = f"<div class='cx-card-small'>{small}</div>" if small else ""
    return (f"<div class='cx-card-tile'{tip}><div class='cx-card-label'>{label}</div>"
            f"<div class='cx-card-big'>{big}</div>{extra}</div>")


def _size_tile(s: RunSummary) -> str:
    if s.kind == "unstructured":
        lines = [f"Weights set to zero {_e(_pattern_words(s.sparsity_pattern))}".strip()]
        if s.linear_sparsity is not None:
            lines.append(f"{_pct(s.linear_sparsity)} of the pruned layers' weights are zero")
        if s.zero_share is not None:
            lines.append(f"{_pct(s.zero_share)} of all parameters are zero")
        lines.append(f"{_params(s.params_after)} parameters, the zeros included")
        return _tile("What changed", "Nothing removed", "<br>".join(lines))
    blocks = (f"{_pct(s.block_removed_share)} of the transformer blocks' parameters (the vocabulary table is kept "
              "whole)" if s.block_removed_share is not None else "")
    parts = [p for p in (blocks, f"{_params(s.params_before)} → {_params(s.params_after)} parameters") if p]
    if s.removed_layers:
        of = f" of {s.n_layers}" if s.n_layers else ""
        parts.append(f"{len(s.removed_layers)}{of} blocks removed whole (layers "
                     f"{', '.join(map(str, s.removed_layers))})")
    if s.masks and s.sparsity_pattern:
        then = f": {_pct(s.linear_sparsity)} of the pruned layers' weights" if s.linear_sparsity is not None else ""
        parts.append(f"then weights set to zero {_e(_pattern_words(s.sparsity_pattern))}{then}")
    return _tile("Smaller", f"{_pct(s.removed_share)} fewer parameters", "<br>".join(parts))


def _memory_tile(s: RunSummary) -> str:
    big = _pair(_mb(s.weights_mb_before), _mb(s.weights_mb_after))
    if s.kind == "unstructured":
        return _tile("Size", big, "The zeros still take space: the model is the same size on disk unless it is "
                                  "stored in a sparse format (compressed-tensors).")
    change = s.weights_mb_after / s.weights_mb_before - 1 if s.weights_mb_before > 0 else 0.0
    sparse = " (the zeros of the masks still take space unless stored sparse)" if s.masks else ""
    return _tile("Size", big, f"weights in memory and on disk, {'−' if change < 0 else '+'}{_pct(abs(change))}"
                              f"{sparse}.")


def _pair(before: str, after: str) -> str:
    """"32.9 → 58.6", kept on one line."""
    return f"<span class='cx-card-pairtext'>{before} → {after}</span>"


def _measured_sets(s: RunSummary) -> list[str]:
    return [name for name in s.ppl_after if name in s.ppl_before]


def _quality_tile(s: RunSummary) -> str:
    sets = _measured_sets(s)
    if not sets:
        return _tile("Quality", "not evaluated yet — press Evaluate",
                     "Evaluate measures perplexity: how well the model predicts real text.", PERPLEXITY_HELP)
    name = sets[0]
    before, after = s.ppl_before[name], s.ppl_after[name]
    change, band, _, tone = ppl_band(before, after)
    sign = "+" if change >= 0 else "−"
    amount = f"{sign}{abs(change) * 100:.0f}%" if math.isfinite(change) else "no longer measurable"
    others = [f"{_e(o)} {_ppl(s.ppl_before[o])} → {_ppl(s.ppl_after[o])}" for o in sets[1:]]
    small = (f"<span class='cx-card-band cx-card-{tone}'>{amount}: {band}</span><br>"
             f"perplexity on {_e(name)}, lower is better" + (f" · also {'; '.join(others)}" if others else ""))
    return _tile("Quality", f"perplexity {_pair(_ppl(before), _ppl(after))}", small, PERPLEXITY_HELP)


def _speed_tile(s: RunSummary) -> str:
    before, after = s.tokens_per_s_before, s.tokens_per_s_after
    if not before or after is None:
        return _tile("Speed", "not measured", "Tick “Generation speed” and press Evaluate to measure it.")
    factor = after / before
    word = "faster" if factor >= 1.05 else "slower" if factor <= 0.95 else "about the same speed"
    why = " (zeros are still computed)" if s.kind == "unstructured" else ""
    return _tile("Speed", f"{factor:.1f}× tokens/s",
                 f"{word}{why}: {before:,.1f} → {after:,.1f} tokens per second when writing an answer")


def _meaning(s: RunSummary) -> str:
    sets = _measured_sets(s)
    if not sets:
        return ("<b>Quality is not known yet.</b> Press <b>Evaluate</b> to measure how much the pruned model "
                "lost, then compare one answer in <b>Try it</b>.")
    _, band, meaning, _ = ppl_band(s.ppl_before[sets[0]], s.ppl_after[sets[0]])
    return f"<b>What this means:</b> {meaning}."


def _answers(s: RunSummary) -> str:
    a = s.answers
    if a is None:
        return ""
    after = _e(a.after) if a.after is not None else "<i>not generated yet</i>"
    return (f"<div class='cx-card-answers'><div class='cx-card-prompt'><b>One answer, before and after.</b> "
            f"Prompt: “{_e(a.prompt)}”</div><div class='cx-card-pair'>"
            f"<div class='cx-card-answer'><b>Original</b>{_e(a.before) or '<i>(empty)</i>'}</div>"
            f"<div class='cx-card-answer'><b>Pruned</b>{after or '<i>(empty)</i>'}</div></div></div>")


def summary_card_html(s: RunSummary) -> str:
    """The run in words a non-expert reads: how much smaller, how big, how good, how fast, one answer
    before and after. Self-contained (its own ``cx-card`` CSS); every user-provided string is escaped."""
    run = f"{_e(s.run_id)} · " if s.run_id else ""
    verb = "masked" if s.kind == "unstructured" else "pruned"
    summary = f"<span class='cx-card-method'>{_e(s.method_summary)}</span>" if s.method_summary else ""
    tiles = [_size_tile(s), _memory_tile(s), _quality_tile(s), _speed_tile(s)]
    return (f"<style>{CARD_CSS}</style><div class='cx-card'>"
            f"<div class='cx-card-head'><span class='cx-card-title'>{run}{_e(s.model)} {verb} with "
            f"{_e(s.method)}</span>{summary}</div>"
            f"<div class='cx-card-tiles'>{''.join(tiles)}</div>"
            f"<div class='cx-card-meaning'>{_meaning(s)}</div>"
            f"<div class='cx-card-help'>{PERPLEXITY_HELP} {WORDS_HELP}</div>"
            f"{_answers(s)}</div>")


# ---------------------------------------------------------------------------------------------- report

PAGE_CSS = f"""
* {{ box-sizing: border-box; }}
body {{ margin: 0; background: #f8fafc; color: {COLORS["ink"]};
  font-family: ui-sans-serif, system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; font-size: 14px; }}
main {{ max-width: 1120px; margin: 0 auto; padding: 24px 24px 40px; }}
h1 {{ font-size: 24px; margin: 0 0 2px; letter-spacing: -0.01em; }}
h2 {{ font-size: 17px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 2px solid {COLORS["grid"]}; }}
h3 {{ font-size: 14px; margin: 14px 0 4px; color: #334155; }}
.cx-report-date {{ color: {COLORS["muted"]}; font-size: 13px; margin-bottom: 14px; }}
.cx-report-lead {{ color: #334155; font-size: 13.5px; margin: 0 0 8px; }}
.cx-report-figure {{ background: #ffffff; border: 1px solid {COLORS["grid"]}; border-radius: 10px; padding: 6px;
  margin-bottom: 12px; break-inside: avoid; }}
table.cx-report-table {{ border-collapse: collapse; width: 100%; background: #ffffff; font-size: 13px;
  border: 1px solid {COLORS["grid"]}; }}
.cx-report-table th, .cx-report-table td {{ text-align: left; padding: 4px 8px; border-bottom: 1px solid
  {COLORS["grid"]}; vertical-align: top; }}
.cx-report-table th {{ background: #f1f5f9; font-weight: 600; }}
.cx-report-table .cx-num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.cx-report-table:not(.cx-report-plan) td:first-child {{ width: 34%; }}
table.cx-report-plan {{ width: auto; min-width: 60%; }}
table.cx-report-plan th, table.cx-report-plan td {{ width: auto; padding: 3px 16px; }}
.cx-report-table tr.cx-report-gone td {{ color: #9f1239; }}
.cx-report-table code {{ font-size: 12.5px; }}
pre.cx-report-commands {{ background: #0f172a; color: #e2e8f0; border-radius: 8px; padding: 10px 12px;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; line-height: 1.5;
  white-space: pre-wrap; overflow-wrap: anywhere; user-select: all; margin: 0; }}
.cx-report-note {{ color: {COLORS["muted"]}; font-size: 12.5px; margin: 4px 0; }}
footer {{ margin-top: 32px; color: {COLORS["muted"]}; font-size: 12px; }}
@page {{ size: A4; margin: 14mm; }}
@media print {{
  body {{ background: #ffffff; font-size: 11pt; }}
  main {{ max-width: none; padding: 0; }}
  h2 {{ break-after: avoid; }}
  section, .cx-card, .cx-report-figure, tr {{ break-inside: avoid; }}
  .cx-card-answer {{ max-height: none; overflow: visible; }}
  pre.cx-report-commands {{ background: #ffffff; color: #000000; border: 1px solid #94a3b8; }}
  .modebar-container {{ display: none !important; }}
}}
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[int] = (),
           row_class: Sequence[str] | None = None, table_class: str = "") -> str:
    """A table of already-escaped cells; ``numeric`` columns are right-aligned, their headers too."""
    head = "".join(f"<th class='cx-num'>{h}</th>" if i in numeric else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for n, cells in enumerate(rows):
        klass = f" class='{row_class[n]}'" if row_class and row_class[n] else ""
        body.append(f"<tr{klass}>" + "".join(f"<td class='cx-num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                              for i, c in enumerate(cells)) + "</tr>")
    klass = " ".join(["cx-report-table", table_class]).strip()
    return f"<table class='{klass}'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _plan_section(s: RunSummary, rows: list[dict] | None) -> str:
    if not rows:
        return ""
    zeroed = s.kind == "unstructured"
    share = "Share of the block's weights set to zero" if zeroed else "Share of the block removed"
    cells, classes = [], []
    for row in rows:
        importance = _number(row.get("importance"))
        ratio = _number(row.get("ratio"))
        removed = row.get("removed")
        if isinstance(removed, bool):
            removed = "whole block" if removed else "nothing"
        elif isinstance(removed, int):
            removed = f"{removed:,} parameters" if removed else "nothing"
        cells.append([_e(str(row.get("layer", ""))), f"{importance:.3f}" if importance is not None else "—",
                      _pct(ratio) if ratio is not None else "—", _e(_value(removed))])
        classes.append("cx-report-gone" if removed == "whole block" else "")
    lead = ("Each transformer block (layer) of the model, in order: how much the method measured it is needed "
            "(importance, higher = more needed; — where the method measures none) and what was taken from it.")
    return (f"<section><h2>The plan, block by block</h2><p class='cx-report-lead'>{lead}</p>"
            + _table(["Layer", "Importance", share, "Removed"], cells, numeric=(0, 1, 2), row_class=classes,
                     table_class="cx-report-plan")
            + "</section>")


def _run_rows(s: RunSummary) -> list[list[str]]:
    rows = [["model", _e(s.model)], ["method", _e(s.method)]]
    if s.method_summary:
        rows.append(["what the method does", _e(s.method_summary)])
    rows.append(["method kind", _e(s.kind)])
    if s.run_id:
        rows.append(["run", _e(s.run_id)])
    if s.calibration:
        rows.append(["calibration data", _e(s.calibration)])
    rows.append(["parameters removed (of all)", _pct(s.removed_share)])
    if s.block_removed_share is not None:
        rows.append(["parameters removed (of the transformer blocks)", _pct(s.block_removed_share)])
    rows.append(["parameters", f"{s.params_before:,} → {s.params_after:,}"])
    rows.append(["weights", f"{s.weights_mb_before:,.1f} MB → {s.weights_mb_after:,.1f} MB"])
    if s.removed_layers:
        rows.append(["removed blocks (layers)", ", ".join(map(str, s.removed_layers))])
    if s.sparsity_pattern:
        rows.append(["sparsity pattern", _e(s.sparsity_pattern)])
    if s.linear_sparsity is not None:
        rows.append(["zeros in the pruned layers", _pct(s.linear_sparsity)])
    if s.zero_share is not None:
        rows.append(["zeros among all parameters", _pct(s.zero_share)])
    for name in dict.fromkeys([*s.ppl_after, *s.ppl_before]):
        before, after = s.ppl_before.get(name), s.ppl_after.get(name)
        rows.append([f"perplexity on {_e(name)}", f"{_ppl(before) if before is not None else '—'} → "
                                                  f"{_ppl(after) if after is not None else '—'}"])
    if s.tokens_per_s_before and s.tokens_per_s_after is not None:
        rows.append(["tokens per second", f"{s.tokens_per_s_before:,.1f} → {s.tokens_per_s_after:,.1f}"])
    if s.prune_seconds is not None:
        rows.append(["seconds to prune", f"{s.prune_seconds:,.1f}"])
    if s.pruned_at:
        rows.append(["pruned at", _stamp(s.pruned_at)])
    if s.evaluated_at:
        rows.append(["evaluated at", _stamp(s.evaluated_at)])
    return rows


def _figures(figures: Mapping[str, go.Figure]) -> str:
    """Every figure, interactive; plotly.js is inlined with the first one only."""
    if not figures:
        return ""
    parts = []
    for n, (caption, fig) in enumerate(figures.items()):
        for image in fig.layout.images or ():  # plotly fetches these itself, from inside its script
            if isinstance(image.source, str) and _EXTERNAL.match(image.source):
                raise ReportError(f"The figure “{caption}” shows an image from {image.source}, so the report would "
                                  "not open offline; embed the image as data instead.")
        div = fig.to_html(full_html=False, include_plotlyjs=(n == 0), div_id=f"cx-plot-{n}", default_width="100%",
                          config={"displaylogo": False, "responsive": True})
        parts.append(f"<div class='cx-report-figure'><h3>{_e(caption)}</h3>{div}</div>")
    return ("<section><h2>Plots</h2><p class='cx-report-lead'>Interactive: hover for values, drag to zoom, "
            "double-click to reset.</p>" + "".join(parts) + "</section>")


def external_references(page: str) -> list[str]:
    """Every address the page would fetch or link to outside itself (``src``/``href``/… of a tag, ``url(…)``
    or ``@import`` in CSS). Text inside scripts (plotly.js's own strings) and escaped text do not count."""
    found: list[str] = []

    class _Scan(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self._in_style = False

        def handle_starttag(self, tag, attrs):
            self._in_style = tag == "style"
            for name, value in attrs:
                if name == "style" and value:
                    found.extend(m.group(1) for m in _CSS_EXTERNAL.finditer(value))
                elif name in _URL_ATTRIBUTES and value and _EXTERNAL.match(value):
                    found.append(value)

        def handle_endtag(self, tag):
            if tag == "style":
                self._in_style = False

        def handle_data(self, data):
            if self._in_style:
                found.extend(m.group(1) for m in _CSS_EXTERNAL.finditer(data))

    scan = _Scan()
    scan.feed(page)
    scan.close()
    return found


def report_html(s: RunSummary, figures: dict[str, go.Figure], *, plan_rows: list[dict] | None,
                versions: dict[str, str], commands: list[str], title: str | None = None,
                generated_at: datetime | None = None) -> str:
    """One self-contained page for a stakeholder: the summary card, the plots (interactive, plotly.js inlined
    once), the plan, every setting, the software versions and the commands that reproduce the run.

    ``figures``: caption → figure, in the order to show; ``plan_rows``: dicts with ``layer``, ``importance``,
    ``ratio``, ``removed`` (:func:`plan_table_rows` makes them from a ``Plan``); ``versions``:
    :func:`software_versions`. Raises :class:`ReportError` if the page would fetch anything from outside."""
    when = generated_at or datetime.now()
    verb = "masked" if s.kind == "unstructured" else "pruned"
    title = title or f"{s.model} {verb} with {s.method}" + (f" ({s.run_id})" if s.run_id else "")
    settings = _table(["Setting", "Value"],
                      [[f"<code>{_e(str(k))}</code>", _e(_value(v))] for k, v in s.settings.items()])
    settings_section = (f"<section><h2>Every setting</h2>{settings}</section>" if s.settings else
                        "<section><h2>Every setting</h2><p class='cx-report-note'>The method's defaults.</p></section>")
    software = _table(["Software", "Version"], [[_e(k), _e(str(v))] for k, v in versions.items()])
    reproduce = ("<section><h2>Reproduce this run</h2><p class='cx-report-lead'>Run these in a terminal where "
                 "comp-explorer is installed (one click selects them all for copying).</p>"
                 f"<pre class='cx-report-commands'>{_e(chr(10).join(commands))}</pre></section>" if commands else "")
    version = versions.get("comp-explorer")
    made_with = f" with comp-explorer {_e(version)}" if version else ""
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{PAGE_CSS}</style></head><body><main>"
        f"<h1>{_e(title)}</h1><div class='cx-report-date'>Report made on {when.strftime('%Y-%m-%d at %H:%M')}"
        f"{made_with}</div>"
        f"<section><h2>Summary</h2>{summary_card_html(s)}</section>"
        f"{_figures(figures)}<section><h2>The run</h2>{_table(['What', 'Value'], _run_rows(s))}</section>"
        f"{_plan_section(s, plan_rows)}"
        f"{settings_section}<section><h2>Software</h2>{software}</section>{reproduce}"
        "<footer>This page is self-contained: it opens from disk without a server or internet access. "
        "To make a PDF, print it from the browser (Save as PDF).</footer>"
        "</main></body></html>\n")
    outside = external_references(page)
    if outside:
        raise ReportError(f"The report would load {outside[0]} from the internet, so it would not open offline; "
                          "remove that address from the figures or texts.")
    return page


# ----------------------------------------------------------------------------------------------- write


def write_report(path: str | os.PathLike, html_text: str) -> Path:
    """Write the report to ``path`` atomically (a hidden staging file in the same folder, renamed over the
    target): the file is either the complete new report or what was there before, never half of either.
    Missing parent folders are created. Raises :class:`ReportWriteError` with a message a person can act on."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ReportWriteError(f"{target} is a folder; give the report a file name, such as {target / 'report.html'}.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ReportWriteError(f"Could not create the folder {target.parent} for the report ({err.strerror or err}); "
                               "choose a folder you can write to.") from err
    staging = staging_path(target)
    try:
        with open(staging, "x", encoding="utf-8") as out:
            out.write(html_text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, target)
    except OSError as err:
        _discard(staging)
        raise ReportWriteError(f"Could not write the report to {target} ({err.strerror or err}); nothing was "
                               "changed there. Choose a folder you can write to, with free space.") from err
    except BaseException:
        _discard(staging)
        raise
    return target


def _discard(staging: Path) -> None:
    """Remove a staging file a failed write left (it may not exist; a failure to remove it is not the news)."""
    try:
        staging.unlink(missing_ok=True)
    except OSError:
        pass

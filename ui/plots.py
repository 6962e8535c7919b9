"""Pure data -> plotly figure functions. No gradio, no torch: numbers, lists and numpy arrays in, figures out.

Sizes are chosen for a 1366×768 screen with the settings sidebar open (plots ~480–1000 px wide). Large maps
are handed to plotly as float32 numpy arrays, which plotly ≥ 6 ships base64-encoded (a 30 × 1536 heatmap is
~250 kB), and are drawn as one heatmap image, so they stay fast in the browser.
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .theme import COLORS, DATASET_COLORS, FONT, HEATMAP_SCALE, METHOD_COLORS

PRUNED_FILL = "rgba(225, 29, 72, 0.55)"  # COLORS["removed"] with alpha


def _layout(fig: go.Figure, title: str, height: int = 330, **extra) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14, "color": COLORS["ink"]}},
        font={"family": FONT, "size": 11, "color": COLORS["ink"]},
        height=height,
        margin={"l": 56, "r": 16, "t": 40, "b": 76},
        paper_bgcolor=COLORS["paper"],
        plot_bgcolor=COLORS["paper"],
        legend={"orientation": "h", "yanchor": "top", "y": -0.2, "xanchor": "left", "x": 0.0,
                "font": {"size": 10}, "bgcolor": "rgba(255,255,255,0)"},
        hoverlabel={"font": {"family": FONT}},
        **extra,
    )
    return fig


def empty_figure(message: str, title: str = "", height: int = 330) -> go.Figure:
    """A blank, axis-free figure that says what to do to fill it."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 13, "color": COLORS["muted"]})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height)


def _layer_axis(fig: go.Figure, n_layers: int, **kwargs) -> None:
    step = 1 if n_layers <= 16 else 2 if n_layers <= 40 else 5
    fig.update_xaxes(title_text="layer", tickmode="linear", tick0=0, dtick=step, range=[-0.6, n_layers - 0.4],
                     gridcolor=COLORS["grid"], zeroline=False, **kwargs)


def _use_log(values: Sequence[float]) -> bool:
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return len(positive) > 1 and max(positive) / min(positive) > 30


def _log_ticks(values: Sequence[float]) -> dict:
    """Readable log-axis ticks: 1-2-5 steps spanning ``values``, labelled in full (0.02, 0.05, 0.1, …)."""
    positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    ticks = [m * 10.0 ** e for e in range(low, high + 1) for m in (1, 2, 5)
             if min(positive) / 1.5 <= m * 10.0 ** e <= max(positive) * 1.5]
    return {"tickmode": "array", "tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def _value_axis(fig: go.Figure, values: Sequence[float], title: str) -> None:
    if _use_log(values):
        fig.update_yaxes(title_text=f"{title} (log)", type="log", gridcolor=COLORS["grid"], **_log_ticks(values))
    else:
        fig.update_yaxes(title_text=title, type="linear", gridcolor=COLORS["grid"])


# ------------------------------------------------------------------------------------------ layer level


def redundancy_curve(importance: Sequence[float], protected: Sequence[int] = (), removed: Sequence[int] = (),
                     removal_order: Sequence[int] = (), after: Mapping[int, float] | None = None,
                     title: str = "Layer importance  I = 1 − cos(input, output)") -> go.Figure:
    """Per-layer cosine importance (low = redundant) with protected and to-be-removed layers marked.

    ``after``: the importances of the remaining layers once ``removed`` are gone (dashed line).
    ``removal_order`` gives the rank shown next to each removed layer (#1 = removed first).
    """
    n = len(importance)
    x = list(range(n))
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=list(importance), mode="lines+markers", name="before removal",
                             line={"color": COLORS["primary"], "width": 2}, marker={"size": 5},
                             hovertemplate="layer %{x}<br>I = %{y:.4f}<extra></extra>"))
    if after and removed:
        keys = sorted(after)
        fig.add_trace(go.Scatter(x=keys, y=[after[k] for k in keys], mode="lines+markers",
                                 name=f"after removing {len(removed)}",
                                 line={"color": COLORS["accent"], "width": 1.5, "dash": "dash"},
                                 marker={"size": 4},
                                 hovertemplate="layer %{x}<br>I after removals = %{y:.4f}<extra></extra>"))
    prot = [i for i in protected if 0 <= i < n]
    if prot:
        fig.add_trace(go.Scatter(x=prot, y=[importance[i] for i in prot], mode="markers", name="protected",
                                 marker={"symbol": "diamond", "size": 11, "color": COLORS["protected"],
                                         "line": {"color": COLORS["ink"], "width": 1}},
                                 hovertemplate="layer %{x} (protected)<br>I = %{y:.4f}<extra></extra>"))
    rem = [i for i in removed if 0 <= i < n]
    if rem:
        rank = {layer: k + 1 for k, layer in enumerate(removal_order)}
        fig.add_trace(go.Scatter(x=rem, y=[importance[i] for i in rem], mode="markers+text", name="removed",
                                 text=[f"#{rank[i]}" if i in rank else "" for i in rem], textposition="top center",
                                 textfont={"color": COLORS["removed"], "size": 10},
                                 marker={"symbol": "x", "size": 11, "color": COLORS["removed"],
                                         "line": {"width": 1}},
                                 hovertemplate="layer %{x} (removed %{text})<br>I = %{y:.4f}<extra></extra>"))
    _layer_axis(fig, n)
    values = list(importance) + (list(after.values()) if after else [])
    _value_axis(fig, values, "importance")
    return _layout(fig, title)


def _blend(a: str, b: str, t: float) -> str:
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def removal_history(history: Sequence[Mapping[int, float]], removal_order: Sequence[int], n_layers: int,
                    highlight: int | None = None,
                    title: str = "Iterative removal: importance after each removal") -> go.Figure:
    """One line per step k (importances of the layers left after k removals); the next victim is crossed.

    ``highlight``: the number of removals currently chosen; that step's line is drawn thicker.
    """
    fig = go.Figure()
    steps = len(history)
    values = []
    for k, imps in enumerate(history):
        keys = sorted(imps)
        ys = [imps[i] for i in keys]
        values += ys
        t = k / max(1, steps - 1)
        chosen = highlight is not None and k == highlight
        label = "no removal" if k == 0 else f"after #{k} (layer {removal_order[k - 1]})"
        fig.add_trace(go.Scatter(x=keys, y=ys, mode="lines", name=label,
                                 line={"color": _blend(COLORS["primary_light"], COLORS["primary"], t),
                                       "width": 3 if chosen else 1.3},
                                 opacity=1.0 if chosen or highlight is None else 0.75,
                                 hovertemplate=f"{label}<br>layer %{{x}}: I = %{{y:.4f}}<extra></extra>"))
    victims = [(k, layer) for k, layer in enumerate(removal_order) if k < steps and layer in history[k]]
    if victims:
        fig.add_trace(go.Scatter(
            x=[layer for _, layer in victims], y=[history[k][layer] for k, layer in victims],
            mode="markers+text", name="removed next", text=[f"#{k + 1}" for k, _ in victims],
            textposition="bottom center", textfont={"color": COLORS["removed"], "size": 10},
            marker={"symbol": "x", "size": 10, "color": COLORS["removed"]},
            hovertemplate="removal %{text}: layer %{x}<br>importance %{y:.4f}<extra></extra>"))
    _layer_axis(fig, n_layers)
    _value_axis(fig, values, "importance")
    fig.update_layout(showlegend=steps <= 6)
    return _layout(fig, title)


def _legend_line(fig: go.Figure, y: float, label: str, n_layers: int) -> None:
    """A dashed horizontal reference line named in the legend (a label written on the plot overlaps bars)."""
    fig.add_trace(go.Scatter(x=[-0.5, n_layers - 0.5], y=[y, y], mode="lines", name=label,
                             line={"color": COLORS["accent"], "dash": "dash", "width": 1.5},
                             hovertemplate=f"{label}<extra></extra>"))


def ratio_bars(n_layers: int, layer_ratios: Mapping[int, float], protected: Sequence[int] = (),
               removed: Sequence[int] = (), target: float | None = None, layer_params: Sequence[int] | None = None,
               title: str = "Allocated pruning ratio per layer", message: str = "",
               color: str | None = None) -> go.Figure:
    """Bars of each prunable layer's ratio; removed layers as full hatched bars, protected layers marked at 0.

    ``message`` (e.g. why the ratio is impossible) is written across the plot.
    """
    fig = go.Figure()
    prunable = sorted(layer_ratios)
    params = list(layer_params) if layer_params is not None else None
    if prunable:
        custom = [params[i] / 1e6 if params else 0.0 for i in prunable]
        fig.add_trace(go.Bar(x=prunable, y=[layer_ratios[i] for i in prunable], name="neurons pruned",
                             marker={"color": color or COLORS["primary"]}, customdata=custom,
                             hovertemplate="layer %{x}: %{y:.1%} of %{customdata:.2f} M params<extra></extra>"))
    rem = sorted(i for i in removed if 0 <= i < n_layers)
    if rem:
        fig.add_trace(go.Bar(x=rem, y=[1.0] * len(rem), name="layer removed",
                             marker={"color": "rgba(225,29,72,0.25)", "line": {"color": COLORS["removed"], "width": 1},
                                     "pattern": {"shape": "/", "fgcolor": COLORS["removed"], "size": 6}},
                             hovertemplate="layer %{x}: removed entirely<extra></extra>"))
    prot = sorted(i for i in protected if 0 <= i < n_layers)
    if prot:
        fig.add_trace(go.Scatter(x=prot, y=[0.0] * len(prot), mode="markers", name="protected",
                                 marker={"symbol": "diamond", "size": 10, "color": COLORS["protected"],
                                         "line": {"color": COLORS["ink"], "width": 1}},
                                 hovertemplate="layer %{x}: protected<extra></extra>", cliponaxis=False))
    if target is not None:
        _legend_line(fig, target, f"target {target:.0%} of all parameters", n_layers)
    if message:
        fig.add_annotation(text="<br>".join(textwrap.wrap(message, 60)), x=0.5, y=0.6, xref="paper", yref="paper",
                           showarrow=False, font={"size": 12, "color": COLORS["removed"]},
                           bgcolor="rgba(255,255,255,0.9)")
    _layer_axis(fig, n_layers)
    fig.update_yaxes(title_text="share of the layer's parameters", range=[0, 1.05], tickformat=".0%",
                     gridcolor=COLORS["grid"])
    fig.update_layout(barmode="overlay", bargap=0.2)
    return _layout(fig, title)


def removed_share_bars(n_layers: int, removed_per_layer: Mapping[int, int], layer_params: Sequence[int],
                       removed_layers: Sequence[int] = (), protected: Sequence[int] = (),
                       title: str = "Removed parameters per layer", color: str | None = None) -> go.Figure:
    """Where a finished plan cut: each layer's removed share (removed layers as full hatched bars), drawn
    like :func:`ratio_bars` so any method's plan reads like COMP's allocation."""
    removed = set(removed_layers)
    shares = {i: n / layer_params[i] for i, n in removed_per_layer.items()
              if i not in removed and 0 <= i < n_layers and layer_params[i] and n > 0}
    fig = ratio_bars(n_layers, shares, protected, sorted(removed), layer_params=layer_params, title=title,
                     color=color)
    if not shares and not removed:
        fig.add_annotation(text="nothing removed", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                           font={"size": 12, "color": COLORS["muted"]})
    return fig


# ----------------------------------------------------------------------------------------- neuron level


def row_notes(removed_layers: Sequence[int], protected: Sequence[int]) -> dict[int, str]:
    """Labels for heatmap rows without scores: removed and protected layers."""
    notes = {int(i): "removed" for i in removed_layers}
    notes.update({int(i): "protected" for i in protected})
    return notes


def _sorted_rows(scores: np.ndarray, pruned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted by score (NaN last), the pruned mask carried along."""
    filled = np.where(np.isnan(scores), np.inf, scores)
    order = np.argsort(filled, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(pruned, order, axis=1)


def neuron_heatmap(scores: np.ndarray, pruned: np.ndarray, kind: str, *, sort: bool = False,
                   row_notes: Mapping[int, str] | None = None, title: str | None = None) -> go.Figure:
    """Layer × input-neuron map of log10 importance for one dense kind; pruned neurons shaded in red.

    ``scores``: float [n_layers, d] (NaN where a layer has no scores, e.g. removed or protected);
    ``pruned``: bool of the same shape; ``sort``: order each layer's neurons by score (pruned ones then sit
    on the left); ``row_notes``: text for rows without scores ("removed", "protected").
    """
    scores = np.asarray(scores, dtype=np.float32)
    pruned = np.asarray(pruned, dtype=bool)
    if sort:
        scores, pruned = _sorted_rows(scores, pruned)
    n_layers, width = scores.shape
    overlay = pruned.astype(np.uint8)  # 1 byte a neuron on the wire; 0 is drawn transparent
    fig = go.Figure()
    finite = scores[np.isfinite(scores)]
    # colours from the 1st to the 99.5th percentile: a few outlier neurons must not flatten the rest
    zrange = ({"zmin": float(np.percentile(finite, 1)), "zmax": float(np.percentile(finite, 99.5))}
              if finite.size else {})
    fig.add_trace(go.Heatmap(z=scores, colorscale=HEATMAP_SCALE, name="log10 score", **zrange,
                             colorbar={"title": {"text": "log₁₀ score", "side": "right"}, "thickness": 12, "len": 0.9},
                             hovertemplate=("layer %{y}<br>" + ("rank" if sort else "neuron")
                                            + " %{x}<br>log₁₀ score %{z:.2f}<extra></extra>")))
    fig.add_trace(go.Heatmap(z=overlay, zmin=0, zmax=1, showscale=False, hoverinfo="skip", name="pruned",
                             colorscale=[[0, "rgba(0,0,0,0)"], [0.5, "rgba(0,0,0,0)"], [0.5, PRUNED_FILL],
                                         [1, PRUNED_FILL]]))
    notes = row_notes or {}
    ticks = list(range(n_layers))
    step = 1 if n_layers <= 16 else 2
    fig.update_yaxes(title_text="layer", autorange="reversed", tickmode="array",
                     tickvals=[i for i in ticks if i % step == 0 or i in notes],
                     ticktext=[f"{i} · {notes[i]}" if i in notes else str(i) for i in ticks
                               if i % step == 0 or i in notes], tickfont={"size": 9})
    fig.update_xaxes(title_text="input neurons, sorted by score" if sort else "input neuron", showgrid=False)
    n_pruned = int(pruned.sum())
    title = title or f"Neuron importance · {kind} · {n_pruned:,} pruned (red)"
    return _layout(fig, title, height=max(300, min(460, 120 + 11 * n_layers)))


def dense_detail(scores: np.ndarray, pruned: np.ndarray, title: str) -> go.Figure:
    """One dense in detail: its neurons on a grid (pruned ones outlined) and its sorted score curve."""
    scores = np.asarray(scores, dtype=np.float32).ravel()
    pruned = np.asarray(pruned, dtype=bool).ravel()
    keep = ~np.isnan(scores)
    scores, pruned = scores[keep], pruned[keep]
    d = scores.size
    cols = max(1, int(math.ceil(math.sqrt(d * 1.6))))
    rows = int(math.ceil(d / cols))
    grid = np.full(rows * cols, np.nan, dtype=np.float32)
    grid[:d] = scores
    grid = grid.reshape(rows, cols)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.1,
                        subplot_titles=(f"{d} input neurons (grid, row-major)", "scores, sorted"))
    index = np.arange(rows * cols).reshape(rows, cols)
    fig.add_trace(go.Heatmap(z=grid, customdata=index, colorscale=HEATMAP_SCALE, showscale=False,
                             hovertemplate="neuron %{customdata}<br>log₁₀ score %{z:.2f}<extra></extra>"),
                  row=1, col=1)
    where = np.flatnonzero(pruned)
    if where.size:
        fig.add_trace(go.Scatter(x=(where % cols).tolist(), y=(where // cols).tolist(), mode="markers",
                                 name="pruned", marker={"symbol": "square-open", "color": COLORS["removed"],
                                                        "size": max(3, min(14, 360 / cols)), "line": {"width": 1.5}},
                                 customdata=where.tolist(),
                                 hovertemplate="neuron %{customdata} (pruned)<extra></extra>"), row=1, col=1)
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    sorted_pruned = pruned[order]
    ranks = np.arange(d)
    fig.add_trace(go.Scatter(x=ranks[~sorted_pruned], y=sorted_scores[~sorted_pruned], mode="markers",
                             name="kept", marker={"size": 3, "color": COLORS["primary"]},
                             hovertemplate="rank %{x}: %{y:.2f}<extra></extra>"), row=1, col=2)
    if sorted_pruned.any():
        fig.add_trace(go.Scatter(x=ranks[sorted_pruned], y=sorted_scores[sorted_pruned], mode="markers",
                                 name="pruned", showlegend=False, marker={"size": 3, "color": COLORS["removed"]},
                                 hovertemplate="rank %{x}: %{y:.2f} (pruned)<extra></extra>"), row=1, col=2)
    fig.update_yaxes(autorange="reversed", showticklabels=False, showgrid=False, row=1, col=1)
    fig.update_xaxes(showticklabels=False, showgrid=False, row=1, col=1)
    fig.update_xaxes(title_text="rank (least important first)", gridcolor=COLORS["grid"], row=1, col=2)
    fig.update_yaxes(title_text="log₁₀ score", gridcolor=COLORS["grid"], row=1, col=2)
    fig.update_annotations(font={"size": 11, "color": COLORS["muted"]})
    return _layout(fig, title, height=340)


# ------------------------------------------------------------------------------------------------- runs


def is_mask_row(row: Mapping) -> bool:
    """Whether a runs / Compare row comes from a mask method (weights zeroed, none removed)."""
    return row.get("kind") == "unstructured"


def pattern_order(label: str) -> tuple:
    """Sort key of a sparsity label: by the share it zeroes, unstructured before N:M, then by M."""
    text = str(label)
    if ":" in text:
        n, _, m = text.partition(":")
        try:
            return (int(n) / int(m), 1, int(m), text)
        except (ValueError, ZeroDivisionError):
            return (math.inf, 2, 0, text)
    try:
        return (float(text), 0, 0, text)
    except ValueError:
        return (math.inf, 2, 0, text)


def ppl_vs_ratio(runs: Sequence[Mapping], datasets: Sequence[str] = ("wikitext2", "ptb", "c4", "sample"),
                 title: str = "Perplexity vs realised ratio (all runs of this session)") -> go.Figure:
    """One line per evaluation set through every run that has a perplexity for it (log y).

    ``runs``: rows with "run", "realised ratio" and "ppl <dataset>" keys (the results table's rows).
    """
    fig = go.Figure()
    any_point = False
    for ds in datasets:
        key = f"ppl {ds}"
        measured = [r for r in runs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
                    and r.get("realised ratio") is not None]
        masks = [r for r in measured if is_mask_row(r)]
        points = sorted((r["realised ratio"], r[key], str(r["run"])) for r in measured if not is_mask_row(r))
        if masks:  # nothing removed: markers at 0, not a point of the line through the removals
            any_point = True
            fig.add_trace(go.Scatter(
                x=[0.0] * len(masks), y=[r[key] for r in masks], mode="markers+text", name=f"{ds} · masks",
                text=[f"{r['run']} {r.get('sparsity') or ''}".strip() for r in masks], textposition="middle right",
                marker={"symbol": "diamond-open", "size": 10, "line": {"width": 2},
                        "color": DATASET_COLORS.get(ds, COLORS["primary"])}, textfont={"size": 9},
                hovertemplate=f"{ds}<br>run %{{text}} (masks: nothing removed)<br>ppl %{{y:.2f}}<extra></extra>"))
        if not points:
            continue
        any_point = True
        fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], text=[p[2] for p in points],
                                 mode="lines+markers+text", textposition="top center", name=ds,
                                 line={"color": DATASET_COLORS.get(ds, COLORS["primary"]), "width": 2},
                                 marker={"size": 8}, textfont={"size": 9},
                                 hovertemplate=f"{ds}<br>run %{{text}}<br>ratio %{{x:.1%}}<br>ppl %{{y:.2f}}"
                                               "<extra></extra>"))
    if not any_point:
        return empty_figure("Evaluate a run to see perplexity against the realised ratio.", title)
    top = max((r.get("realised ratio") or 0.0) for r in runs)
    values = [p for trace in fig.data for p in trace.y]
    if _use_log(values) or max(values) / min(values) > 3:
        fig.update_yaxes(**_log_ticks(values))
    fig.update_xaxes(title_text="realised ratio (share of parameters removed)", tickformat=".0%",
                     gridcolor=COLORS["grid"], range=[-0.04 - 0.05 * top, top * 1.08 + 0.04])
    fig.update_yaxes(title_text="perplexity (log)", type="log", gridcolor=COLORS["grid"])
    return _layout(fig, title)


# ------------------------------------------------------------------------------------------ searched shares

SEARCH_RULE = "each method's rule"  # the legend's words for the one-shot allocation
SEARCH_FOUND = "searched"
SEARCH_KEPT_RULE = "kept the rule's shares: nothing beat them on the held-out text"
SEARCH_CURVE = "best candidate of each generation"


def search_figure(record, n_layers: int, protected: Sequence[int] = (), removed: Sequence[int] = (),
                  title: str | None = None) -> go.Figure:
    """A searched allocation (``comp_core.results.SearchRecord``) in two panels: (a) each searched layer's share
    of its parameters pruned under the method's own rule beside the searched share (layers removed whole
    shaded, protected ones marked at 0); (b) the fitness per generation — the KL divergence of the pruned
    model's next-token distribution from the original's, on each generation's sample of the held-out
    calibration text (lower = closer), the start (the rule's shares) marked. The title holds the decisive
    figures, on all held-out tokens; when nothing beat the rule there (``record.improved`` False) the rule's
    shares were kept: the searched bars are drawn hollow and the title says so."""
    layers = [int(i) for i in record.layers]
    kept = bool(record.improved)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.09,
                        subplot_titles=("How much each layer gives up",
                                        "How far the pruned model's answers are from the original's"))
    rem = sorted(int(i) for i in removed if 0 <= int(i) < n_layers)
    for i in rem:  # shaded columns (a bar would take a slot of every layer's group)
        fig.add_vrect(x0=i - 0.45, x1=i + 0.45, fillcolor=COLORS["removed"], opacity=0.12, line_width=0,
                      row=1, col=1, exclude_empty_subplots=False)
    if rem:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="layer removed whole",
                                 marker={"symbol": "square", "size": 11, "color": "rgba(225,29,72,0.25)"}),
                      row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[record.one_shot[i] for i in layers], name=SEARCH_RULE,
                         marker={"color": COLORS["primary_light"]},
                         hovertemplate=f"layer %{{x}}: %{{y:.1%}} pruned by {SEARCH_RULE}<extra></extra>"),
                  row=1, col=1)
    found = {"color": COLORS["primary"]} if kept else {
        "color": "rgba(79,70,229,0.08)", "line": {"color": COLORS["primary"], "width": 1.5}}
    fig.add_trace(go.Bar(x=layers, y=[record.searched[i] for i in layers],
                         name=SEARCH_FOUND if kept else f"{SEARCH_FOUND} (not kept)", marker=found,
                         hovertemplate=f"layer %{{x}}: %{{y:.1%}} pruned, {SEARCH_FOUND}<extra></extra>"),
                  row=1, col=1)
    prot = sorted(int(i) for i in protected if 0 <= int(i) < n_layers and int(i) not in rem)
    if prot:
        fig.add_trace(go.Scatter(x=prot, y=[0.0] * len(prot), mode="markers", name="protected",
                                 marker={"symbol": "diamond", "size": 10, "color": COLORS["protected"],
                                         "line": {"color": COLORS["ink"], "width": 1}}, cliponaxis=False,
                                 hovertemplate="layer %{x}: protected<extra></extra>"), row=1, col=1)
    history = [float(v) for v in record.fitness]
    generations = list(range(len(history)))
    seconds = list(record.seconds) + [None] * (len(history) - len(record.seconds))
    fig.add_trace(go.Scatter(x=generations, y=history, mode="lines+markers", name=SEARCH_CURVE,
                             line={"color": COLORS["primary"], "width": 2}, marker={"size": 5},
                             customdata=[s if s is not None else float("nan") for s in seconds],
                             hovertemplate=("generation %{x} (%{customdata:.0f} s)<br>KL %{y:.4f} on this "
                                            "generation's sample of the held-out text<extra></extra>")),
                  row=1, col=2)
    if history:
        fig.add_trace(go.Scatter(x=[0], y=[history[0]], mode="markers", name=f"start: {SEARCH_RULE}",
                                 marker={"symbol": "star", "size": 13, "color": COLORS["accent"],
                                         "line": {"color": COLORS["ink"], "width": 1}},
                                 hovertemplate="start (the rule's shares)<br>KL %{y:.4f}<extra></extra>"),
                      row=1, col=2)
    step = 1 if n_layers <= 16 else 2 if n_layers <= 40 else 5
    fig.update_xaxes(title_text="layer", tickmode="linear", tick0=0, dtick=step, range=[-0.6, n_layers - 0.4],
                     gridcolor=COLORS["grid"], zeroline=False, row=1, col=1)
    top = max([record.one_shot[i] for i in layers] + [record.searched[i] for i in layers] + [0.0])
    fig.update_yaxes(title_text="share of the layer's parameters pruned", tickformat=".0%",
                     range=[0, min(1.05, top * 1.15 + 0.02)], gridcolor=COLORS["grid"], row=1, col=1)
    fig.update_xaxes(title_text="generation", gridcolor=COLORS["grid"], zeroline=False, row=1, col=2,
                     **({"dtick": 1} if len(history) <= 12 else {}))
    fig.update_yaxes(title_text="KL to the original (lower = closer)", gridcolor=COLORS["grid"], row=1, col=2)
    fig.update_annotations(font={"size": 11, "color": COLORS["muted"]})  # the panels' titles
    fig.update_layout(barmode="group", bargap=0.25, bargroupgap=0.05)
    if title is None:
        held = f"{record.holdout} held-out text{'s' if record.holdout != 1 else ''}"
        if kept:
            closer = 1 - record.final_kl / record.start_kl if record.start_kl > 0 else 0.0
            title = (f"Searched layer shares · {closer:.0%} closer to the original on all {held} (KL "
                     f"{record.start_kl:.4g} → {record.final_kl:.4g}) · {record.generations} generations")
        else:
            title = (f"Searched layer shares · {SEARCH_KEPT_RULE} (KL {record.start_kl:.4g} on all {held}) · "
                     f"{record.generations} generations")
    return _layout(fig, title, height=360)


def method_color(method: str, order: Sequence[str]) -> str:
    """A colour per method: its position in ``order`` — the methods of one figure, so that up to
    ``len(METHOD_COLORS)`` methods never share a colour — else a hash of its name."""
    index = list(order).index(method) if method in order else sum(map(ord, method))
    return METHOD_COLORS[index % len(METHOD_COLORS)]


_DASHES = ("solid", "dash", "dot", "dashdot")
_SYMBOLS = ("circle", "square", "triangle-up", "diamond", "cross")
_MASK_SYMBOLS = ("diamond", "circle", "square", "triangle-up")


def _ppl(row: Mapping, ds: str) -> float | None:
    value = row.get(f"ppl {ds}")
    return value if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def compare_ppl(rows: Sequence[Mapping], eval_sets: Sequence[str], order: Sequence[str] = (),
                title: str = "Perplexity vs realised ratio, per method",
                names: Mapping[str, str] | None = None) -> go.Figure:
    """One line per method (per evaluation set when there are several: dashed for the second, …), log y;
    the original as a star at ratio 0 and, for reference, the start of every line.

    Composed rows (structure removed, then masks) get one line per sparsity, through their realised
    (structural) ratios. Mask rows (``kind`` "unstructured": weights zeroed, none removed) have no place on a
    ratio axis: they go to a second, narrow panel with the sparsity patterns as categories, one marker per
    method and pattern, the original's perplexity as a dotted line.

    ``rows``: the Compare table's rows as dicts with "method", "kind", "realised ratio", "target",
    "sparsity", "ppl <set>" (and "error", "zeros of all params"). ``names``: how a method is written in the
    legend and hover text (e.g. "comp · searched" for the row label "comp@search"); else its own name.
    """
    shown = lambda method: (names or {}).get(method, method)  # noqa: E731
    good = [r for r in rows if not r.get("error")]
    masks = [r for r in good if is_mask_row(r) and r.get("sparsity")]
    patterns = sorted({str(r["sparsity"]) for r in masks}, key=pattern_order)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.72, 0.28], horizontal_spacing=0.03,
                        subplot_titles=("structured: by realised ratio", "masks (nothing removed): by pattern")
                        ) if masks else go.Figure()

    def add(trace, col: int = 1) -> None:
        if masks:
            fig.add_trace(trace, row=1, col=col)
        else:
            fig.add_trace(trace)

    original = [r for r in rows if r.get("method") == "original"]
    # one line per (method, sparsity of a composed method)
    groups = list(dict.fromkeys((r["method"], r.get("sparsity") if r.get("kind") == "composed" else None)
                                for r in good if r.get("method") != "original" and not is_mask_row(r)))
    composed_patterns = sorted({g[1] for g in groups if g[1]}, key=pattern_order)
    mask_methods = list(dict.fromkeys(r["method"] for r in masks))
    values, line_x, plotted = [], [], False
    several = len(eval_sets) > 1
    for k, ds in enumerate(eval_sets):
        base = next((_ppl(r, ds) for r in reversed(original) if _ppl(r, ds) is not None), None)
        if base is not None:
            values.append(base)
            line_x.append(0.0)
            add(go.Scatter(x=[0.0], y=[base], mode="markers", name=f"original · {ds}" if several else "original",
                           marker={"symbol": "star", "size": 13, "color": COLORS["ink"]},
                           hovertemplate=f"original<br>{ds} ppl %{{y:.2f}}<extra></extra>"))
        for method, sparsity in groups:
            points = sorted((r["realised ratio"], _ppl(r, ds), f"{r['target']:.0%}") for r in good
                            if r.get("method") == method and _ppl(r, ds) is not None
                            and (r.get("sparsity") if r.get("kind") == "composed" else None) == sparsity
                            and isinstance(r.get("realised ratio"), (int, float)))
            if not points:
                continue
            if base is not None and sparsity is None:  # a composed line never passes through the original
                points = [(0.0, base, "original")] + points
            values += [p[1] for p in points]
            line_x += [p[0] for p in points]
            plotted = True
            label = f"{shown(method)} {sparsity}" if sparsity else shown(method)
            symbol = _SYMBOLS[1 + composed_patterns.index(sparsity) % (len(_SYMBOLS) - 1)] if sparsity else "circle"
            add(go.Scatter(
                x=[p[0] for p in points], y=[p[1] for p in points], customdata=[p[2] for p in points],
                mode="lines+markers", name=f"{label} · {ds}" if several else label,
                line={"color": method_color(method, order), "width": 2, "dash": _DASHES[k % len(_DASHES)]},
                marker={"size": 8 if sparsity else 7, "symbol": symbol},
                hovertemplate=(f"{label}<br>target %{{customdata}}<br>realised %{{x:.1%}}<br>{ds} ppl %{{y:.2f}}"
                               "<extra></extra>")))
        if masks:
            if base is not None:
                add(go.Scatter(x=[-0.5, len(patterns) - 0.5], y=[base, base], mode="lines", showlegend=False,
                               line={"color": COLORS["ink"], "width": 1, "dash": "dot"},
                               hovertemplate=f"original<br>{ds} ppl %{{y:.2f}}<extra></extra>"), col=2)
            width = min(0.16, 0.64 / max(1, len(mask_methods)))
            for j, method in enumerate(mask_methods):
                hits = sorted(((patterns.index(str(r["sparsity"])), _ppl(r, ds), r) for r in masks
                               if r["method"] == method and _ppl(r, ds) is not None), key=lambda h: h[0])
                if not hits:
                    continue
                plotted = True
                values += [h[1] for h in hits]
                offset = (j - (len(mask_methods) - 1) / 2) * width
                zeros = [r.get("zeros of all params") for _, _, r in hits]
                add(go.Scatter(
                    x=[i + offset for i, _, _ in hits], y=[v for _, v, _ in hits],
                    customdata=[[str(r["sparsity"]), f"{z:.1%}" if isinstance(z, float) else "—"]
                                for (_, _, r), z in zip(hits, zeros)],
                    mode="markers", name=f"{shown(method)} · {ds}" if several else shown(method),
                    marker={"symbol": _MASK_SYMBOLS[k % len(_MASK_SYMBOLS)], "size": 10,
                            "color": method_color(method, order), "line": {"color": COLORS["ink"], "width": 1}},
                    hovertemplate=(f"{shown(method)} (masks)<br>pattern %{{customdata[0]}}<br>zeros of all params "
                                   f"%{{customdata[1]}}<br>{ds} ppl %{{y:.2f}}<extra></extra>")), col=2)
    if not plotted:
        return empty_figure("Run a comparison to see perplexity against the realised ratio.", title)
    top = max(line_x) if line_x else 0.0
    left = {"row": 1, "col": 1} if masks else {}
    fig.update_xaxes(title_text="realised ratio (share of parameters removed)", tickformat=".0%",
                     gridcolor=COLORS["grid"], range=[-0.03 - 0.03 * top, top * 1.08 + 0.03], **left)
    if masks:
        fig.update_xaxes(title_text="sparsity pattern", tickmode="array", tickvals=list(range(len(patterns))),
                         ticktext=patterns, range=[-0.5, len(patterns) - 0.5], gridcolor=COLORS["grid"],
                         row=1, col=2)
        fig.update_annotations(font={"size": 11, "color": COLORS["muted"]})
    # 1-2-5 ticks over a wide range; plotly's own ticks when the values sit close together (none would show)
    ticks = _log_ticks(values) if max(values) / min(values) > 3 else {}
    fig.update_yaxes(type="log", gridcolor=COLORS["grid"], **ticks)
    fig.update_yaxes(title_text="perplexity (log)", **left)
    return _layout(fig, title, height=360 if not masks else 380)


# ------------------------------------------------------------------------------------------------ masks


def sparsity_bars(n_layers: int, layer_ratios: Mapping[int, float], protected: Sequence[int] = (),
                  removed: Sequence[int] = (), pattern_share: float | None = None,
                  layer_params: Sequence[int] | None = None,
                  title: str = "Zeroed share of each layer's parameters") -> go.Figure:
    """Where a mask method put its zeros: each layer's zeroed share of its parameters (nothing is removed);
    protected (left dense) layers marked at 0, layers a composed method removed first as hatched bars.

    ``pattern_share``: the share the pattern zeroes in every masked linear (0.5 for 2:4), drawn as a line;
    a layer sits a little below it because its norms stay dense.
    """
    fig = go.Figure()
    masked = sorted(i for i in layer_ratios if 0 <= i < n_layers)
    if masked:
        custom = [layer_params[i] / 1e6 if layer_params else 0.0 for i in masked]
        fig.add_trace(go.Bar(x=masked, y=[layer_ratios[i] for i in masked], name="weights zeroed",
                             marker={"color": PRUNED_FILL, "line": {"color": COLORS["removed"], "width": 1}},
                             customdata=custom,
                             hovertemplate="layer %{x}: %{y:.1%} of %{customdata:.2f} M params zero<extra></extra>"))
    rem = sorted(i for i in removed if 0 <= i < n_layers)
    if rem:
        fig.add_trace(go.Bar(x=rem, y=[1.0] * len(rem), name="layer removed",
                             marker={"color": "rgba(100,116,139,0.15)", "line": {"color": COLORS["muted"], "width": 1},
                                     "pattern": {"shape": "/", "fgcolor": COLORS["muted"], "size": 6}},
                             hovertemplate="layer %{x}: removed before masking<extra></extra>"))
    prot = sorted(i for i in protected if 0 <= i < n_layers and i not in layer_ratios)
    if prot:
        fig.add_trace(go.Scatter(x=prot, y=[0.0] * len(prot), mode="markers", name="left dense",
                                 marker={"symbol": "diamond", "size": 10, "color": COLORS["protected"],
                                         "line": {"color": COLORS["ink"], "width": 1}},
                                 hovertemplate="layer %{x}: left dense<extra></extra>", cliponaxis=False))
    if pattern_share is not None:
        _legend_line(fig, pattern_share, f"pattern: {pattern_share:.0%} of each linear", n_layers)
    if not masked:
        fig.add_annotation(text="no masks", x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                           font={"size": 12, "color": COLORS["muted"]})
    _layer_axis(fig, n_layers)
    fig.update_yaxes(title_text="share of the layer's parameters", range=[0, 1.05], tickformat=".0%",
                     gridcolor=COLORS["grid"])
    fig.update_layout(barmode="overlay", bargap=0.2)
    return _layout(fig, title)


SPARSITY_SCALE = [[0.0, "#f8fafc"], [0.5, "#fda4af"], [1.0, COLORS["removed"]]]


def sparsity_heatmap(values: np.ndarray, kinds: Sequence[str], *, row_notes: Mapping[int, str] | None = None,
                     title: str = "Share of zero weights per dense") -> go.Figure:
    """Layers × dense kinds: the share of each dense's weights a mask method zeroed, written in every cell.

    ``values``: float [n_layers, len(kinds)], NaN where a layer has no such masked dense (left dense,
    removed); ``row_notes``: text for those rows ("removed", "dense").
    """
    values = np.asarray(values, dtype=np.float32)
    n_layers = values.shape[0]
    finite = values[np.isfinite(values)]
    uniform = finite.size > 0 and float(finite.max() - finite.min()) < 1e-3
    # numbers in the cells only where they differ: a pattern that zeroes every dense alike says it once
    text = [["" if uniform or not np.isfinite(v) else f"{v:.1%}" for v in row] for row in values]
    if uniform:
        title = f"{title} · every masked dense is {float(finite.mean()):.1%} zero"
    fig = go.Figure(go.Heatmap(
        z=values, x=list(kinds), y=list(range(n_layers)), zmin=0.0, zmax=1.0, colorscale=SPARSITY_SCALE,
        text=text, texttemplate="%{text}", textfont={"size": 9 if n_layers > 16 else 10},
        xgap=1, ygap=1, colorbar={"title": {"text": "zero share", "side": "right"}, "thickness": 12, "len": 0.9,
                                  "tickformat": ".0%"},
        hovertemplate="layer %{y} · %{x}<br>%{z:.2%} of the weights zero<extra></extra>"))
    notes = row_notes or {}
    ticks = list(range(n_layers))
    step = 1 if n_layers <= 16 else 2
    fig.update_yaxes(title_text="layer", autorange="reversed", tickmode="array",
                     tickvals=[i for i in ticks if i % step == 0 or i in notes],
                     ticktext=[f"{i} · {notes[i]}" if i in notes else str(i) for i in ticks
                               if i % step == 0 or i in notes], tickfont={"size": 9})
    fig.update_xaxes(title_text="dense", side="bottom", showgrid=False)
    return _layout(fig, title, height=max(300, min(460, 120 + 11 * n_layers)))


# ------------------------------------------------------------------------------------------ layer similarity


def layer_similarity_figure(distance: Sequence[Sequence[float | None]] | None, removed: Sequence[int], n_layers: int,
                            title: str = "How much the hidden state changes from layer l to layer l+n") -> go.Figure:
    """The layer-distance matrix (Gromov et al. 2024): colour at (l, n) = mean angular distance between the
    hidden states entering layers l and l + n (l + n = n_layers: the last layer's output); low = the n layers
    from l on change little, so they could go together. Every layer the plan removes is marked at (l, 1).

    ``distance``: ``Plan.layer_distance``, n_layers rows (n = 1..n_layers) of n_layers values (l = 0..), NaN
    or None where l + n > n_layers; None when the plan has none (an empty figure says so).
    """
    if not distance:
        return empty_figure("Analyse with COMP to see how much the hidden state changes across each span "
                            "of layers.", title)
    z = np.array([[math.nan if v is None else float(v) for v in row] for row in distance], dtype=np.float32)
    if z.shape != (n_layers, n_layers):
        raise ValueError(f"a layer-distance matrix of {n_layers} layers has {n_layers}×{n_layers} values, "
                         f"got {z.shape[0]}×{z.shape[1] if z.ndim == 2 else 0}")
    finite = z[np.isfinite(z)]
    if not finite.size:
        return empty_figure("No layer distances were measured.", title)

    def hover(n: int, layer: int) -> str:
        end = layer + n
        target = f"input of layer {end}" if end < n_layers else "output of the last layer"
        return f"layers {layer}→{end}: input of layer {layer} vs {target}, distance {z[n - 1, layer]:.3f}"

    text = [[hover(n, layer) if np.isfinite(z[n - 1, layer]) else "" for layer in range(n_layers)]
            for n in range(1, n_layers + 1)]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_layers)), y=list(range(1, n_layers + 1)), text=text, colorscale=HEATMAP_SCALE,
        zmin=0.0, zmax=float(finite.max()), hoverongaps=False, name="angular distance",
        colorbar={"title": {"text": "angular distance<br>(low = similar,<br>redundant)", "side": "right"},
                  "thickness": 12, "len": 0.9},
        hovertemplate="%{text}<extra></extra>"))
    marked = sorted(int(i) for i in removed if 0 <= int(i) < n_layers)
    if marked:
        fig.add_trace(go.Scatter(
            x=marked, y=[1] * len(marked), mode="markers", name="removed by the plan",
            marker={"symbol": "x", "size": max(6, min(11, 280 // n_layers)), "color": COLORS["removed"],
                    "line": {"color": COLORS["paper"], "width": 1}},
            customdata=[float(z[0, i]) for i in marked], cliponaxis=False,
            hovertemplate="layer %{x}: removed by the plan<br>distance to the next layer's input %{customdata:.3f}"
                          "<extra></extra>"))
    _layer_axis(fig, n_layers, showgrid=False)
    fig.update_xaxes(title_text="first layer l")
    step = 1 if n_layers <= 16 else 2 if n_layers <= 40 else 5
    fig.update_yaxes(title_text="n (layers spanned, l → l+n)", tickmode="linear", tick0=1, dtick=step,
                     range=[0.4, n_layers + 0.6], showgrid=False, zeroline=False)
    fig.update_layout(showlegend=bool(marked))
    return _layout(fig, title, height=max(330, min(480, 150 + 11 * n_layers)))

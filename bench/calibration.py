"""Calibration sensitivity: COMP at 20 % with several calibration seeds per source (C4 train, WikiText-2,
data-free samples from the model itself), the default 10 × 128 shape; WikiText-2 perplexity spread per source.

    COMP_DATA_DIR=../shared/data python bench/calibration.py --quick --out bench-out
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import plotly.graph_objects as go

from common import (command_line, CALIBRATION, QUICK_SEQ_LEN, Section, bundled, calibration, eval_protocol, machine, main_for,
                    markdown_table, measure, ppl, save_figure)
from comp_core import data as comp_data

RATIO = 0.2
SEEDS = (0, 1, 2, 3, 4)
QUICK_SEEDS = (0, 1, 2)  # quick mode: 3 seeds per source keep the whole bench run under an hour


def measured_protocol(quick: bool) -> str:
    """What ``measure`` evaluates: the quick windows, or (full) the whole test set at the quick window length —
    ``common.eval_protocol(False)`` names 2048-token windows, which ``measure`` does not use."""
    return eval_protocol(True) if quick else f"whole test set, windows of {QUICK_SEQ_LEN} tokens"


def _log(message: str) -> None:
    print(f"[calibration] {message}", file=sys.stderr, flush=True)


def wikitext_split() -> str:
    """Which WikiText-2 split ``get_calibration("wikitext2")`` reads here: train, or validation when the local
    mirror has no train file (as in shared/data)."""
    root = comp_data.data_dir()
    if root is not None and comp_data._local_file_for("wikitext2", "train", root) is None \
            and comp_data._local_file_for("wikitext2", "validation", root) is not None:
        return "validation"
    return "train"


def sources(quick: bool) -> list[dict]:
    split = wikitext_split()
    seeds = QUICK_SEEDS if quick else SEEDS
    return [
        {"name": "c4", "label": "C4 train", "seeds": seeds},
        {"name": "wikitext2", "label": f"WikiText-2 {split}", "seeds": seeds, "split": split},
        {"name": comp_data.DATA_FREE, "label": "data-free (sampled from the model)", "seeds": seeds},
    ]


def run(quick: bool, out: Path) -> Section:
    shape = {"n_samples": CALIBRATION["n_samples"], "seq_len": CALIBRATION["seq_len"]}
    original_ppl = ppl(bundled().model, quick=quick)
    results = []
    for source in sources(quick):
        runs = []
        for seed in source["seeds"]:
            _log(f"{source['name']} seed {seed}")
            start = time.perf_counter()
            calibration(source["name"], shape["n_samples"], shape["seq_len"], seed)  # cached for measure
            sample_seconds = time.perf_counter() - start
            row = measure("comp", quick=quick, ratio=RATIO, calib={"name": source["name"], "seed": seed})
            runs.append({"seed": seed, "ppl": row["ppl"]["wikitext2"], "realised_ratio": row["realised_ratio"],
                         "removed_layers": row["removed_layers"], "prune_seconds": row["prune_seconds"],
                         "sample_seconds": sample_seconds})
        results.append({**source, "seeds": list(source["seeds"]), "runs": runs})
    return Section(name="calibration", title="Calibration sensitivity (COMP at 20 %)",
                   markdown=_markdown(results, quick, original_ppl), data={"sources": results,
                                                                           "original_ppl": original_ppl},
                   figures=save_figure(_figure(results, original_ppl), out, "calibration_spread"))


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, min(values), max(values))


def _markdown(results: list[dict], quick: bool, original_ppl: float) -> str:
    body = []
    for r in results:
        values = [run["ppl"] for run in r["runs"]]
        mean, std, low, high = _stats(values)
        removed = sorted({tuple(run["removed_layers"]) for run in r["runs"]})
        body.append([r["label"], f"`{r['name']}`", len(values), mean, std, low, high,
                     "; ".join(str(list(x)) for x in removed),
                     f"{statistics.fmean(run['sample_seconds'] for run in r['runs']):.1f}"])
    table = markdown_table(["calibration source", "name", "seeds", "ppl mean", "ppl std", "ppl min", "ppl max",
                            "removed blocks", "sampling s"], body)
    notes = []
    split = next(r.get("split") for r in results if r["name"] == "wikitext2")
    if split == "validation":
        notes.append("WikiText-2: the local mirror (COMP_DATA_DIR) has no train split, so `get_calibration"
                     "(\"wikitext2\")` reads the validation split (`wiki.valid.raw`); a separate "
                     "'WikiText-2 validation' source would be the same text, so it is not repeated. The perplexity "
                     "is measured on the test split, so calibration and evaluation never share text.")
    if quick:
        notes.append(f"Quick mode: {len(QUICK_SEEDS)} seeds per source; full runs take {len(SEEDS)}.")
    cal = CALIBRATION
    by_mean = sorted(results, key=lambda r: statistics.fmean(run["ppl"] for run in r["runs"]))
    spread = max(results, key=lambda r: _stats([run["ppl"] for run in r["runs"]])[1])
    return "\n\n".join([
        command_line("calibration", quick),
        f"COMP (default settings) at {RATIO:.0%} of all parameters on the bundled SmolLM2-135M-Instruct, each "
        f"seed a new sample of {cal['n_samples']}×{cal['seq_len']} tokens (C4: random windows of random train "
        "documents; WikiText-2: random windows of the joined split; data-free: top-k 50 sampling from the model "
        f"at temperature 1, starting at BOS). Original model: perplexity {original_ppl:.2f}. 'sampling s' = the "
        "time to draw one calibration set.",
        table,
        f"WikiText-2 perplexity: {measured_protocol(quick)}. Machine: {machine()}.",
        *notes,
        f"Lowest mean: {by_mean[0]['label']} ({statistics.fmean(run['ppl'] for run in by_mean[0]['runs']):.2f}); "
        f"largest seed-to-seed spread: {spread['label']} (std "
        f"{_stats([run['ppl'] for run in spread['runs']])[1]:.2f})."])


def _figure(results: list[dict], original_ppl: float) -> go.Figure:
    fig = go.Figure()
    for r in results:
        fig.add_box(y=[run["ppl"] for run in r["runs"]], name=r["label"], boxpoints="all", jitter=0.3,
                    pointpos=0, text=[f"seed {run['seed']}" for run in r["runs"]])
    fig.add_hline(y=original_ppl, line_dash="dot", annotation_text=f"original {original_ppl:.2f}")
    fig.update_layout(title=f"COMP at {RATIO:.0%}: WikiText-2 perplexity per calibration seed",
                      yaxis_title="perplexity", showlegend=False)
    return fig


if __name__ == "__main__":
    main_for(run)

"""COMP's default quality: every lever of issue 15 as a measured row, and the defaults that follow from them.

Every row is COMP on the bundled SmolLM2-135M-Instruct with the library's defaults except what the row names
(C4 calibration, seed 0): the calibration budget (samples × tokens), the compensation (the paper's mask
tuning, the full least-squares refit of the kept columns, or the blend between them whose ridge is chosen
per dense on held-out calibration sequences), removed layers, the neuron score (one-shot, or sequential OBS
with weight updates between removals), prunable denses, o_proj's inputs one column or one whole attention
unit (a KV group with its q/k/v rows) at a time, the split of a layer's budget, and the paper's own setting.
Columns: WikiText-2 perplexity (first 24 test windows of 512 tokens), prune seconds and peak RSS on this
machine, and which compensation the denses ended with.

    COMP_DATA_DIR=../shared/data python bench/levers.py --out bench-out

``LEVERS_KEEP_MEASURED=1`` measures only the rows the earlier ``<out>/levers.json`` lacks (a new lever) and
keeps the others, each row naming the commit it was measured at (``measured at``); without it every row is
measured again.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Section, bundled, git_revision, machine, main_for, markdown_table, measure, ppl  # noqa: E402

from comp_core.data import DEFAULT_CALIBRATION  # noqa: E402
from comp_core.methods.comp import PAPER_CALIBRATION, PAPER_SETTINGS  # noqa: E402

DEFAULT = DEFAULT_CALIBRATION
# (label, calibration n_samples × seq_len, COMP settings beyond the defaults)
ROWS = (
    ("paper's setting (`--paper`)", PAPER_CALIBRATION, dict(PAPER_SETTINGS)),
    ("default settings, paper's budget", PAPER_CALIBRATION, {}),
    ("default settings", (32, 512), {}),
    ("**default** (`prune --ratio 0.2`)", DEFAULT, {}),
    ("default settings, twice the budget", (128, 512), {}),
    ("compensation: mask tuning only", DEFAULT, {"refit": "never"}),
    ("compensation: full refit", DEFAULT, {"refit": "always"}),
    ("one removed layer first", DEFAULT, {"remove_layers": 1}),
    ("score: diagonal ‖W_j‖²‖X_j‖²", DEFAULT, {"score": "diag"}),
    ("selection: sequential OBS with updates", DEFAULT, {"score": "obs-greedy"}),
    ("o_proj inputs as whole KV groups", DEFAULT, {"o_granularity": "units"}),
    ("prunable denses: down only", DEFAULT, {"dense_kinds": ("down",)}),
    ("layer budget split: same share per dense", DEFAULT, {"allocation": "uniform"}),
)
AT_30 = (
    ("paper's setting (`--paper`)", PAPER_CALIBRATION, dict(PAPER_SETTINGS)),
    ("**default**", DEFAULT, {}),
    ("prunable denses: down only", DEFAULT, {"dense_kinds": ("down",)}),
    ("o_proj inputs as whole KV groups", DEFAULT, {"o_granularity": "units"}),
)


def _log(message: str) -> None:
    print(f"[levers] {message}", file=sys.stderr, flush=True)


def _row(ratio: float, label: str, shape: tuple[int, int], settings: dict) -> dict:
    _log(f"{ratio:.0%} {label} {shape[0]}×{shape[1]}")
    result = measure("comp", quick=True, calib={"n_samples": shape[0], "seq_len": shape[1]}, keep_model=True,
                     ratio=ratio, **settings)
    model = result.pop("model")
    del model
    return {**result, "ratio": ratio, "label": label, "calibration": f"{shape[0]}×{shape[1]}",
            "tokens": shape[0] * shape[1], "revision": git_revision()}


def _earlier_rows(out: Path) -> dict[tuple, dict]:
    """Rows of the earlier run in ``out`` by (ratio, label, calibration), each with the commit that measured it."""
    path = out / "levers.json"
    if os.environ.get("LEVERS_KEEP_MEASURED") != "1" or not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    revision = earlier.get("provenance", {}).get("revision", "?")
    return {(r["ratio"], r["label"], r["calibration"]): {"revision": revision, **r}
            for r in earlier.get("data", {}).get("rows", [])}


def run(quick: bool, out: Path) -> Section:  # noqa: ARG001 - the same rows in both modes
    original = ppl(bundled().model)
    kept = _earlier_rows(out)
    wanted = [(0.2, *r) for r in ROWS] + [(0.3, *r) for r in AT_30]
    rows = [kept.get((ratio, label, f"{shape[0]}×{shape[1]}")) or _row(ratio, label, shape, settings)
            for ratio, label, shape, settings in wanted]
    return Section(name="levers", title="COMP's default: the levers of its quality",
                   markdown=_markdown(rows, original), data={"rows": rows, "original_ppl": original})


def _shape(row: dict) -> str:
    cal = row["calibration"]
    return cal if isinstance(cal, str) else f"{cal['n_samples']}×{cal['seq_len']}"


def _markdown(rows: list[dict], original: float) -> str:
    head = ["ratio", "setting", "calibration", "tokens", "ppl wikitext2", "× original", "prune s",
            "peak RSS MB", "denses by compensation", "measured at"]
    body = [[f"{r['ratio']:.0%}", r["label"], _shape(r), r.get("tokens", 0), r["ppl"]["wikitext2"],
             f"{r['ppl']['wikitext2'] / original:.2f}", f"{r['prune_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
             r["extra"].get("compensation") or "—", f"`{r.get('revision', '?')}`"] for r in rows]
    best = min((r for r in rows if r["ratio"] == 0.2), key=lambda r: r["ppl"]["wikitext2"])
    return "\n\n".join([
        "`python bench/run_all.py --sections levers` (section `bench/levers.py`; not part of `--quick`)",
        "COMP at 20 % (and 30 %) with the library's defaults (64 × 512 C4 tokens, no removed layer, score "
        "`activation`, `refit=blend`: per dense, the ridge between mask tuning and the full refit that best "
        "predicts held-out calibration sequences; inputs of down and o pruned; bf16 autocast forwards where "
        "the CPU has native bf16) apart from what each row names. WikiText-2: first 24 test windows of 512 "
        f"tokens; original {original:.2f}; the target of issue 15 is ≤ 1.8 × ({1.8 * original:.1f}) at 20 % "
        f"and ≤ 3.0 × ({3.0 * original:.1f}) at 30 % within 120 s.",
        markdown_table(head, body),
        f"Best at 20 %: {best['label']} with {_shape(best)} tokens, {best['ppl']['wikitext2']:.2f} "
        f"({best['ppl']['wikitext2'] / original:.2f} ×) in {best['prune_seconds']:.0f} s. `measured at`: the "
        "commit each row was measured at (`LEVERS_KEEP_MEASURED=1` keeps earlier rows and measures only new ones; "
        "seconds marked 'beside other jobs' were taken while other processes shared the two cores, so only their "
        "perplexity compares). Peak RSS here is the "
        "benchmark process's, which also holds the unpruned model; `comp-explorer prune` alone holds one. "
        "Machine: " + machine() + "."])


if __name__ == "__main__":
    main_for(run)

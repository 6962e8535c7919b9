"""The papers' perplexity protocol once: the whole WikiText-2 and PTB test sets in windows of 2048 tokens, on
the original bundled model and on COMP at 20 % (default settings, the same calibration as every section).

The other sections use the quick protocol (the first 24 windows of 512 tokens) so that the whole bench stays
under an hour; this section shows how the two protocols relate. It takes about 25 minutes on 2 CPU cores, so
``run_all.py --quick`` leaves it out unless asked for (``--sections protocol``) and keeps its last result.

    COMP_DATA_DIR=../shared/data python bench/protocol.py --out bench-out
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CALIBRATION, FULL_SEQ_LEN, Section, bundled, eval_tokens, machine, main_for,  # noqa: E402
                    markdown_table, measure, ppl)

DATASETS = ("wikitext2", "ptb")
RATIO = 0.2


def _log(message: str) -> None:
    print(f"[protocol] {message}", file=sys.stderr, flush=True)


def _both_protocols(model) -> dict:
    out = {}
    for ds in DATASETS:
        start = time.perf_counter()
        full = ppl(model, ds, quick=False, full_seq_len=True)
        out[ds] = {"full": full, "quick": ppl(model, ds, quick=True), "full_seconds": time.perf_counter() - start}
    return out


def run(quick: bool, out: Path) -> Section:  # noqa: ARG001 - the protocol is the point; same in both modes
    _log("original")
    rows = [{"model": "original", "ppl": _both_protocols(bundled().model)}]
    _log(f"comp at {RATIO:.0%}")
    pruned = measure("comp", quick=True, datasets=(), keep_model=True, ratio=RATIO)
    rows.append({"model": f"COMP {RATIO:.0%} (realised {pruned['realised_ratio']:.2%})",
                 "ppl": _both_protocols(pruned.pop("model"))})
    windows = {ds: -(-(eval_tokens(ds).numel() - 1) // FULL_SEQ_LEN) for ds in DATASETS}
    head = ["model"] + [f"{ds} {label}" for ds in DATASETS for label in ("whole test, 2048", "first 24 × 512")]
    body = [[r["model"]] + [r["ppl"][ds][k] for ds in DATASETS for k in ("full", "quick")] for r in rows]
    ratio_line = "; ".join(
        f"{ds}: pruned/original {rows[1]['ppl'][ds]['full'] / rows[0]['ppl'][ds]['full']:.2f}× (whole test) vs "
        f"{rows[1]['ppl'][ds]['quick'] / rows[0]['ppl'][ds]['quick']:.2f}× (quick)" for ds in DATASETS)
    cal = CALIBRATION
    markdown = "\n\n".join([
        "`python bench/run_all.py --sections protocol` (section `bench/protocol.py`; not part of `--quick`)",
        f"Perplexity over the whole test sets in non-overlapping windows of {FULL_SEQ_LEN} tokens (WikiText-2 "
        f"{windows['wikitext2']} windows, PTB {windows['ptb']}), the protocol of the COMP, SparseGPT, Wanda, RIA "
        f"and FLAP papers, next to the bench's quick protocol. COMP: default settings, calibration {cal['name']} "
        f"{cal['n_samples']}×{cal['seq_len']} tokens, seed {cal['seed']}.",
        markdown_table(head, body),
        f"How much worse the pruned model is depends on the protocol: {ratio_line}. Machine: {machine()}."])
    return Section(name="protocol", title="The papers' protocol: whole test sets at 2048 tokens",
                   markdown=markdown, data={"rows": rows, "windows": windows})


if __name__ == "__main__":
    main_for(run)

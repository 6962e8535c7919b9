"""What Analyse costs against the prune it plans: the GUI's Analyse (a private copy, ``analyze_nearest`` with
``fit=False``: the cuts decided, no compensation fitted, the statistics read in the capture forward when no
block is removed) against ``prune`` with the same settings, at the paper's calibration budget and the default.

    COMP_DATA_DIR=../shared/data python bench/analyse_cost.py --quick --out bench-out

The goal of issue 31: Analyse ≤ 1.2 × the prune, and ≤ 60 s at the default calibration on a quiet 2-core
machine. The load average at the start and the end of each point is printed beside it: a busy machine makes
every number larger, the ratio less so (both runs see the same load only if it holds still).
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Section, bundled, calibration, command_line, machine, main_for, markdown_table  # noqa: E402

from comp_core.methods.comp import CompConfig, prune  # noqa: E402
from comp_core.methods.comp.run import analyze, one_pass_blocks  # noqa: E402
from comp_core.methods.comp.whatif import analyze_nearest  # noqa: E402
from comp_core.runtime import RssSampler  # noqa: E402

RATIO = 0.2
POINTS = [(10, 128), (64, 512)]  # the paper's budget (the measurement) and the library's default
OLD_DEPTH = 4  # what the GUI's Analyse measured before issue 31: fitted, the removal order four deep


def _load() -> float:
    return os.getloadavg()[0]


def _timed(run) -> dict:
    load = _load()
    with RssSampler() as rss:
        start = time.perf_counter()
        plan = run()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "stages": {k: round(v, 2) for k, v in plan.timings.items()},
            "peak_rss_mb": rss.peak_mb, "load": (round(load, 2), round(_load(), 2))}


def measure_point(n_samples: int, seq_len: int, *, with_old: bool) -> dict:
    model = bundled().model
    samples = calibration("c4", n_samples, seq_len, 0)
    cfg = CompConfig(ratio=RATIO, remove_layers=0)  # what the GUI's controls send ("min" is 0 on this model)
    out = {"calibration": f"{n_samples}×{seq_len}", "one_pass": one_pass_blocks(model, cfg) is not None}
    out["analyse"] = _timed(lambda: analyze_nearest(copy.deepcopy(model), samples, cfg, 0, fit=False)[0])
    out["prune"] = _timed(lambda: prune(model, samples, CompConfig(ratio=RATIO))[1].plan)
    if with_old:
        out["analyse_before"] = _timed(lambda: analyze(copy.deepcopy(model), samples, cfg,
                                                       removal_depth=OLD_DEPTH))
    return out


def run(quick: bool, out: Path) -> Section:
    rows, data = [], []
    for n_samples, seq_len in POINTS:
        point = measure_point(n_samples, seq_len, with_old=(n_samples, seq_len) == POINTS[0] or not quick)
        data.append(point)
        print(point, file=sys.stderr, flush=True)
        a, p = point["analyse"], point["prune"]
        old = point.get("analyse_before")
        rows.append([point["calibration"], f"{a['seconds']:.1f}", f"{p['seconds']:.1f}",
                     f"{a['seconds'] / p['seconds']:.2f}", f"{old['seconds']:.1f}" if old else "—",
                     " · ".join(f"{k} {v:.1f}" for k, v in a["stages"].items()),
                     " · ".join(f"{k} {v:.1f}" for k, v in p["stages"].items()),
                     f"{a['peak_rss_mb']:,.0f} / {p['peak_rss_mb']:,.0f}",
                     f"{a['load'][0]:.1f}→{p['load'][1]:.1f}"])
    table = markdown_table(["calibration", "Analyse s", "Prune s", "Analyse / Prune", "Analyse before s",
                            "Analyse stages s", "Prune stages s", "peak RSS MB (A / P)", "load avg"], rows)
    markdown = (f"{command_line('analyse_cost', quick)}\n\nCOMP at {RATIO:.0%} on the bundled SmolLM2-135M-Instruct "
                "(C4 calibration, seed 0). **Analyse**: the GUI's path — a private copy, the cuts decided without "
                "fitting the kept weights, the neuron statistics read in the capture forward (no block is "
                "removed at this ratio), the removal order measured only as deep as the plan (a what-if past it "
                "measures more on demand). **Prune**: `prune` with the library's defaults (the same plan, plus "
                "the compensation). **Analyse before**: what the GUI ran before issue 31 (fitted, removal order "
                f"measured {OLD_DEPTH} deep).\n\n{table}\n\nMachine: {machine()}.")
    return Section(name="analyse_cost", title="Analyse against Prune", markdown=markdown, data={"points": data})


if __name__ == "__main__":
    main_for(run)

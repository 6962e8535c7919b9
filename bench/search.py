"""One-shot against searched per-layer allocation (``allocation="search"``), and Prune&Comp's rescale of removed
layers, on the bundled SmolLM2-135M-Instruct.

    COMP_DATA_DIR=../shared/data python bench/search.py --quick --out bench-out

* **Allocation**: COMP and Wanda-sp+mask and FLAP at 20 / 30 / 40 % (structured), SparseGPT at 50 / 60 % (masks),
  each with its own one-shot rule and with the search at the default budget. Both arms prune with the same
  calibration sequences; the searched run is given ``held_out_count(n)`` more of the same source (C4, the same
  seeded draw extended), which its split holds out for the fitness. COMP on 64 × 512
  C4 tokens (its default calibration, the one its 58.6 at 20 % was measured on); the other methods on the
  quality bench's 10 × 128 (where their RESULTS.md rows were measured), SparseGPT also on 64 × 512 at 50 %.
* **Prune&Comp**: comp-layers and ShortGPT removing 4 and 8 layers, ``layer_rescale`` off and on (10 × 128).

Each point is appended to ``search_points.jsonl`` under ``--out`` as it finishes; a rerun skips the points
already there (delete the file to measure again). Perplexity: WikiText-2 test, first 24 windows of 512 tokens.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Section, bundled, calibration, command_line, machine, main_for, markdown_table, ppl  # noqa: E402

import torch  # noqa: E402

from comp_core.methods import prune_with  # noqa: E402
from comp_core.methods.search.settings import SearchSettings  # noqa: E402
from comp_core.runtime import count_parameters  # noqa: E402

ORIGINAL_PPL = None  # measured once per process

# (method, the setting's value, calibration (n, seq_len)); ratio for structured, sparsity for masks
# in the order they are measured: COMP's goals first, the 40 % and the larger SparseGPT calibration last
ALLOCATION_POINTS = (
    [("comp", r, (64, 512)) for r in (0.2, 0.3)]
    + [("wanda-sp+mask", r, (10, 128)) for r in (0.2, 0.3, 0.4)]
    + [("flap", r, (10, 128)) for r in (0.2, 0.3, 0.4)]
    + [("sparsegpt", s, (10, 128)) for s in ("0.5", "0.6")]
    + [("comp", 0.4, (64, 512)), ("sparsegpt", "0.5", (64, 512))]
)
RESCALE_POINTS = [(m, n) for m in ("comp-layers", "shortgpt") for n in (4, 8)]
# stop measuring new points after this many minutes (the table then shows the points measured so far and
# names the rest); unset: measure every point
BUDGET_MINUTES = float(os.environ.get("SEARCH_BENCH_MINUTES", "inf"))
START = time.perf_counter()
# measure only these methods (comma-separated; unset: all), e.g. to spread the points over two processes
ONLY = {m for m in os.environ.get("SEARCH_BENCH_ONLY", "").split(",") if m}


def _in_budget(method: str) -> bool:
    return (time.perf_counter() - START) / 60 < BUDGET_MINUTES and (not ONLY or method in ONLY)


def _points_file(out: Path) -> Path:
    return out / "search_points.jsonl"


def _done(out: Path) -> dict[str, dict]:
    path = _points_file(out)
    if not path.exists():
        return {}
    return {p["key"]: p for p in map(json.loads, path.read_text().splitlines()) if p.get("key")}


def _record(out: Path, point: dict) -> None:
    with _points_file(out).open("a") as handle:
        handle.write(json.dumps(point) + "\n")
    print(point, file=sys.stderr, flush=True)


def _setting(method: str, value) -> dict:
    return {"sparsity": value} if isinstance(value, str) else {"ratio": value}


def _run(method: str, samples, **settings) -> dict:
    model = bundled().model
    load = os.getloadavg()[0]
    start = time.perf_counter()
    pruned, result = prune_with(method, model, samples, **settings)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "ppl": ppl(pruned), "realised": result.realised_ratio,
           "zero_share": result.extra.get("zero_share") if result.extra else None,
           "linear_sparsity": result.extra.get("linear_sparsity") if result.extra else None,
           "load": (round(load, 2), round(os.getloadavg()[0], 2)), "layer_ratios": result.plan.layer_ratios,
           "removed_layers": result.plan.removed_layers,
           "layer_scales": getattr(result.plan, "layer_scales", {}) or {}}
    record = result.plan.search
    if record is not None:
        out["search"] = record.to_dict()
    del pruned
    return out


def held_out_count(n: int, holdout: int = SearchSettings.search_holdout) -> int:
    """How many sequences to draw beyond ``n`` so that the searched run's split (``split_holdout``: at most
    ``holdout``, at most a quarter) holds out exactly those and calibrates on the same ``n`` as the one-shot run."""
    return next(k for k in range(holdout, 0, -1) if min(holdout, (n + k) // 4) == k)


def _key(method: str, value, n: int, seq_len: int) -> str:
    return f"allocation/{method}/{value}/{n}x{seq_len}+{held_out_count(n)}"


def measure_allocation(out: Path, done: dict) -> list[dict]:
    points = []
    for method, value, (n, seq_len) in ALLOCATION_POINTS:
        key = _key(method, value, n, seq_len)
        if key not in done and not _in_budget(method):
            continue
        if key not in done:
            k = held_out_count(n)
            samples = calibration("c4", n, seq_len, 0)
            with_held_out = calibration("c4", n + k, seq_len, 0)
            assert torch.equal(with_held_out[:n], samples), "the calibration draw must extend as a prefix"
            point = {"key": key, "method": method, "value": value, "calibration": f"{n}×{seq_len}",
                     "held_out": k,
                     "one_shot": _run(method, samples, **_setting(method, value)),
                     "searched": _run(method, with_held_out, allocation="search", **_setting(method, value))}
            _record(out, point)
            done[key] = point
        points.append(done[key])
    return points


def measure_rescale(out: Path, done: dict) -> list[dict]:
    points = []
    model = bundled().model
    samples = calibration()
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    for method, n_layers in RESCALE_POINTS:
        key = f"rescale/{method}/{n_layers}"
        if key not in done and not _in_budget(method):
            continue
        if key not in done:
            # comp-layers removes as many blocks as the ratio holds; ShortGPT takes the count itself
            settings = ({"ratio": (n_layers * block + 0.4 * block) / count_parameters(model)}
                        if method == "comp-layers" else {"n_layers": n_layers})
            point = {"key": key, "method": method, "n_layers": n_layers,
                     "off": _run(method, samples, layer_rescale=False, **settings),
                     "on": _run(method, samples, layer_rescale=True, **settings)}
            _record(out, point)
            done[key] = point
        points.append(done[key])
    return points


def _gain(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}"


def run(quick: bool, out: Path) -> Section:
    done = _done(out)
    original = ppl(bundled().model)
    rescale = measure_rescale(out, done)  # minutes: first, so a budget always leaves them in
    allocation = measure_allocation(out, done)
    missing = [f"{m} {v} ({n}×{q})" for m, v, (n, q) in ALLOCATION_POINTS if _key(m, v, n, q) not in done]
    rows = []
    for p in allocation:
        one, searched = p["one_shot"], p["searched"]
        s = searched["search"]
        target = f"{p['value']:.0%}" if isinstance(p["value"], float) else f"{float(p['value']):.0%} (masks)"
        realised = (lambda r: f"{r['realised']:.1%}") if isinstance(p["value"], float) else (
            lambda r: f"{r['linear_sparsity']:.1%}")
        rows.append([p["method"], target, p["calibration"], f"{one['ppl']:.2f} ({one['ppl'] / original:.2f}×)",
                     f"{searched['ppl']:.2f} ({searched['ppl'] / original:.2f}×)", _gain(one["ppl"], searched["ppl"]),
                     f"{realised(one)} / {realised(searched)}",
                     f"{s['start_kl']:.4f} → {s['final_kl']:.4f}" + ("" if s["improved"] else " (kept one-shot)"),
                     f"{s['generations']}", f"{searched['seconds']:.0f} ({s['database_seconds']:.0f} + "
                                            f"{s['search_seconds']:.0f})",
                     f"{one['seconds']:.0f}", f"{s['database_mb']:,.0f}",
                     f"{searched['load'][0]:.1f}→{searched['load'][1]:.1f}"])
    short = [f"{p['method']} at {p['value']:.0%}" for p in allocation if isinstance(p["value"], float)
             and p["one_shot"]["realised"] - p["searched"]["realised"] > 0.003]
    allocation_table = markdown_table(
        ["method", "target", "calibration", "one-shot ppl", "searched ppl", "change", "realised (1-shot / search)",
         "held-out KL (start → searched)", "generations", "searched s (database + search)", "one-shot s",
         "database MB", "load avg"], rows)
    rescale_rows = []
    for p in rescale:
        off, on = p["off"], p["on"]
        rescale_rows.append([p["method"], str(p["n_layers"]), ", ".join(map(str, off["removed_layers"])),
                             f"{off['ppl']:.2f}", f"{on['ppl']:.2f}", _gain(off["ppl"], on["ppl"]),
                             ", ".join(f"{float(v):.3f}" for _, v in sorted(on["layer_scales"].items(),
                                                                            key=lambda kv: int(kv[0])))])
    rescale_table = markdown_table(["method", "layers removed", "which (off)", "ppl off", "ppl on (Prune&Comp)",
                                    "change", "scales"], rescale_rows)
    markdown = (
        f"{command_line('search', quick)}\n\nBundled SmolLM2-135M-Instruct, original perplexity {original:.2f} "
        "(WikiText-2 test, first 24 windows of 512 tokens); C4 calibration, seed 0.\n\n"
        "**One-shot against searched per-layer allocation** (`allocation=search` at the default budget: "
        "levels of 2.5 % of a layer, 3 each side of the one-shot share, 40 generations of 8 offspring, stages "
        "of 256 and 1024 held-out tokens; fitness: KL divergence to the original's next-token distribution on "
        "held-out calibration sequences, never the evaluation text). Both runs prune with the same calibration "
        "sequences; the searched run also reads held-out sequences of the same source for its fitness (8 at "
        "64 × 512, 3 at 10 × 128: as EvoPress, the search's text is not the database's), and its database "
        "prunes every layer on the original's inputs. Searched seconds include everything (capture, database, search, the final "
        "comparison); the load average beside them says whether the 2-core machine was shared (2.0 = both "
        "cores busy with this run alone).\n\n"
        f"{allocation_table}\n\n"
        + (f"Not measured in this run (time budget): {', '.join(missing)}.\n\n" if missing else "")
        + (f"**Not at the same size:** {', '.join(short)} — the searched run realised over 0.3 points less than "
           "the one-shot run: its perplexity gain is partly a smaller cut.\n\n" if short else "") +
        "**Prune&Comp** (`layer_rescale`): the residual stream where a layer was removed is multiplied by the "
        "mean ratio of the removed layer's output to input magnitude, folded into the later layers' output "
        "projections; comp-layers also re-ranks the remaining layers on the rescaled stream (iterative), "
        "ShortGPT keeps its one-shot choice. Calibration 10 × 128.\n\n"
        f"{rescale_table}\n\nMachine: {machine()}.")
    return Section(name="search", title="Searched allocation and Prune&Comp", markdown=markdown,
                   data={"original_ppl": original, "allocation": allocation, "rescale": rescale})


if __name__ == "__main__":
    main_for(run)

"""Perplexity table of COMP vs layer-only vs neuron-only pruning on one model (default: the bundled one).

    COMP_DATA_DIR=../shared/data python bench/comp_table.py --ratios 0.2,0.25,0.3 --max-windows 24
    COMP_DATA_DIR=../shared/data python bench/comp_table.py --ratios 0.2 --configs comp --full   # full test, seqlen 2048

Each row prunes a fresh copy of the model; columns: realised ratio, prune seconds, perplexity.
Prints a Markdown table (and, with --json, one JSON line per row).
"""
from __future__ import annotations

import argparse
import json
import time

from comp_core import CompConfig, get_calibration, get_eval_tokens, load_model, perplexity, prune
from comp_core.runtime import configure_threads, peak_rss_mb

CONFIGS = {
    "comp": {},
    "layers-only": {"granularity": "layers"},
    "neurons-only": {"granularity": "neurons"},
}


def parse_overrides(text: str) -> dict:
    """'score=obs,remove_layers=2' → dict with ints/floats/None/tuples parsed."""
    out = {}
    for item in filter(None, text.split(";")):
        key, value = item.split("=", 1)
        out[key] = eval(value, {}, {})  # bench-only convenience: values are Python literals
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--ratios", default="0.2,0.25,0.3")
    p.add_argument("--configs", default="comp,layers-only,neurons-only")
    p.add_argument("--set", default="", help="overrides for every run, e.g. \"score='obs';remove_layers=2\"")
    p.add_argument("--max-windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--full", action="store_true", help="whole test set at seqlen 2048 (slow on CPU)")
    p.add_argument("--n-samples", type=int, default=10)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    configure_threads()
    if args.full:
        args.max_windows, args.seq_len = None, 2048

    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    tokens = get_eval_tokens("wikitext2", tok)
    samples = get_calibration("c4", tok, args.n_samples, args.calib_len, 0)
    base = perplexity(model, tokens, args.seq_len, max_windows=args.max_windows)
    rows = [("original", 0.0, 0.0, base.ppl, "")]
    overrides = parse_overrides(args.set)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name in args.configs.split(","):
            cfg = CompConfig(ratio=ratio, **{**CONFIGS[name], **overrides})
            t0 = time.perf_counter()
            pruned, result = prune(model, samples, cfg)
            seconds = time.perf_counter() - t0
            ppl = perplexity(pruned, tokens, args.seq_len, max_windows=args.max_windows).ppl
            detail = f"removed {result.plan.removed_layers}"
            rows.append((f"{name} @ {ratio:.2f}", result.realised_ratio, seconds, ppl, detail))
            if args.json:
                print(json.dumps({"config": name, "target": ratio, "realised_ratio": result.realised_ratio,
                                  "seconds": seconds, "ppl": ppl, "removed_layers": result.plan.removed_layers}),
                      flush=True)
            del pruned
    windows = "all" if args.max_windows is None else args.max_windows
    print(f"\nWikiText-2 test, {windows} windows × {args.seq_len}; calibration c4 {args.n_samples}×{args.calib_len}; "
          f"overrides {overrides or '-'}; peak RSS {peak_rss_mb():.0f} MB")
    print("| run | realised ratio | prune s | perplexity | notes |\n|---|---|---|---|---|")
    for name, ratio, seconds, ppl, detail in rows:
        print(f"| {name} | {ratio:.2%} | {seconds:.1f} | {ppl:.2f} | {detail} |")


if __name__ == "__main__":
    main()

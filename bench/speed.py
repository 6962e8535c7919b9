"""Original vs COMP-pruned model: parameters, bytes on disk, load memory, prefill latency, decode throughput.

    COMP_DATA_DIR=../shared/data python bench/speed.py                      # bundled SmolLM2-135M, 20 %, CPU
    COMP_DATA_DIR=../shared/data python bench/speed.py --threads 1 --ablation
    python bench/speed.py --original-dir /tmp/orig --pruned-dir /tmp/p20   # reuse saved folders, skip pruning

Prunes the model with COMP (default ``ratio=0.2, remove_layers=1, dense_kinds=down,o``), saves both models with
``save_pruned`` (into ``--out-dir``, or a temporary folder), measures them with ``compare_speed`` (runs
alternate between the two models; median [min–max] of ``--repeats`` runs) and prints a Markdown table.
``--ablation`` adds the pruned model with every IndexedInputLinear expanded to a zero-padded full-width
weight (same outputs, more parameters), to compare index-select against padding.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from comp_core import CompConfig, get_calibration, load_model, prune
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.runtime import configure_threads
from comp_core.evaluate.speed import compare_speed, measure_interleaved, pad_indexed_linears


def _kinds(text: str):
    return None if text == "all" else tuple(t for t in text.split(",") if t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder / id / .gguf; default: the bundled SmolLM2-135M")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--remove-layers", type=int, default=1)
    p.add_argument("--dense-kinds", default="down,o", help="comma-separated kinds or 'all'")
    p.add_argument("--original-dir", default=None, help="saved original folder (skips loading --model)")
    p.add_argument("--pruned-dir", default=None, help="saved pruned folder (skips pruning)")
    p.add_argument("--out-dir", default=None, help="keep the saved folders here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all available)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--ablation", action="store_true", help="also time the zero-padded variant of the pruned model")
    p.add_argument("--json", action="store_true", help="also print the full measurements as one JSON line")
    args = p.parse_args()
    threads = configure_threads(args.threads)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    timing = {"prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens, "batch_sizes": batch_sizes,
                  "repeats": args.repeats}

    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        out = Path(args.out_dir or tmp)
        original_dir, pruned_dir = args.original_dir, args.pruned_dir
        if original_dir is None or pruned_dir is None:
            loaded = load_model(args.model)
            if original_dir is None:
                original_dir = save_pruned(loaded.model, loaded.tokenizer, out / "original", overwrite=True)
            if pruned_dir is None:
                samples = get_calibration("c4", loaded.tokenizer, 10, 128, 0)
                cfg = CompConfig(ratio=args.ratio, remove_layers=args.remove_layers,
                                 dense_kinds=_kinds(args.dense_kinds))
                start = time.perf_counter()
                pruned, result = prune(loaded.model, samples, cfg)
                print(f"pruned in {time.perf_counter() - start:.0f} s: realised ratio {result.realised_ratio:.4f}, "
                      f"removed layers {result.plan.removed_layers}")
                pruned_dir = save_pruned(pruned, loaded.tokenizer, out / "pruned", result, overwrite=True)
                del pruned
            del loaded
        comparison = compare_speed(original_dir, pruned_dir, device=args.device, **timing)
        print(f"\n## original vs pruned ({threads} threads)\n")
        print(comparison.to_markdown())
        if args.json:
            print(json.dumps(comparison.to_dict()))

        if args.ablation:
            indexed, _ = load_pruned(pruned_dir, device=args.device)
            padded = pad_indexed_linears(copy.deepcopy(indexed))
            reports = measure_interleaved({"index-select": indexed, "zero-padded": padded}, **timing)
            print(f"\n## IndexedInputLinear vs zero-padded weights ({threads} threads)\n")
            print("| variant | parameters held | prefill ms | " +
                  " | ".join(f"decode b{b} tok/s | b{b} tok per CPU-s" for b in batch_sizes) + " |")
            print("|---|---|---|" + "---|---|" * len(batch_sizes))
            for label, r in reports.items():
                cells = " | ".join(f"{r.decode_tps[b]} | {r.decode_cpu_tps[b]}" for b in batch_sizes)
                print(f"| {label} | {r.params:,} | {r.prefill_ms} | {cells} |")
            if args.json:
                print(json.dumps({k: v.to_dict() for k, v in reports.items()}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()

"""Streaming benchmark: prune a random Llama larger than the memory it may use, and report the peak.

    python bench/streaming.py                      # 1.57 B parameters (6.3 GB in float32), CPU
    python bench/streaming.py --preset llama2-7b --device cuda   # LLaMA-2-7B's shape on a GPU

Writes a random-weight Llama shard by shard (``comp_core.models.synthetic``) into a temporary folder, then runs the
CLI in a child process exactly as a user would — ``comp-explorer prune --stream on --ratio 0.2 … --eval
sample --out …`` — and reads that process's own peak RSS (VmHWM) and, on a GPU, torch's CUDA peak. The
target of issue 17: peak RSS ≤ 1/3 of the model's bytes. Prints a markdown table and stores the JSON in
docs/results/streaming.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from comp_core.models.synthetic import RandomLlama, write_random_llama  # noqa: E402

PRESETS = {
    # 1.51 B, LLaMA's MLP ratio (2.75), deep rather than wide: the peak is one block's statistics (d_ff² float64
    # matrices), not the depth, so this is the shape that shows the bound (measured: docs/results/streaming.json)
    "1.5b": RandomLlama(hidden=1024, intermediate=2816, layers=131, heads=16, kv_heads=4, vocab=32000),
    # 1.57 B, wider: a 4096² down_proj Gram; one block's statistics then weigh ~1.5 GB
    "1.5b-wide": RandomLlama(hidden=2048, intermediate=4096, layers=42, heads=16, kv_heads=4, vocab=32000),
    "smoke": RandomLlama(hidden=256, intermediate=512, layers=8, heads=4, kv_heads=2, vocab=1024),
    "llama2-7b": RandomLlama(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                             tie_embeddings=False, max_positions=4096),
}


def run(preset: str, device: str, n_samples: int, seq_len: int, windows: int, workdir: Path, keep: bool) -> dict:
    from tiny_tokenizer import make_tiny_tokenizer

    shape = PRESETS[preset]
    model_dir, out_dir = workdir / "model", workdir / "pruned"
    t0 = time.perf_counter()
    if (model_dir / "config.json").is_file():  # a kept earlier run's model (--keep): the same seeded weights
        if json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] != shape.layers:
            raise SystemExit(f"{model_dir} holds another model; remove it or choose another --dir")
    else:
        write_random_llama(model_dir, shape)
        make_tiny_tokenizer().save_pretrained(model_dir)  # 512 tokens: any vocabulary of the random model fits
    shutil.rmtree(out_dir, ignore_errors=True)
    write_s = time.perf_counter() - t0
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    command = [sys.executable, "-m", "comp_core.cli", "prune", "--model", str(model_dir), "--stream", "on",
               "--device", device, "--ratio", "0.2", "--calib", "sample", "--n-samples", str(n_samples),
               "--seq-len", str(seq_len), "--eval", "sample", "--max-windows", str(windows),
               "--eval-seq-len", str(seq_len), "--out", str(out_dir), "--json", "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"prune failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    saved = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    row = {
        "preset": preset, "device": device, "params": shape.params, "model_bytes": model_bytes,
        "calibration": f"{n_samples}×{seq_len}", "eval_windows": windows,
        "peak_rss_mb": report["peak_rss_mb"], "cuda_peak_mb": report.get("cuda_peak_mb"),
        "peak_share_of_model": report["peak_rss_mb"] * 2**20 / model_bytes,
        "wall_s": wall, "write_s": write_s, "stages": {k: v["seconds"] for k, v in report["timings"].items()},
        "realised_ratio": report["realised_ratio"], "saved_bytes": saved,
        "ppl_before": report["ppl_before"]["sample"], "ppl_after": report["ppl_after"]["sample"],
        "streaming": report.get("streaming"), "load_average": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | params | weights | device | calibration | peak RSS | peak / weights | CUDA peak | prune + eval + save | realised |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cuda = f"{r['cuda_peak_mb'] / 1024:.2f} GiB" if r.get("cuda_peak_mb") else "—"
        lines.append(f"| random Llama ({r['preset']}) | {r['params'] / 1e9:.2f} B | {r['model_bytes'] / 2**30:.2f} GiB "
                     f"| {r['device']} | {r['calibration']} | {r['peak_rss_mb'] / 1024:.2f} GiB "
                     f"| {r['peak_share_of_model']:.1%} | {cuda} | {r['wall_s']:.0f} s | {r['realised_ratio']:.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.5b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one; needs ~2.2× the model)")
    parser.add_argument("--keep", action="store_true", help="keep the random model and the pruned folder")
    args = parser.parse_args()
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="comp-stream-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    row = run(args.preset, args.device, args.n_samples, args.seq_len, args.windows, workdir, args.keep)
    out = ROOT / "docs" / "results" / "streaming.json"
    rows = [r for r in (json.loads(out.read_text()) if out.exists() else [])
            if (r["preset"], r["device"]) != (row["preset"], row["device"])] + [row]
    out.write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

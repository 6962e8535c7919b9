"""Original vs COMP-pruned model in llama.cpp: file bytes, weights in the file, load RSS, prompt-processing and
generation tokens/s on N threads, and WikiText-2 perplexity computed by llama.cpp itself.

    COMP_DATA_DIR=../shared/data python bench/gguf_speed.py --pruned-dir /tmp/pruned20   # a folder from `prune --out`
    COMP_DATA_DIR=../shared/data python bench/gguf_speed.py --ratio 0.2                  # prune the bundled model first

Writes (into ``--out-dir``, default a temporary folder) the unpruned bundled model as f16 and q8_0 GGUF with
``comp_core.export.gguf`` (from the same HF weights the pruning starts from), the pruned model as f16, q8_0
and as q8_0 with every FFN width rounded up to 32 (``ff_multiple=32``: zero channels, so every down_proj is
q8_0), and measures those five plus the bundled Q4_1 file for reference. Every measurement runs in its own Python
process (``llama-cpp-python``): load RSS is that process's resident memory after loading and one 4-token
evaluation, above its RSS after the imports (``comp_core.runtime`` readers); prompt processing times one
``--prompt-tokens`` evaluation, generation ``--gen-tokens`` single-token greedy steps after a 16-token prompt.
Runs alternate between the files, ``--repeats`` rounds; the table gives the best run (min–max): on a shared
machine another process can only slow a run down. The 1-minute load average is recorded before every run and
printed with the table: the figures are only comparable on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gguf_speed.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

# The child: one llama.cpp model in a fresh process. argv: path threads prompt_tokens gen_tokens [ppl_file seq_len]
_CHILD = r"""
import json, sys, time
import numpy as np
from comp_core.runtime import current_rss_mb, peak_rss_mb
import llama_cpp

path, threads, prompt_tokens, gen_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ppl_file = sys.argv[5] if len(sys.argv) > 5 else None
base = current_rss_mb()
start = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=max(prompt_tokens + gen_tokens + 32, 1024), n_batch=512,
                      n_threads=threads, n_threads_batch=threads, logits_all=ppl_file is not None, verbose=False)
llm.eval([1, 2, 3, 4])  # weights are memory-mapped: an evaluation makes them resident
out = {"load_s": time.perf_counter() - start, "load_rss_mb": current_rss_mb() - base,
       "load_peak_rss_mb": peak_rss_mb() - base}
vocab = llm.n_vocab()
rng = np.random.default_rng(0)
if ppl_file is None:
    prompt = rng.integers(100, vocab, prompt_tokens).tolist()
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    out["pp_tps"] = prompt_tokens / (time.perf_counter() - t)
    llm.reset()
    llm.eval(prompt[:16])
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(gen_tokens):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    out["tg_tps"] = gen_tokens / (time.perf_counter() - t)
else:
    windows = json.load(open(ppl_file))
    nll, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)  # (L-1, vocab)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        count += len(ids) - 1
    out["ppl"] = float(np.exp(nll / count))
llm.close()
print(json.dumps(out))
"""


def run_child(path: Path, threads: int, prompt_tokens: int, gen_tokens: int, ppl_file: Path | None = None) -> dict:
    """One measurement of ``path`` in a fresh process, with the 1-minute load average before it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-c", _CHILD, str(path), str(threads), str(prompt_tokens), str(gen_tokens)]
    if ppl_file is not None:
        argv.append(str(ppl_file))
    load = os.getloadavg()[0]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "loadavg": load}


def write_files(out: Path, pruned_dir: Path | None, ratio: float) -> tuple[dict[str, Path], dict[str, dict]]:
    """The five GGUF files (label -> path) and the export reports of the four written here."""
    from comp_core import CompConfig, count_parameters, get_calibration, load_model, prune
    from comp_core.export.folder import save_pruned
    from comp_core.export.gguf import export_gguf, export_gguf_folder
    from comp_core.models.loading import bundled_gguf_path

    source = bundled_gguf_path()
    files = {"original Q4_1 (bundled file)": source}
    reports: dict[str, dict] = {}
    loaded = load_model()
    original_params = count_parameters(loaded.model)
    for kind in ("f16", "q8_0"):
        path = out / f"original-{kind}.gguf"
        reports[f"original {kind}"] = export_gguf(loaded.model, path, file_type=kind, source_gguf=source,
                                                  params_original=original_params, overwrite=True).to_dict()
        files[f"original {kind}"] = path
    if pruned_dir is None:
        samples = get_calibration("c4", loaded.tokenizer)
        pruned, result = prune(loaded.model, samples, CompConfig(ratio=ratio), inplace=True)
        pruned_dir = save_pruned(pruned, loaded.tokenizer, out / "pruned", result, source=loaded.source,
                                 overwrite=True)
        del pruned
    del loaded
    for kind, multiple in (("f16", 1), ("q8_0", 1), ("q8_0", 32)):
        label = f"pruned {kind}" + (f", FFN widths ×{multiple}" if multiple > 1 else "")
        path = out / (f"pruned-{kind}" + (f"-ff{multiple}" if multiple > 1 else "") + ".gguf")
        reports[label] = export_gguf_folder(pruned_dir, path, file_type=kind, source_gguf=source,
                                            ff_multiple=multiple, overwrite=True).to_dict()
        files[label] = path
    return files, reports


def gguf_params(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(path).tensors)


def ppl_windows(out: Path, n_windows: int, seq_len: int) -> Path:
    """The first ``n_windows`` WikiText-2 test windows of ``seq_len`` tokens (the torch perplexity's chunks)."""
    from comp_core import get_eval_tokens, load_model

    tokens = get_eval_tokens("wikitext2", load_model().tokenizer)[0]
    windows = [tokens[i * seq_len:(i + 1) * seq_len].tolist() for i in range(min(n_windows, tokens.numel() // seq_len))]
    path = out / "ppl_windows.json"
    path.write_text(json.dumps(windows))
    return path


def _best(values: list[float], higher: bool = True) -> str:
    """Best run (and the range): another process on the machine can only slow a run down or grow nothing."""
    if not values:
        return "—"
    best = max(values) if higher else min(values)
    return f"{best:,.1f}" if len(values) == 1 else f"{best:,.1f} ({min(values):,.1f}–{max(values):,.1f})"


def table(files: dict[str, Path], runs: dict[str, list[dict]], ppl: dict[str, float], params: dict[str, int],
          original_params: int) -> str:
    rows = ["| model | file MB | weights in file | share of original | load RSS MiB | prompt tok/s | generation tok/s | "
            "WikiText-2 ppl (llama.cpp) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, path in files.items():
        measured = runs[label]
        perplexity = f"{ppl[label]:.2f}" if label in ppl else "—"
        rows.append(f"| {label} | {path.stat().st_size / 1e6:,.1f} | {params[label]:,} | "
                    f"{params[label] / original_params:.1%} | {_best([m['load_rss_mb'] for m in measured], higher=False)} | "
                    f"{_best([m['pp_tps'] for m in measured])} | {_best([m['tg_tps'] for m in measured])} | "
                    f"{perplexity} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pruned-dir", default=None, help="folder from `comp-explorer prune --out` (default: prune here)")
    p.add_argument("--ratio", type=float, default=0.2, help="ratio when pruning here (default 0.2)")
    p.add_argument("--out-dir", default=None, help="keep the GGUF files here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 windows for the perplexity (0: skip)")
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--reuse", action="store_true", help="measure the files an earlier run left in --out-dir")
    p.add_argument("--json", action="store_true", help="also print every measurement as one JSON line")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="comp-gguf-bench-") as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        saved = out / "reports.json"
        if args.reuse and saved.is_file():  # the files of an earlier run in --out-dir: measure them again
            stored = json.loads(saved.read_text())
            files, reports = {k: Path(v) for k, v in stored["files"].items()}, stored["reports"]
        else:
            files, reports = write_files(out, Path(args.pruned_dir) if args.pruned_dir else None, args.ratio)
            saved.write_text(json.dumps({"files": {k: str(v) for k, v in files.items()}, "reports": reports}))
        params = {label: gguf_params(path) for label, path in files.items()}
        original_params = reports["original f16"]["params_original"]
        runs: dict[str, list[dict]] = {label: [] for label in files}
        for _ in range(args.repeats):  # alternate, so a load change hits every file alike
            for label, path in files.items():
                runs[label].append(run_child(path, args.threads, args.prompt_tokens, args.gen_tokens))
        ppl: dict[str, float] = {}
        if args.ppl_windows:
            windows = ppl_windows(out, args.ppl_windows, args.ppl_seq_len)
            for label, path in files.items():
                ppl[label] = run_child(path, args.threads, args.prompt_tokens, args.gen_tokens, windows)["ppl"]
        loads = [m["loadavg"] for measured in runs.values() for m in measured]
        print(table(files, runs, ppl, params, original_params))
        print(f"\nllama-cpp-python, {args.threads} threads, {args.prompt_tokens}-token prompt, {args.gen_tokens} "
              f"generated tokens, best (min–max) of {args.repeats} runs; 1-min load average "
              f"{min(loads):.2f}–{max(loads):.2f} during the runs; perplexity: first {args.ppl_windows} WikiText-2 "
              f"test windows of {args.ppl_seq_len} tokens.")
        for label in [label for label in reports if label.startswith("pruned")]:
            r = reports[label]
            print(f"{label}: {r['arch']}, {r['restored_zeros']:,} weights restored as zeros, tensor types "
                  f"{r['tensor_types']}")
        if args.json:
            print(json.dumps({"runs": runs, "ppl": ppl, "params": params, "reports": reports}, default=str))


if __name__ == "__main__":
    main()

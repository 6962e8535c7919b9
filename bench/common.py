"""What every bench section shares: the machine line, the bundled model loaded once, calibration and
evaluation with the project's defaults, figure files, and the ``Section`` each section returns.

A section is a module in ``bench/`` with ``run(quick: bool, out: Path) -> Section``; ``bench/run_all.py``
runs them in order, writes ``out/<name>.json`` and regenerates ``docs/RESULTS.md`` from the sections'
Markdown. Each module also runs alone: ``python bench/<name>.py --quick --out bench-out``.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from comp_core import get_calibration, get_eval_tokens, load_model, perplexity  # noqa: E402
from comp_core.runtime import available_cpus, configure_threads  # noqa: E402

# quick mode: what the issue calls "quick" — the first 24 WikiText-2/PTB test windows of 512 tokens
QUICK_WINDOWS = 24
QUICK_SEQ_LEN = 512
FULL_SEQ_LEN = 2048
CALIBRATION = {"name": "c4", "n_samples": 10, "seq_len": 128, "seed": 0}  # COMP's defaults (the paper's)


@dataclass
class Section:
    """One part of RESULTS.md: a title, its Markdown (tables, the command, what it shows), the raw data
    (written as JSON) and the figure files it wrote under the output folder."""

    name: str
    title: str
    markdown: str
    data: dict = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)  # command, UTC time, commit, mode of the run that measured it


def machine() -> str:
    """"Linux x86_64, 2 CPUs (AMD EPYC …), torch 2.13.0+cpu, no GPU" — the line under every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {available_cpus()} CPUs ({cpu}), torch {torch.__version__}, "
            f"{gpu}")


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.lru_cache(maxsize=2)
def bundled():
    """The bundled SmolLM2-135M-Instruct, loaded once per process (callers prune copies)."""
    configure_threads()
    return load_model(None)


def fresh_model():
    """A deep copy of the bundled original, for methods that work in place."""
    return copy.deepcopy(bundled().model)


@functools.lru_cache(maxsize=16)
def calibration(name: str = CALIBRATION["name"], n_samples: int = CALIBRATION["n_samples"],
                seq_len: int = CALIBRATION["seq_len"], seed: int = CALIBRATION["seed"]) -> torch.Tensor:
    loaded = bundled()
    return get_calibration(name, loaded.tokenizer, n_samples, seq_len, seed, model=loaded.model)


@functools.lru_cache(maxsize=4)
def eval_tokens(name: str) -> torch.Tensor:
    return get_eval_tokens(name, bundled().tokenizer)


def ppl(model, dataset: str = "wikitext2", *, quick: bool = True, full_seq_len: bool = False) -> float:
    """Perplexity on the first 24 windows of 512 tokens (quick) or the whole test set (at 2048 with
    ``full_seq_len``, the papers' protocol)."""
    seq_len = FULL_SEQ_LEN if full_seq_len else QUICK_SEQ_LEN
    windows = QUICK_WINDOWS if quick and not full_seq_len else None
    return perplexity(model, eval_tokens(dataset), seq_len, max_windows=windows).ppl


def eval_protocol(quick: bool) -> str:
    return (f"first {QUICK_WINDOWS} test windows of {QUICK_SEQ_LEN} tokens" if quick
            else f"whole test set, windows of {FULL_SEQ_LEN} tokens")


def save_figure(fig, out: Path, stem: str) -> list[str]:
    """Write ``stem.html`` (always) and ``stem.png`` (when kaleido can render) under ``out``; returns the
    file names written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [f"{stem}.html"]
    fig.write_html(out / f"{stem}.html", include_plotlyjs="cdn")
    try:
        fig.write_image(out / f"{stem}.png", width=900, height=420, scale=1)
        written.append(f"{stem}.png")
    except Exception as err:  # noqa: BLE001 - kaleido needs a browser; the HTML is the figure then
        print(f"[bench] {stem}.png not written: {type(err).__name__}: {err}", file=sys.stderr)
    return written


def markdown_table(head: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def main_for(run) -> None:
    """``python bench/<name>.py [--quick] [--out DIR]``: run one section, print its Markdown, write its JSON."""
    parser = argparse.ArgumentParser(description=(run.__module__ or "bench section"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    os.environ.setdefault("COMP_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    section = run(args.quick, out)
    section.seconds = time.perf_counter() - start
    (out / f"{section.name}.json").write_text(json.dumps(
        {"name": section.name, "title": section.title, "seconds": section.seconds, "markdown": section.markdown,
         "data": section.data, "figures": section.figures}, indent=1, default=str))
    print(f"## {section.title}\n\n{section.markdown}\n\n({section.seconds:.0f} s)")


_MEASURED: dict[str, dict] = {}


def measure(method: str, *, quick: bool, datasets: tuple[str, ...] = ("wikitext2",), calib: dict | None = None,
            keep_model: bool = False, **settings) -> dict:
    """Prune a copy of the bundled model with ``method`` and ``settings``, evaluate perplexity on
    ``datasets``; memoised per process on (method, settings, calibration, protocol), so sections that need
    the same run (the quality table on WikiText-2 and PTB, an ablation on WikiText-2 alone) pay for it once.

    Returns ``{"method", "settings", "realised_ratio", "params_after", "prune_seconds", "peak_rss_mb",
    "timings", "ppl": {dataset: value}, "extra"}`` (+ ``"model"`` when ``keep_model``: the run is then done
    again even when memoised, and its row is memoised without the model)."""
    from comp_core.methods import prune_with
    from comp_core.runtime import RssSampler

    calib = {**CALIBRATION, **(calib or {})}
    key = json.dumps([method, sorted(settings.items()), sorted(calib.items()), quick], default=str)
    known = _MEASURED.get(key)
    if known is not None and not keep_model and set(datasets) <= set(known["ppl"]):
        return known  # a run that evaluated these data sets (and maybe more) already
    samples = calibration(calib["name"], calib["n_samples"], calib["seq_len"], calib["seed"])
    with RssSampler() as rss:
        start = time.perf_counter()
        pruned, result = prune_with(method, bundled().model, samples, **settings)
        seconds = time.perf_counter() - start
    row = {"method": method, "settings": {k: v for k, v in settings.items()}, "calibration": calib,
           "realised_ratio": result.realised_ratio, "params_after": result.params_after,
           "prune_seconds": seconds, "peak_rss_mb": rss.peak_mb,
           "timings": dict(result.plan.timings) if result.plan is not None else {},
           "removed_layers": list(getattr(result.plan, "removed_layers", []) or []),
           "extra": {k: v for k, v in (result.extra or {}).items() if isinstance(v, (int, float, str))},
           "ppl": {ds: ppl(pruned, ds, quick=quick) for ds in datasets}}
    _MEASURED[key] = row
    return {**row, "model": pruned} if keep_model else row


def command_line(section: str, quick: bool) -> str:
    """The Markdown line that says which command produced a section's tables."""
    return "`python bench/run_all.py" + (" --quick" if quick else "") + f"` (section `bench/{section}.py`)"

"""Measure what pruning buys at inference: parameters, bytes on disk, load memory, prefill latency, decode speed.

* :func:`measure_speed` times one model (in memory, or a saved folder): prefill of ``prefill_tokens`` tokens
  (batch 1) and greedy decoding with a KV cache at each batch size, ``repeats`` times after one warm-up;
  medians and spreads. Decode speed is given per wall-clock second and per CPU second of this process:
  on a machine shared with other jobs the wall-clock figure swings with their load, while the CPU-time figure
  (with one torch thread) mostly does not; report both.
* :func:`compare_speed` does it for an original and a pruned model (folders or models) in the same process,
  alternating between the two on every repeat so that load from other processes hits both alike. For
  folders it also reports the safetensors bytes and the peak RSS of loading each one in a fresh subprocess.

Decoding is a plain loop (``model(next_token, cache=cache)`` then argmax), i.e. what
``generate(do_sample=False)`` does without its per-step bookkeeping, so the timings are the model's own.
Inputs are random token ids from a seeded generator; prefill asks for the last position's logits only
(``logits_to_keep=1``), as ``generate`` does.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime import cache_of, count_parameters, with_cache
from ..export.folder import folder_bytes, load_pruned, save_pruned
from ..models.surgery import IndexedInputLinear


@dataclass
class Stat:
    """Median of repeated measurements, with their min and max (the spread)."""

    median: float
    low: float
    high: float
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), list(values))

    @property
    def spread(self) -> float:
        """(max − min) / median: 0.1 means the runs were within 10 % of each other."""
        return (self.high - self.low) / self.median if self.median else float("nan")

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.low:.4g}–{self.high:.4g}]"


@dataclass
class SpeedReport:
    """Measurements of one model. ``decode_tps`` maps batch size -> generated tokens/s (all sequences)."""

    label: str
    device: str
    dtype: str
    threads: int
    params: int
    prefill_tokens: int
    decode_tokens: int
    prefill_ms: Stat
    decode_tps: dict[int, Stat]
    decode_cpu_tps: dict[int, Stat]  # tokens per CPU second of this process (robust to other jobs' load)
    disk_bytes: int | None = None  # *.safetensors in the folder
    load_peak_rss_mb: float | None = None  # peak RSS of loading the folder + one forward, above the bare process
    load_rss_mb: float | None = None  # RSS held after that, above the bare process
    cuda_peak_mb: float | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["decode_tps"] = {str(b): asdict(s) for b, s in self.decode_tps.items()}
        out["decode_cpu_tps"] = {str(b): asdict(s) for b, s in self.decode_cpu_tps.items()}
        return out


# ---------------------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prompt(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)  # (batch, length)


@torch.inference_mode()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    """Wall seconds of one forward pass over ``ids`` (B, T) that builds the KV cache, last-position logits only."""
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def greedy_decode(model: nn.Module, prompt: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decoding with a KV cache.

    Returns (new tokens (B, n_tokens), wall seconds, process CPU seconds), both timings of the n_tokens − 1
    cached steps after the prefill (whose logits give the first token).
    """
    device = prompt.device
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache = cache_of(out)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
    tokens = [token]
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(n_tokens - 1):
        out = model(token, use_cache=True, **with_cache(model, cache))
        cache = cache_of(out)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        tokens.append(token)
    _sync(device)
    return torch.cat(tokens, dim=1), time.perf_counter() - start, time.process_time() - cpu_start


@dataclass
class _Round:
    prefill_s: float
    decode_tps: dict[int, float]  # per wall second
    decode_cpu_tps: dict[int, float]  # per CPU second of this process


def _measure_once(model: nn.Module, prefill_tokens: int, decode_tokens: int, batch_sizes, seed: int,
                  prompt_tokens: int) -> _Round:
    device = _device_of(model)
    vocab = model.config.vocab_size
    prefill = time_prefill(model, _prompt(vocab, 1, prefill_tokens, seed, device))
    wall, cpu = {}, {}
    for batch in batch_sizes:
        _, seconds, cpu_seconds = greedy_decode(model, _prompt(vocab, batch, prompt_tokens, seed + batch, device),
                                                decode_tokens)
        wall[batch] = batch * (decode_tokens - 1) / seconds
        cpu[batch] = batch * (decode_tokens - 1) / max(cpu_seconds, 1e-9)
    return _Round(prefill, wall, cpu)


def _report(label: str, model: nn.Module, rounds: list[_Round], prefill_tokens: int, decode_tokens: int,
            batch_sizes) -> SpeedReport:
    device = _device_of(model)
    return SpeedReport(
        label=label, device=str(device), dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        threads=torch.get_num_threads(), params=count_parameters(model), prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens, prefill_ms=Stat.of([r.prefill_s * 1000 for r in rounds]),
        decode_tps={b: Stat.of([r.decode_tps[b] for r in rounds]) for b in batch_sizes},
        decode_cpu_tps={b: Stat.of([r.decode_cpu_tps[b] for r in rounds]) for b in batch_sizes},
        cuda_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)


def measure_speed(model, tokenizer=None, *, prefill_tokens: int = 512, decode_tokens: int = 64,
                  batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 5, device: str | torch.device | None = None,
                  prompt_tokens: int = 16, seed: int = 0, label: str = "model",
                  measure_memory: bool = True) -> SpeedReport:
    """Prefill latency and greedy decode throughput of ``model`` (a model, or a folder written by ``save_pruned``).

    One warm-up round, then ``repeats`` rounds; each round times a prefill of ``prefill_tokens`` tokens
    (batch 1) and, per batch size, ``decode_tokens`` greedy steps after a ``prompt_tokens`` prompt. An
    in-memory model is moved to ``device`` when given. For a folder, ``disk_bytes`` and (with
    ``measure_memory``, in a subprocess) the load RSS figures are filled in too. ``tokenizer`` is accepted
    for API symmetry; inputs are random token ids.
    """
    del tokenizer
    disk, memory = None, {}
    if isinstance(model, (str, os.PathLike)):
        folder = model
        disk = folder_bytes(folder, ".safetensors")
        memory = load_memory(folder) if measure_memory else {}
        model, _ = load_pruned(folder, device=device or "cpu")
    elif device is not None:
        model = model.to(device)
    model.eval()
    _measure_once(model, prefill_tokens, min(decode_tokens, 4), batch_sizes, seed, prompt_tokens)  # warm-up
    rounds = [_measure_once(model, prefill_tokens, decode_tokens, batch_sizes, seed, prompt_tokens)
              for _ in range(repeats)]
    report = _report(label, model, rounds, prefill_tokens, decode_tokens, batch_sizes)
    report.disk_bytes = disk
    report.load_peak_rss_mb = memory.get("load_peak_rss_mb")
    report.load_rss_mb = memory.get("load_rss_mb")
    return report


# ---------------------------------------------------------------------------------------------------------
# memory of loading a folder (fresh subprocess, so the high-water mark is this model's alone)
# ---------------------------------------------------------------------------------------------------------

_LOAD_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from comp_core.export.folder import load_pruned
from comp_core.runtime import current_rss_mb, peak_rss_mb
base = current_rss_mb()
model, _ = load_pruned(sys.argv[1])
with torch.inference_mode():  # safetensors are memory-mapped: a forward pass makes every weight resident
    model(torch.tensor([[1, 2, 3, 4]]))
print(json.dumps({"base_mb": base, "peak_mb": peak_rss_mb(), "after_mb": current_rss_mb()}))
"""


def load_memory(path: str | os.PathLike) -> dict:
    """Load ``path`` with ``load_pruned`` in a fresh Python process and run one 4-token forward pass (weights are
    memory-mapped, so only that makes them all resident). RSS in MiB above the process after its imports:
    ``{"load_peak_rss_mb": high-water mark, "load_rss_mb": resident at the end}``."""
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds comp_core
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(path)], capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loading {path} in a subprocess failed:\n{done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {"load_peak_rss_mb": figures["peak_mb"] - figures["base_mb"],
            "load_rss_mb": figures["after_mb"] - figures["base_mb"]}


# ---------------------------------------------------------------------------------------------------------
# original vs pruned
# ---------------------------------------------------------------------------------------------------------

@dataclass
class SpeedComparison:
    original: SpeedReport
    pruned: SpeedReport

    def rows(self) -> list[dict]:
        """One row per metric: ``{"metric", "original", "pruned", "ratio"}`` (ratio = pruned / original)."""
        o, p = self.original, self.pruned
        rows = [("parameters", o.params, p.params), ("disk bytes (safetensors)", o.disk_bytes, p.disk_bytes),
                ("load + 1st forward, peak RSS (MiB)", o.load_peak_rss_mb, p.load_peak_rss_mb),
                ("loaded, RSS (MiB)", o.load_rss_mb, p.load_rss_mb),
                (f"prefill {o.prefill_tokens} tok (ms)", o.prefill_ms, p.prefill_ms)]
        rows += [(f"decode batch {b} (tok/s)", o.decode_tps[b], p.decode_tps[b]) for b in o.decode_tps]
        rows += [(f"decode batch {b} (tok per CPU-s)", o.decode_cpu_tps[b], p.decode_cpu_tps[b])
                 for b in o.decode_cpu_tps]
        if o.cuda_peak_mb is not None:
            rows.append(("CUDA peak (MiB)", o.cuda_peak_mb, p.cuda_peak_mb))
        out = []
        for name, a, b in rows:
            if a is None or b is None:
                continue
            va = a.median if isinstance(a, Stat) else a
            vb = b.median if isinstance(b, Stat) else b
            out.append({"metric": name, "original": a, "pruned": b, "ratio": vb / va if va else float("nan")})
        return out

    def to_markdown(self) -> str:
        lines = [(f"device: {self.original.device}, dtype {self.original.dtype}, {self.original.threads} threads; "
                 "timings: median [min–max] of the repeats"), "",
                 "| metric | original | pruned | pruned / original |", "|---|---|---|---|"]
        for row in self.rows():
            lines.append(f"| {row['metric']} | {_fmt(row['original'])} | {_fmt(row['pruned'])} | {row['ratio']:.3f} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"original": self.original.to_dict(), "pruned": self.pruned.to_dict()}


def _fmt(value) -> str:
    if isinstance(value, Stat):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.1f}"


def _resolve(source, label: str, workdir: Path, device) -> tuple[nn.Module, Path]:
    """(model, folder) for a folder or an in-memory model (saved to ``workdir`` so its folder can be measured)."""
    if isinstance(source, (str, os.PathLike)):
        model, _ = load_pruned(source, device=device or "cpu")
        return model, Path(source)
    folder = save_pruned(source, None, workdir / label)
    model = source.to(device) if device is not None else source
    return model, folder


def measure_interleaved(models: dict[str, nn.Module], *, prefill_tokens: int = 512, decode_tokens: int = 64,
                        batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 5, prompt_tokens: int = 16,
                        seed: int = 0) -> dict[str, SpeedReport]:
    """:func:`measure_speed` for several in-memory models at once, one round of each in turn per repeat,
    so that a change in the machine's load during the run affects all of them alike."""
    for model in models.values():  # warm-up
        model.eval()
        _measure_once(model, prefill_tokens, min(decode_tokens, 4), batch_sizes, seed, prompt_tokens)
    runs: dict[str, list[_Round]] = {label: [] for label in models}
    for _ in range(repeats):
        for label, model in models.items():
            runs[label].append(_measure_once(model, prefill_tokens, decode_tokens, batch_sizes, seed, prompt_tokens))
    return {label: _report(label, model, runs[label], prefill_tokens, decode_tokens, batch_sizes)
            for label, model in models.items()}


def compare_speed(original, pruned, *, prefill_tokens: int = 512, decode_tokens: int = 64,
                  batch_sizes: tuple[int, ...] = (1, 8), repeats: int = 5, device: str | torch.device | None = None,
                  prompt_tokens: int = 16, seed: int = 0, measure_memory: bool = True) -> SpeedComparison:
    """Original vs pruned (each a saved folder or an in-memory model), same process, alternating runs.

    In-memory models are first saved to a temporary folder (stock architecture when unpruned) so that both
    get disk bytes and load memory measured the same way. Returns a :class:`SpeedComparison`; its
    ``rows()`` / ``to_markdown()`` give the table.
    """
    with tempfile.TemporaryDirectory(prefix="comp-speed-") as tmp:
        models, folders = {}, {}
        for label, source in (("original", original), ("pruned", pruned)):
            models[label], folders[label] = _resolve(source, label, Path(tmp), device)
            models[label].eval()
        memory = {label: load_memory(folders[label]) if measure_memory else {} for label in models}
        disk = {label: folder_bytes(folders[label], ".safetensors") for label in models}
    reports = measure_interleaved(models, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                                  batch_sizes=batch_sizes, repeats=repeats, prompt_tokens=prompt_tokens, seed=seed)
    for label, report in reports.items():
        report.disk_bytes = disk[label]
        report.load_peak_rss_mb = memory[label].get("load_peak_rss_mb")
        report.load_rss_mb = memory[label].get("load_rss_mb")
    return SpeedComparison(original=reports["original"], pruned=reports["pruned"])


# ---------------------------------------------------------------------------------------------------------
# ablation: index-select vs zero-padded weights
# ---------------------------------------------------------------------------------------------------------

class ZeroPaddedLinear(nn.Linear):
    """An ``IndexedInputLinear`` expanded back to a full-width weight with zero columns (same outputs)."""


def pad_indexed_linears(model: nn.Module) -> nn.Module:
    """Replace every ``IndexedInputLinear`` in ``model`` (in place) by a zero-padded full-width ``nn.Linear``.

    Only for measuring the alternative to index-select: the padded model computes the same function with
    more parameters, so its parameter count overstates what is stored.
    """
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, IndexedInputLinear):
                weight = child.weight.data
                padded = ZeroPaddedLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                          device=weight.device, dtype=weight.dtype)
                padded.weight.data.zero_()
                padded.weight.data[:, child.input_index] = weight
                if child.bias is not None:
                    padded.bias.data.copy_(child.bias.data)
                setattr(module, child_name, padded)
    return model


def linear_microbench(d_in: int, d_out: int, kept: int, rows: int, repeats: int = 15, iters: int = 50) -> dict:
    """Best-of-``repeats`` microseconds of one dense on ``rows`` tokens: full weight vs index-select + kept columns."""
    gen = torch.Generator().manual_seed(0)
    index = torch.sort(torch.randperm(d_in, generator=gen)[:kept]).values
    weight = torch.randn(d_out, d_in, generator=gen)
    compact = weight[:, index].contiguous()
    x = torch.randn(rows, d_in, generator=gen)

    def best(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - start) / iters * 1e6)
        return min(times)

    with torch.inference_mode():
        return {"dense_us": best(lambda: F.linear(x, weight)),
                "indexed_us": best(lambda: F.linear(x.index_select(-1, index), compact))}

"""What COMP costs: wall time and peak memory per stage, how they grow with calibration tokens and model
width, and how far each stage is above the floor any such method must pay.

    COMP_DATA_DIR=../shared/data python bench/cost.py --quick --out bench-out

Stages are the library's own (``plan.timings``: capture, layer_removal, neuron_pruning) plus the model copy
``prune`` makes first and the export (``save_pruned``). Peak RSS per stage: a thread samples the current RSS
(``/proc/self/statm``) every 20 ms and charges it to the stage the library last announced through its
progress events. A stage's time is split further by timing the library's own functions (block replays,
Gram updates, mask paths, …) in place for the run: this copies no pruning code, costs one clock read per
call, and the wrappers are removed afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import torch  # noqa: E402
from plotly.subplots import make_subplots  # noqa: E402
from common import command_line, CALIBRATION, Section, bundled, calibration, machine, main_for, markdown_table, save_figure  # noqa: E402

import comp_core.loop.blocks  # noqa: E402
import comp_core.methods.comp.block  # noqa: E402
import comp_core.loop.importance  # noqa: E402
from comp_core.loop.capture import calibration_context  # noqa: E402
from comp_core.export.folder import save_pruned  # noqa: E402
from comp_core.math.linalg import damped  # noqa: E402
from comp_core.methods import prune_with  # noqa: E402
from comp_core.methods.comp import CompConfig  # noqa: E402
from comp_core.models.adapters import get_adapter  # noqa: E402
from comp_core.runtime import count_parameters, current_rss_mb  # noqa: E402
from comp_core.loop.stats import STAT_DTYPE, InputStats  # noqa: E402

RATIO = 0.2
PRUNE_STAGES = ("capture", "layer_removal", "neuron_pruning")
STAGES = ("copy",) + PRUNE_STAGES + ("export",)
TOKEN_POINTS_QUICK = [(1, 128), (4, 128), (16, 128), (32, 256)]  # n_samples × seq_len, up to 8 192 tokens
TOKEN_POINTS_FULL = TOKEN_POINTS_QUICK + [(64, 512), (128, 512)]  # … up to 65 536
ALWAYS_RUN = 3  # token points run whatever the time budget says (fewer cannot be fitted)
WIDTHS_QUICK = (64, 128, 256, 512)
WIDTHS_FULL = WIDTHS_QUICK + (1024,)
WIDTH_LAYERS, WIDTH_VOCAB, WIDTH_CALIB = 6, 512, (16, 128)
QUICK_BUDGET_S = 7 * 60  # quick mode stops adding token points when the next would overrun this
CHEAP_S = 10.0  # a run shorter than this is repeated (median of 3)
RSS_INTERVAL_S = 0.02
# One torch thread: on the shared 2-CPU machine, with other jobs running, two threads made the same forward
# pass 5× slower (8 s vs 40 s at 10×128 tokens; OpenMP threads waiting for each other), which would measure
# the neighbours, not COMP. The setting is restored when the section ends.
THREADS = 1


# ---------------------------------------------------------------------------------------------------------
# instruments: which stage is running, its peak RSS, where its time goes
# ---------------------------------------------------------------------------------------------------------

class StageTracker:
    """A progress callback that keeps the name of the stage the library is in. ``prune`` copies the model
    before its first event, so the run starts in "copy"; the last layer-removal event (step == total) ends
    layer removal, the allocation and the neuron-pruning loop follow."""

    def __init__(self) -> None:
        self.stage = "copy"
        self.started: dict[str, float] = {"copy": time.perf_counter()}
        self.on_change: Callable[[], None] | None = None

    def enter(self, stage: str) -> None:
        if stage == self.stage:
            return
        if self.on_change is not None:  # last look at the stage that ends (a short one may have no sample)
            self.on_change()
        self.stage = stage
        self.started.setdefault(stage, time.perf_counter())

    def __call__(self, event) -> None:
        if event.stage == "capture":
            self.enter("capture")
        elif event.stage == "layer-removal":
            self.enter("neuron_pruning" if event.step == event.total else "layer_removal")
        elif event.stage == "neuron-pruning":
            self.enter("neuron_pruning")


class StageRss:
    """Peak RSS per stage: samples every ``RSS_INTERVAL_S`` in a thread (and at every stage change), so a
    spike shorter than the interval can be missed — the figures are lower bounds."""

    def __init__(self, tracker: StageTracker) -> None:
        self.tracker = tracker
        self.peaks: dict[str, float] = {}
        self.start_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stage-rss", daemon=True)

    def sample(self) -> None:
        stage = self.tracker.stage
        self.peaks[stage] = max(self.peaks.get(stage, 0.0), current_rss_mb())

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            self.sample()

    def __enter__(self) -> "StageRss":
        self.start_mb = current_rss_mb()
        self.tracker.on_change = self.sample
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


GRAM = "Gram XᵀX (library)"
# (owner, attribute, label): the library functions a stage's time is split into
TIMED_CALLS = [
    (comp_core.loop.blocks, "replay", "block forwards"),
    (InputStats, "update", GRAM),
    (comp_core.loop.importance, "cosine_importance", "cosine importance"),
    (comp_core.methods.comp.block, "coefficient_matrix", "coefficient matrices C"),
    (comp_core.methods.comp.block, "damped", "damped copies of C"),
    (comp_core.methods.comp.block, "score_neurons", "neuron scores"),
    (comp_core.methods.comp.block, "mask_path", "mask paths (Cholesky + inverse)"),
    (comp_core.methods.comp.block, "choose_cuts", "cut choice (τ)"),
    (comp_core.methods.comp.block, "solve_mask", "mask solves"),
    (comp_core.methods.comp.block, "relative_error", "reconstruction errors"),
    (comp_core.methods.comp.block, "refit_columns", "refits"),
    (comp_core.methods.comp.block, "refit_relative_error", "reconstruction errors"),
    (comp_core.methods.comp.block, "apply_cuts", "weight surgery"),
]
NESTED = {"block forwards": GRAM}  # outer label: inner label  # the Gram hooks run inside the block replays


def untimed_calls() -> list[str]:
    """``TIMED_CALLS`` entries the library no longer has (renamed or gone): skipped, and said so, rather
    than failing the section; their time then shows up as "other"."""
    return [f"{owner.__name__}.{name}" for owner, name, _ in TIMED_CALLS if name not in owner.__dict__]


@contextlib.contextmanager
def timed_calls(tracker: StageTracker) -> Iterator[dict[str, dict[str, float]]]:
    """While active, every call of a ``TIMED_CALLS`` function adds its seconds to ``totals[stage][label]``;
    the originals are put back on exit."""
    totals: dict[str, dict[str, float]] = {}
    saved = []

    def wrap(fn, label):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stage = totals.setdefault(tracker.stage, {})
                stage[label] = stage.get(label, 0.0) + time.perf_counter() - start
        return timed

    try:
        for owner, name, label in TIMED_CALLS:
            if name not in owner.__dict__:
                continue
            original = owner.__dict__[name]
            saved.append((owner, name, original))
            setattr(owner, name, wrap(original, label))
        yield totals
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


# ---------------------------------------------------------------------------------------------------------
# one profiled COMP run
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Profile:
    """Seconds and peak RSS per stage of one COMP run, plus where each stage's time went."""

    n_samples: int
    seq_len: int
    seconds: dict[str, float]
    peak_rss_mb: dict[str, float]
    rss_start_mb: float
    calls: dict[str, dict[str, float]]
    removed_layers: list[int]
    pruned_layers: list[int]
    n_layers: int
    compensation: dict[str, int]
    realised_ratio: float
    repeats: list[dict] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.n_samples * self.seq_len

    @property
    def prune_seconds(self) -> float:
        return sum(self.seconds.get(s, 0.0) for s in ("copy",) + PRUNE_STAGES)


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so that a run's RSS rise
    is its own and not hidden in heap an earlier run left behind."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the rise is then a lower bound
        pass


def profile_comp(model, samples: torch.Tensor, *, tokenizer=None, export: bool = False) -> Profile:
    """Prune a copy of ``model`` with COMP (ratio 0.2, library defaults), optionally export it to a temporary
    folder; time and RSS per stage."""
    release_freed_memory()
    tracker = StageTracker()
    with StageRss(tracker) as rss, timed_calls(tracker) as calls:
        pruned, result = prune_with("comp", model, samples, ratio=RATIO, on_event=tracker)
        seconds = {"copy": tracker.started["capture"] - tracker.started["copy"], **result.plan.timings}
        if export:
            tracker.enter("export")
            with tempfile.TemporaryDirectory(prefix="comp-cost-") as tmp:
                start = time.perf_counter()
                save_pruned(pruned, tokenizer, Path(tmp) / "pruned", result)
                seconds["export"] = time.perf_counter() - start
    plan = result.plan
    compensation: dict[str, int] = {}
    for d in plan.dense_reports:
        if d.n_removed:
            compensation[f"{d.kind}:{d.compensation}"] = compensation.get(f"{d.kind}:{d.compensation}", 0) + 1
    profile = Profile(n_samples=samples.shape[0], seq_len=samples.shape[1], seconds=seconds,
                      peak_rss_mb=dict(rss.peaks), rss_start_mb=rss.start_mb, calls=calls,
                      removed_layers=list(plan.removed_layers), pruned_layers=sorted(plan.layer_ratios),
                      n_layers=plan.n_layers, compensation=compensation, realised_ratio=result.realised_ratio)
    del pruned
    return profile


def median_profile(run_once: Callable[[], Profile], allow_repeats: Callable[[float], bool]) -> Profile:
    """Run once; if the run was cheap (and ``allow_repeats(seconds)``), twice more, and keep the median run
    (by prune seconds) whole, so its stages and their breakdown stay consistent. Every run's stage seconds
    and RSS stay in ``repeats``."""
    runs = [run_once()]
    if runs[0].prune_seconds < CHEAP_S and allow_repeats(2 * runs[0].prune_seconds):
        runs += [run_once(), run_once()]
    median = sorted(runs, key=lambda r: r.prune_seconds)[len(runs) // 2]
    median.repeats = [{"seconds": r.seconds, "peak_rss_mb": r.peak_rss_mb} for r in runs]
    return median


# ---------------------------------------------------------------------------------------------------------
# the floor: one forward pass, the Grams, one factorisation per dense
# ---------------------------------------------------------------------------------------------------------

def _decoder_forward(model, samples: torch.Tensor, batch_size: int) -> None:
    """The blocks over every calibration batch, no logits (the library never computes them either)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    with calibration_context(model):
        for start in range(0, samples.shape[0], batch_size):
            decoder(input_ids=samples[start:start + batch_size], use_cache=False)


def time_forward(model, samples: torch.Tensor, batch_size: int, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        _decoder_forward(model, samples, batch_size)
        out.append(time.perf_counter() - start)
    return out


def time_grams(model, samples: torch.Tensor, layers: list[int], batch_size: int
               ) -> tuple[float, int, dict[int, torch.Tensor]]:
    """Seconds of the float64 ``XᵀX`` of every dense input group of ``layers``, taken on the real inputs
    during one forward pass (only the cast and the ``addmm`` are timed). Grams of one width are summed into
    one buffer, which stays SPD and serves the factorisation floor. Returns (seconds, flops, buffers)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    buffers: dict[int, torch.Tensor] = {}
    spent = {"seconds": 0.0, "flops": 0}

    def hook(_module, args):
        start = time.perf_counter()
        x = args[0].reshape(-1, args[0].shape[-1]).to(STAT_DTYPE)  # (tokens, d)
        gram = buffers.setdefault(x.shape[1], torch.zeros(x.shape[1], x.shape[1], dtype=STAT_DTYPE))
        gram.addmm_(x.T, x)
        spent["seconds"] += time.perf_counter() - start
        spent["flops"] += 2 * x.shape[0] * x.shape[1] ** 2

    handles = [adapter.dense(blocks[i], group[0]).register_forward_pre_hook(hook)
               for i in layers for group in adapter.input_groups]
    try:
        _decoder_forward(model, samples, batch_size)
    finally:
        for h in handles:
            h.remove()
    return spent["seconds"], spent["flops"], buffers


def time_factorisations(model, layers: list[int], grams: dict[int, torch.Tensor], damp: float) -> tuple[float, int]:
    """Seconds of one ``torch.linalg.cholesky`` of a damped d_in × d_in float64 Gram per dense of ``layers``
    (the least any exact per-dense solve needs). Returns (seconds, count)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    spd = {d: damped(g, damp) for d, g in grams.items()}
    seconds, count = 0.0, 0
    for i in layers:
        for spec in adapter.denses:
            matrix = spd[adapter.dense(blocks[i], spec.name).in_features]
            start = time.perf_counter()
            torch.linalg.cholesky(matrix)
            seconds += time.perf_counter() - start
            count += 1
    return seconds, count


def measure_floor(model, samples: torch.Tensor, forward: list[float], layers: list[int]) -> dict:
    """The floor of a run on ``samples`` that neuron-prunes ``layers``, given the forward-pass times."""
    cfg = CompConfig()
    gram_s, gram_flops, grams = time_grams(model, samples, layers, cfg.batch_size)
    chol_s, n_chol = time_factorisations(model, layers, grams, cfg.damp)
    return {"forward_runs": forward, "forward": statistics.median(forward), "gram": gram_s,
            "gram_gflops": gram_flops / 1e9, "cholesky": chol_s, "n_cholesky": n_chol,
            "gram_widths": sorted(grams), "layers": layers, "tokens": samples.numel()}


def block_passes(profile: Profile) -> dict[str, int]:
    """Block forwards each stage runs: capture stops at the last block's input, layer removal re-measures
    every active block once per removal plus once more, neuron pruning replays the kept blocks once."""
    n, k = profile.n_layers, len(profile.removed_layers)
    return {"capture": n - 1, "layer_removal": sum(n - j for j in range(k + 1)), "neuron_pruning": n - k}


# ---------------------------------------------------------------------------------------------------------
# growth: calibration tokens, model width
# ---------------------------------------------------------------------------------------------------------

def token_sweep(quick: bool, deadline: float) -> tuple[list[Profile], list[str]]:
    """COMP on the bundled model at growing calibration sizes; in quick mode a point past the first
    ``ALWAYS_RUN`` whose projected time would pass ``deadline`` is skipped and named."""
    points = TOKEN_POINTS_QUICK if quick else TOKEN_POINTS_FULL
    profiles, skipped = [], []
    for index, (n, seq_len) in enumerate(points):
        projected = _projected_seconds(profiles, n * seq_len)
        if quick and index >= ALWAYS_RUN and time.perf_counter() + projected > deadline:
            skipped.append(f"{n}×{seq_len}")
            continue
        print(f"[cost] tokens {n}×{seq_len}", file=sys.stderr, flush=True)
        samples = calibration(CALIBRATION["name"], n, seq_len, CALIBRATION["seed"])
        profiles.append(median_profile(functools.partial(profile_comp, bundled().model, samples),
                                       lambda s: not quick or time.perf_counter() + s < deadline))
    return profiles, skipped


def _projected_seconds(profiles: list[Profile], tokens: int) -> float:
    """Prune time at ``tokens``, on the line through the last two runs (a fixed part — the solves — plus a
    part linear in tokens); proportional to the last run when there is only one."""
    if not profiles:
        return 0.0
    last = profiles[-1]
    if len(profiles) == 1 or profiles[-2].tokens == last.tokens:
        return last.prune_seconds * tokens / last.tokens
    prev = profiles[-2]
    per_token = max(0.0, (last.prune_seconds - prev.prune_seconds) / (last.tokens - prev.tokens))
    return last.prune_seconds + per_token * (tokens - last.tokens)


def tiny_llama(hidden: int) -> torch.nn.Module:
    """A seeded random Llama: ``WIDTH_LAYERS`` blocks, MLP 4 × hidden, heads of 64 (two of 32 at hidden 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(2, hidden // 64)
    config = LlamaConfig(vocab_size=WIDTH_VOCAB, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=WIDTH_LAYERS, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2 * WIDTH_CALIB[1])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def width_sweep(quick: bool) -> list[dict]:
    """COMP on tiny random Llamas of growing width, same random calibration tokens for all."""
    samples = torch.randint(0, WIDTH_VOCAB, WIDTH_CALIB, generator=torch.Generator().manual_seed(0))
    rows = []
    for hidden in (WIDTHS_QUICK if quick else WIDTHS_FULL):
        print(f"[cost] width {hidden}", file=sys.stderr, flush=True)
        model = tiny_llama(hidden)
        profile = median_profile(functools.partial(profile_comp, model, samples), lambda _s: True)
        rows.append({"hidden": hidden, "intermediate": 4 * hidden, "params": count_parameters(model),
                     "profile": profile})
    return rows


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x (the growth exponent); None with fewer than two points."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    return float(np.polyfit(np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs]), 1)[0])


# the growth tables' time columns: the three stages, neuron pruning's two parts, the whole prune
SERIES = {"capture": "capture s", "layer_removal": "layer removal s", "neuron_pruning": "neuron pruning s",
          "grams": "… of which Grams s", "solves": "… of which solves s", "prune": "prune s"}


def series(p: Profile) -> dict[str, float]:
    """A run's time columns. "solves" is neuron pruning less its block replays (Gram hooks included): the
    part that sees only d × d matrices, so it should not grow with tokens."""
    calls = p.calls.get("neuron_pruning", {})
    return {**{s: p.seconds.get(s, 0.0) for s in PRUNE_STAGES}, "grams": calls.get(GRAM, 0.0),
            "solves": p.seconds.get("neuron_pruning", 0.0) - calls.get("block forwards", 0.0),
            "prune": p.prune_seconds}


def exponents(xs: list[float], profiles: list[Profile]) -> dict[str, dict[str, float | None]]:
    """Per time column: the log-log slope over all points and over the last three."""
    columns = [series(p) for p in profiles]
    out = {}
    for name in SERIES:
        ys = [c[name] for c in columns]
        out[name] = {"all": slope(xs, ys), "last3": slope(xs[-3:], ys[-3:]) if len(xs) > 3 else None}
    return out


# ---------------------------------------------------------------------------------------------------------
# the section
# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch threads, then restore the count (other sections share the process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(quick: bool, out: Path) -> Section:
    bundled()  # loads once and sets the library's thread count, which the section then overrides
    with torch_threads(THREADS):
        return _run(quick, out)


def _run(quick: bool, out: Path) -> Section:
    start = time.perf_counter()
    deadline = start + QUICK_BUDGET_S
    load_before = os.getloadavg()[0]
    loaded = bundled()
    samples = calibration()
    print("[cost] floor: forward passes", file=sys.stderr, flush=True)
    # first, so the weights (memory-mapped at load) are resident before any RSS is charged to a stage
    forward = time_forward(loaded.model, samples, CompConfig().batch_size, repeats=3)
    print("[cost] default calibration, with export", file=sys.stderr, flush=True)
    default = profile_comp(loaded.model, samples, tokenizer=loaded.tokenizer, export=True)
    print("[cost] floor: Grams and factorisations", file=sys.stderr, flush=True)
    floor = measure_floor(loaded.model, samples, forward, default.pruned_layers)
    widths = width_sweep(quick)
    tokens, skipped = token_sweep(quick, deadline)
    by_tokens = sorted(tokens + [default], key=lambda p: p.tokens)
    load_after = os.getloadavg()[0]

    token_exp = exponents([p.tokens for p in by_tokens], by_tokens)
    width_exp = exponents([w["hidden"] for w in widths], [w["profile"] for w in widths])
    data = {"quick": quick, "ratio": RATIO, "calibration": CALIBRATION, "load_average": [load_before, load_after],
            "default": _as_dict(default), "floor": floor, "block_passes": block_passes(default),
            "tokens": [_as_dict(p) for p in by_tokens], "tokens_skipped": skipped, "token_exponents": token_exp,
            "widths": [{**{k: v for k, v in w.items() if k != "profile"}, **_as_dict(w["profile"])} for w in widths],
            "width_exponents": width_exp, "untimed_calls": untimed_calls(), "machine": machine()}
    markdown = _markdown(quick, default, floor, by_tokens, skipped, token_exp, widths, width_exp,
                         (load_before, load_after), time.perf_counter() - start)
    return Section(name="cost", title="Cost", markdown=markdown, data=data,
                   figures=save_figure(_figure(by_tokens, widths), out, "cost_growth"))


def _as_dict(p: Profile) -> dict:
    return {"n_samples": p.n_samples, "seq_len": p.seq_len, "tokens": p.tokens, "seconds": p.seconds,
            "prune_seconds": p.prune_seconds, "peak_rss_mb": p.peak_rss_mb, "rss_start_mb": p.rss_start_mb,
            "calls": p.calls, "removed_layers": p.removed_layers, "pruned_layers": p.pruned_layers,
            "compensation": p.compensation, "realised_ratio": p.realised_ratio, "repeats": p.repeats}


def _breakdown(profile: Profile, stage: str) -> list[tuple[str, float]]:
    """A stage's seconds split by the timed library functions (nested time taken out), rest as "other"."""
    calls = dict(profile.calls.get(stage, {}))
    for outer, inner in NESTED.items():
        if outer in calls and inner in calls:
            calls[outer] -= calls[inner]
    total = profile.seconds[stage]
    parts = sorted(calls.items(), key=lambda kv: -kv[1])
    return parts + [("other (allocation, bookkeeping, copies)", max(0.0, total - sum(calls.values())))]


def _stage_table(p: Profile) -> str:
    rows = [[s.replace("_", " "), p.seconds.get(s), p.peak_rss_mb.get(s), p.peak_rss_mb.get(s, 0.0) - p.rss_start_mb]
            for s in STAGES if s in p.seconds]
    rows.append(["prune (copy → neuron pruning)", p.prune_seconds, max(p.peak_rss_mb.get(s, 0.0) for s in STAGES),
                 max(p.peak_rss_mb.values()) - p.rss_start_mb])
    return markdown_table(["stage", "seconds", "peak RSS MiB", "above the run's start MiB"], rows)


def _growth_table(label: str, xs: list, profiles: list[Profile], exps: dict, extra: list[list] | None = None,
                  extra_head: list[str] | None = None) -> str:
    head = [label] + (extra_head or []) + list(SERIES.values()) + ["peak RSS MiB (rise)"]
    rows = []
    for i, (x, p) in enumerate(zip(xs, profiles)):
        peak = max(p.peak_rss_mb.values())
        rows.append([x] + (extra[i] if extra else []) + list(series(p).values())
                    + [f"{peak:,.0f} (+{peak - p.rss_start_mb:,.0f})"])
    pad = [""] * len(extra_head or [])
    fmt = lambda v: f"{v:.2f}" if v is not None else None  # noqa: E731
    for key, title in (("all", "**exponent, all points**"), ("last3", "**exponent, last 3**")):
        rows.append([title] + pad + [fmt(exps[s][key]) for s in SERIES] + [""])
    return markdown_table(head, rows)


def _floor_table(default: Profile, floor: dict) -> tuple[str, str]:
    passes = block_passes(default)
    n = default.n_layers
    front = default.seconds["capture"] + default.seconds["layer_removal"]
    front_equiv = (passes["capture"] + passes["layer_removal"]) / n
    neuron = default.seconds["neuron_pruning"]
    solve_floor = floor["gram"] + floor["cholesky"]
    whole = front + neuron
    whole_floor = floor["forward"] + solve_floor
    rows = [
        ["capture + layer removal", front, "1 forward pass over the blocks", floor["forward"], front / floor["forward"]],
        ["neuron pruning", neuron, f"{len(floor['layers']) * 4} Gram products ({floor['gram_gflops']:.0f} GFLOP "
         f"float64) + {floor['n_cholesky']} Cholesky factorisations", solve_floor, neuron / solve_floor],
        ["capture → neuron pruning", whole, "1 forward + Grams + factorisations", whole_floor, whole / whole_floor],
    ]
    table = markdown_table(["stage", "measured s", "floor", "floor s", "measured / floor"], rows)
    parts = _breakdown(default, "neuron_pruning")
    forwards = dict(parts).get("block forwards", 0.0)
    top = [(k, v) for k, v in parts if k not in ("block forwards", GRAM)][:3]
    removal = dict(_breakdown(default, "layer_removal"))
    sentence = (
        f"Capture + layer removal run {passes['capture'] + passes['layer_removal']} block forwards "
        f"({front_equiv:.1f} forward passes: capture 1, and the iterative removal re-measures every kept block "
        f"{len(default.removed_layers) + 1} times), so {front / floor['forward']:.1f}× the one-pass floor is mostly "
        f"structural; per block pass it costs {front / (front_equiv * floor['forward']):.2f}× a plain forward "
        f"(cosine importance {removal.get('cosine importance', 0.0):.2f} s). Neuron pruning is "
        f"{neuron / solve_floor:.1f}× its floor: it replays the kept blocks once more ({forwards:.1f} s of block "
        f"forwards without the Gram hooks, {forwards / neuron:.0%} of the stage), and "
        + ", ".join(f"{k} {v:.1f} s ({v / neuron:.0%})" for k, v in top)
        + f"; the library's Gram updates take {dict(parts).get(GRAM, 0.0):.1f} s against "
        f"{floor['gram']:.1f} s measured alone.")
    return table, sentence


def _markdown(quick: bool, default: Profile, floor: dict, by_tokens: list[Profile], skipped: list[str],
              token_exp: dict, widths: list[dict], width_exp: dict, load: tuple[float, float],
              seconds: float) -> str:
    cal = CALIBRATION
    floor_table, floor_sentence = _floor_table(default, floor)
    neuron_rows = [[k, v, f"{v / default.seconds['neuron_pruning']:.0%}"]
                   for k, v in _breakdown(default, "neuron_pruning")]
    token_rows = [[f"{p.n_samples}×{p.seq_len}" + (" (default)" if p is default else ""),
                   ", ".join(f"{k} {v}" for k, v in sorted(p.compensation.items()))] for p in by_tokens]
    width_profiles = [w["profile"] for w in widths]
    return "\n\n".join([
        command_line("cost", quick),
        f"COMP at ratio {RATIO} with the library's defaults (1 removed layer, inputs of down and o pruned, "
        f"refit 'auto'), bundled SmolLM2-135M-Instruct in float32 on CPU with {THREADS} torch thread{'s' if THREADS > 1 else ''} (two threads "
        "ran 5× slower on this shared machine under load), calibration "
        f"{cal['name']} {cal['n_samples']}×{cal['seq_len']} tokens, seed {cal['seed']}. Stages: the model copy `prune` makes, "
        "the library's `plan.timings`, and `save_pruned` into a temporary folder. Peak RSS: current RSS sampled "
        f"every {RSS_INTERVAL_S * 1000:.0f} ms in a thread, charged to the stage the library's progress events "
        "announced (a lower bound). The process already holds the loaded model; before every run garbage is collected "
        "and freed heap handed back (`malloc_trim`), so 'rise' / 'above the start' is the run's own growth.",
        _stage_table(default),
        "**Where neuron pruning's time goes** (the library's functions timed in place; block forwards without "
        "the Gram hooks inside them" + (f"; not found, so not timed: {', '.join(untimed_calls())}"
                                        if untimed_calls() else "") + "):",
        markdown_table(["part", "seconds", "share"], neuron_rows),
        f"**Growth with calibration tokens** (C4, seed {cal['seed']}; n_samples × seq_len; one run per point, "
        f"median of 3 where a run takes under {CHEAP_S:.0f} s; exponent = least-squares slope of log time on "
        "log tokens):",
        _growth_table("calibration", [f"{p.n_samples}×{p.seq_len}" for p in by_tokens], by_tokens, token_exp,
                      [[p.tokens] for p in by_tokens], ["tokens"]),
        "Compensation used per pruned dense (refit 'auto' switches a dense from mask tuning to a full refit once "
        "the calibration has 8 tokens per input column):",
        markdown_table(["calibration", "pruned denses by kind:compensation"], token_rows)
        + (f"\n\nSkipped to stay inside the quick budget of {QUICK_BUDGET_S / 60:.1f} min: {', '.join(skipped)}."
           if skipped else ""),
        f"**Growth with model width** (random Llama, {WIDTH_LAYERS} blocks, MLP 4 × hidden, vocabulary "
        f"{WIDTH_VOCAB}, {WIDTH_CALIB[0]}×{WIDTH_CALIB[1]} random tokens; exponent in hidden size):",
        _growth_table("hidden", [w["hidden"] for w in widths], width_profiles, width_exp,
                      [[w["intermediate"], f"{w['params']:,}"] for w in widths], ["MLP", "params"]),
        f"**Against the floor** (default calibration, same tokens; forward: median of "
        f"{len(floor['forward_runs'])} runs of the blocks without logits; Grams: float64 XᵀX of every dense "
        f"input of the {len(floor['layers'])} blocks COMP neuron-prunes, on their real inputs; one "
        "`torch.linalg.cholesky` of a damped d_in × d_in float64 Gram per dense of those blocks):",
        floor_table, floor_sentence,
        f"Machine: {machine()}. Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end — "
        f"timings are noisy when it is above the CPU count. Section time {seconds / 60:.1f} min."])


FIGURE_SERIES = {"capture": ("#1f77b4", None), "layer_removal": ("#ff7f0e", None),
                 "neuron_pruning": ("#2ca02c", None), "solves": ("#2ca02c", "dash"), "prune": ("#444444", "dot")}


def _figure(by_tokens: list[Profile], widths: list[dict]) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time vs calibration tokens (SmolLM2-135M)",
                                                        f"time vs hidden size (random Llama, {WIDTH_LAYERS} blocks)"))
    for col, xs, profiles in ((1, [p.tokens for p in by_tokens], by_tokens),
                              (2, [w["hidden"] for w in widths], [w["profile"] for w in widths])):
        columns = [series(p) for p in profiles]
        for name, (colour, dash) in FIGURE_SERIES.items():
            fig.add_trace(go.Scatter(x=xs, y=[c[name] for c in columns], mode="lines+markers",
                                     name=SERIES[name].removesuffix(" s"), line={"color": colour, "dash": dash},
                                     legendgroup=name, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(type="log", title_text="calibration tokens", row=1, col=1)
    fig.update_xaxes(type="log", title_text="hidden size", row=1, col=2)
    fig.update_yaxes(type="log", title_text="seconds", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(template="plotly_white", title="COMP: wall time per stage")
    return fig

if __name__ == "__main__":
    main_for(run)

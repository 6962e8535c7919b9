"""Several methods, one calibration sample, one table: what ``comp-explorer compare`` and the GUI's Compare
tab run. Every method prunes its own copy of the same original with the same samples, and every pruned
model is evaluated on the same windows, so the rows differ only by method and ratio.

Peak memory per row is sampled while that method prunes (``runtime.RssSampler``; the process-wide
high-water mark would only ever show the worst method so far). The original and its copy are both resident
then, as they are for a user who keeps the original.
"""
from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..math.allocation import ImpossibleRatioError
from ..data import get_eval_tokens
from ..events import Cancelled, ProgressCallback, emit
from ..methods import REGISTRY, get_method, prune_with
from ..models.adapters import count_block_parameters
from ..results import CompPlan
from ..runtime import RssSampler, check_ratio_of, count_parameters, ratio_over_all
from ..settings import settings_for
from .report import evaluate_model
from ..export.folder import folder_bytes, save_pruned
from .zeroshot import build_tasks


@dataclass
class CompareRow:
    """One method at one target: ``target_ratio`` is a share of ``ratio_of`` (all parameters or the decoder
    blocks'), ``realised_ratio`` the share of all parameters removed and ``realised_block_ratio`` the share of
    the blocks' parameters."""

    method: str
    kind: str
    target_ratio: float
    realised_ratio: float | None
    ppl: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)  # zero-shot, per task (ZeroShotReport.headline)
    prune_seconds: float | None = None
    peak_rss_mb: float | None = None
    saved_bytes: int | None = None
    params_after: int | None = None
    sparsity: str | None = None  # masks: the pattern asked for ("0.5", "2:4", …); None for structured rows
    linear_sparsity: float | None = None  # masks: share of zeros in the pruned linears
    zero_share: float | None = None  # share of ALL parameters that are zero
    error: str | None = None  # the method could not prune at this ratio (the row has no figures then)
    notes: list[str] = field(default_factory=list)
    plan: CompPlan | None = None  # not serialised
    ratio_of: str = "all"  # what target_ratio is a share of: "all" parameters or the decoder "blocks"'
    realised_block_ratio: float | None = None  # share of the decoder blocks' parameters removed
    block_zero_share: float | None = None  # masks: share of the decoder blocks' parameters that are zero

    def to_dict(self) -> dict:
        return {"method": self.method, "kind": self.kind, "target_ratio": self.target_ratio,
                "ratio_of": self.ratio_of, "realised_ratio": self.realised_ratio,
                "realised_block_ratio": self.realised_block_ratio, "ppl": dict(self.ppl),
                "accuracy": dict(self.accuracy), "prune_seconds": self.prune_seconds,
                "peak_rss_mb": self.peak_rss_mb, "saved_bytes": self.saved_bytes, "params_after": self.params_after,
                "sparsity": self.sparsity, "linear_sparsity": self.linear_sparsity, "zero_share": self.zero_share,
                "block_zero_share": self.block_zero_share, "error": self.error, "notes": list(self.notes)}


def saved_size(model: nn.Module, tokenizer) -> int:
    """Bytes of the safetensors files ``save_pruned`` writes for ``model`` (in a temporary folder)."""
    from transformers.utils import logging as hf_logging

    folder = tempfile.mkdtemp(prefix="comp-compare-")
    hf_logging.disable_progress_bar()  # a bar per row would drown the comparison's own progress
    try:
        path = save_pruned(model, None, f"{folder}/model")
        return folder_bytes(path, ".safetensors")
    finally:
        hf_logging.enable_progress_bar()
        shutil.rmtree(folder, ignore_errors=True)


def _ratio_label(ratio: float, ratio_of: str) -> str:
    """A target as a person reads it: "20%" of all parameters, "20% of blocks" of the decoder blocks'."""
    return f"{ratio:.0%}" + (" of blocks" if ratio_of == "blocks" else "")


SEARCHED = "@search"  # a compare label's suffix: the same method with ``allocation="search"``


def method_of(label: str) -> tuple[str, dict]:
    """A compare label's registered method and the settings the label implies: "comp@search" is COMP with the
    searched per-layer allocation (refused, naming those that can, for a method without per-layer levels)."""
    if not label.endswith(SEARCHED):
        return label, {}
    name = label[: -len(SEARCHED)]
    if not get_method(name).method.searchable:
        able = [n for n, e in REGISTRY.items() if e.method.searchable]
        raise ValueError(f"'{label}': method '{name}' has no per-layer levels to search; methods that search: "
                         f"{', '.join(able)}")
    return name, {"allocation": "search"}


def _jobs(methods: list[str], ratios: list[float], sparsities: list[str], settings: dict[str, dict]) -> list:
    """(ratio, sparsity, label, method, settings) per row: structured methods at every ratio, mask methods at
    every sparsity, composed methods (which have both) at every pair. A label "name@search" is the method with
    its searched allocation; ``settings[name]`` applies to both labels."""
    jobs = []
    for label in methods:
        name, implied = method_of(label)
        fields = set(get_method(name).settings_class.__dataclass_fields__)
        for ratio in (ratios if "ratio" in fields else [None]):
            for sparsity in (sparsities if "sparsity" in fields else [None]):
                targets = {k: v for k, v in (("ratio", ratio), ("sparsity", sparsity)) if v is not None}
                values = {**settings.get(name, {}), **settings.get(label, {}), **implied, **targets}
                jobs.append((ratio, sparsity, label, name, settings_for(name, values=values)))
    return sorted(jobs, key=lambda j: (j[0] is None, j[0] or 0.0, j[1] or ""))


def compare_methods(model: nn.Module, tokenizer, samples: torch.Tensor | None, methods: list[str],
                    ratios: list[float], eval_sets: list[str], *, ratio_of: str = "all",
                    sparsities: list[str] | None = None, max_windows: int | None = None,
                    eval_seq_len: int = 512, settings: dict[str, dict] | None = None, measure_bytes: bool = True,
                    include_original: bool = True, tasks: list[str] | None = None, task_limit: int | None = None,
                    on_event: ProgressCallback | None = None, on_row=None) -> list[CompareRow]:
    """One row per (ratio or sparsity, method), plus the original first; ``model`` is never changed.

    Settings are each method's registered defaults with ``ratio`` and ``settings[method]`` applied; bad
    method names, settings or ratios fail here before any pruning. ``ratio_of``: what every ratio is a share
    of, "all" parameters (the default) or the decoder "blocks"' parameters (``prune_with`` converts it). A
    method that cannot reach a ratio gets a row with ``error`` set instead of stopping the comparison.
    ``Cancelled`` raised from ``on_event`` stops it. ``tasks``: lm-eval zero-shot tasks scored on every row
    (``task_limit``: each task's first N items), the accuracy papers tabulate (acc_norm where the task has it,
    else acc).
    """
    settings = settings or {}
    tasks = list(tasks or [])
    if tasks:
        if task_limit is not None and (isinstance(task_limit, bool) or not isinstance(task_limit, int)
                                       or task_limit < 1):
            raise ValueError(f"task_limit must be an integer >= 1, got {task_limit!r}")
        build_tasks(tasks)  # harness installed, names known, data readable: fail before minutes of pruning
    for label in settings:
        get_method(method_of(label)[0])
    check_ratio_of(ratio_of)
    if ratio_of != "all":
        params_total, block_params = count_parameters(model), count_block_parameters(model)
        for ratio in ratios:
            ratio_over_all(ratio, ratio_of, params_total, block_params)
    jobs = _jobs(methods, ratios, list(sparsities or ["0.5"]), settings)
    tokens = {name: get_eval_tokens(name, tokenizer) for name in eval_sets}
    rows: list[CompareRow] = []

    def done(row: CompareRow) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if include_original:
        row = CompareRow(method="original", kind="-", target_ratio=0.0, realised_ratio=0.0, ratio_of=ratio_of,
                         realised_block_ratio=0.0, params_after=count_parameters(model))
        measured = evaluate_model(model, tokenizer, sets=eval_sets, seq_len=eval_seq_len, max_windows=max_windows,
                                  tokens=tokens, tasks=tasks, task_limit=task_limit, label="original",
                                  on_event=on_event)
        row.ppl, row.accuracy = measured.ppl, measured.accuracy
        if measure_bytes:
            row.saved_bytes = saved_size(model, tokenizer)
        done(row)
    for step, (ratio, sparsity, label, name, method_settings) in enumerate(jobs):
        target = " + ".join(t for t in (_ratio_label(ratio, ratio_of) if ratio is not None else "", sparsity or "")
                            if t)
        emit(on_event, "compare", step, len(jobs), f"{label} at {target}")
        entry = get_method(name)
        row = CompareRow(method=label, kind=entry.kind, target_ratio=ratio or 0.0, realised_ratio=None,
                         ratio_of=ratio_of, sparsity=sparsity)
        try:
            with RssSampler() as rss:
                start = time.perf_counter()
                pruned, result = prune_with(name, model, samples, method_settings, ratio_of=ratio_of,
                                            on_event=on_event)
                row.prune_seconds = time.perf_counter() - start
        except Cancelled:
            raise
        except (ValueError, ImpossibleRatioError) as err:
            row.error = str(err)
            done(row)
            continue
        row.peak_rss_mb = rss.peak_mb
        row.realised_ratio = result.realised_ratio
        row.realised_block_ratio = result.realised_block_ratio
        row.params_after = result.params_after
        row.plan = result.plan
        row.notes = list(result.plan.notes)
        row.linear_sparsity = result.extra.get("linear_sparsity")
        row.zero_share = result.extra.get("zero_share")
        row.block_zero_share = result.extra.get("block_zero_share")
        measured = evaluate_model(pruned, tokenizer, sets=eval_sets, seq_len=eval_seq_len, max_windows=max_windows,
                                  tokens=tokens, tasks=tasks, task_limit=task_limit, label=label, on_event=on_event)
        row.ppl, row.accuracy = measured.ppl, measured.accuracy
        if measure_bytes:
            try:
                row.saved_bytes = saved_size(pruned, tokenizer)
            except (ValueError, NotImplementedError) as err:  # an architecture the export does not cover
                row.notes.append(f"not saved: {err}")
        done(row)
        del pruned, result
        gc.collect()
    emit(on_event, "compare", len(jobs), len(jobs), "done")
    return rows


def mean_accuracy(accuracy: dict[str, float]) -> float:
    """Unweighted mean over tasks, as the papers' 'Avg' column."""
    return sum(accuracy.values()) / len(accuracy)


def _share(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "—"


def rows_table(rows: list[CompareRow], eval_sets: list[str]) -> str:
    """The comparison as a Markdown table (what the CLI prints): what each row removed as a share of all
    parameters and of the decoder blocks' parameters (masks: the zeros, both ways)."""
    masks = any(r.sparsity for r in rows)
    tasks = list(dict.fromkeys(t for r in rows for t in r.accuracy))
    head = (["method", "kind", "target", "realised of all", "realised of blocks"]
            + (["sparsity", "zeros of all", "zeros of blocks"] if masks else [])
            + [f"ppl {n}" for n in eval_sets] + [f"acc {t}" for t in tasks] + (["mean acc"] if tasks else [])
            + ["prune s", "peak RSS MB", "saved MB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = " + ".join(t for t in (_ratio_label(r.target_ratio, r.ratio_of) if r.target_ratio else "",
                                        r.sparsity or "") if t)
        mask_cells = ([_share(r.linear_sparsity), _share(r.zero_share), _share(r.block_zero_share)]
                      if masks else [])
        if r.error:
            cells = ([r.method, r.kind, target or "0%"]
                     + ["—"] * (len(head) - 3))
            cells[-1] = f"error: {r.error[:60]}"
        else:
            cells = ([r.method, r.kind, target or "0%", f"{r.realised_ratio:.2%}", _share(r.realised_block_ratio)]
                     + mask_cells
                     + [f"{r.ppl[n]:.2f}" for n in eval_sets]
                     + [f"{r.accuracy[t]:.4f}" if t in r.accuracy else "—" for t in tasks]
                     + ([f"{mean_accuracy(r.accuracy):.4f}" if r.accuracy else "—"] if tasks else [])
                     + [f"{r.prune_seconds:.1f}" if r.prune_seconds is not None else "—",
                        f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "—",
                        f"{r.saved_bytes / 2**20:.1f}" if r.saved_bytes is not None else "—"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

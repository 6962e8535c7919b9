"""One model measured the way every face asks for it: perplexity on some sets, zero-shot accuracy on some
lm-eval tasks, generation speed. The CLI's ``eval`` and ``prune``, ``compare`` and the GUI's Evaluate all
call :func:`evaluate_model`, so the windows, progress events and notes are the same everywhere.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..data import get_eval_tokens
from ..events import ProgressCallback, PruneEvent, emit
from ..runtime import stage
from .loss import perplexity
from .speed import SpeedReport, measure_speed
from .zeroshot import ZeroShotReport, evaluate_tasks


@dataclass(frozen=True)
class SpeedSettings:
    """How :func:`comp_core.evaluate.speed.measure_speed` times a model (its keyword arguments)."""

    prefill_tokens: int = 512
    decode_tokens: int = 64
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 5
    measure_memory: bool = True


@dataclass
class EvalReport:
    """What :func:`evaluate_model` measured; a part not asked for stays empty (None)."""

    ppl: dict[str, float] = field(default_factory=dict)  # set -> perplexity
    windows: dict[str, int] = field(default_factory=dict)  # set -> windows evaluated
    zeroshot: ZeroShotReport | None = None
    speed: SpeedReport | None = None
    notes: list[str] = field(default_factory=list)  # e.g. a set shorter than the windows asked for

    @property
    def accuracy(self) -> dict[str, float]:
        """Zero-shot headline accuracy per task (acc_norm where the task has it, else acc)."""
        return self.zeroshot.headline() if self.zeroshot is not None else {}

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Median greedy decode speed at batch 1 (the smallest batch measured), or None without speed."""
        if self.speed is None or not self.speed.decode_tps:
            return None
        return float(self.speed.decode_tps[min(self.speed.decode_tps)].median)

    def ppl_dict(self) -> dict[str, float | int]:
        """``{set: ppl, "<set>_windows": n}``: what the CLI's JSON reports."""
        out: dict[str, float | int] = {}
        for name, value in self.ppl.items():
            out[name] = value
            out[f"{name}_windows"] = self.windows[name]
        return out


def evaluate_model(model: nn.Module, tokenizer, *, sets: Sequence[str] = (), seq_len: int = 512,
                   max_windows: int | None = None, tokens: Mapping[str, torch.Tensor] | None = None,
                   tasks: Sequence[str] = (), task_limit: int | None = None, batch_size: int = 1,
                   speed: SpeedSettings | None = None, label: str = "model", quiet: bool = True,
                   on_event: ProgressCallback | None = None, timings: dict | None = None) -> EvalReport:
    """Perplexity on ``sets`` (windows of ``seq_len``; ``tokens`` may hold sets tokenised already), zero-shot
    accuracy on ``tasks`` (``task_limit``: each task's first N items) and, with ``speed``, generation speed.

    Progress goes to ``on_event`` ("evaluate", "zeroshot", "speed" stages, ``label`` in the message), so a
    ``Cancelled`` raised there stops it; ``timings`` (a dict) receives each stage's seconds as the CLI
    reports them. ``model`` is never changed.
    """
    report = EvalReport()

    def timed(name: str):
        return stage(name, timings) if timings is not None else contextlib.nullcontext()

    for name in sets:
        def on_progress(done: int, total: int, name: str = name) -> None:
            on_event(PruneEvent("evaluate", done, total, f"{label} {name}", {"set": name, "model": label}))

        with timed(f"eval_{label}_{name}"):
            stream = tokens[name] if tokens is not None and name in tokens else get_eval_tokens(name, tokenizer)
            result = perplexity(model, stream, seq_len, max_windows=max_windows,
                                on_progress=on_progress if on_event is not None else None)
        report.ppl[name] = result.ppl
        report.windows[name] = result.n_windows
        if max_windows and result.n_windows < max_windows:
            report.notes.append(f"{name}: its text holds {result.n_windows} windows of {seq_len} tokens, so "
                                f"{result.n_windows} were evaluated, not the {max_windows} --max-windows asked for")
    if tasks:
        emit(on_event, "zeroshot", 0, 1, f"{label}: {', '.join(tasks)}")
        with timed("zeroshot"):
            report.zeroshot = evaluate_tasks(model, tokenizer, list(tasks), limit=task_limit, batch_size=batch_size,
                                             quiet=quiet, on_event=on_event)
        emit(on_event, "zeroshot", 1, 1, f"{label}: done")
    if speed is not None:
        emit(on_event, "speed", 0, 1, label)
        with timed(f"speed_{label}"):
            report.speed = measure_speed(model, tokenizer, label=label, **asdict(speed))
        emit(on_event, "speed", 1, 1, f"{label}: done")
    return report

"""Perplexity and calibration loss: the numbers every pruning run is judged by.

Protocol (as in Wanda's ``eval_ppl`` / SparseGPT's ``*_eval``): cut one token stream into
non-overlapping windows of ``seq_len`` tokens (the last partial window is dropped), predict every token
of a window from the ones before it inside the same window (``seq_len - 1`` predictions per window),
and report ``ppl = exp(mean token NLL)``. The loss is computed here from the logits in float32, not
taken from the model's ``loss`` output, so every architecture and dtype is scored the same way.
Evaluation is never called from inside pruning code.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..preflight import check_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll is the mean NLL per predicted token; n_tokens counts predicted tokens."""

    ppl: float
    nll: float
    n_windows: int
    n_tokens: int
    seq_len: int
    seconds: float


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _check_token_range(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if size is not None and tokens.numel() and (int(tokens.max()) >= size or int(tokens.min()) < 0):
        raise ValueError(
            f"token ids span [{int(tokens.min())}, {int(tokens.max())}] but the model has {size} embeddings: "
            "was the text tokenised with another model's tokenizer?"
        )


def _batch_nll_sum(model: torch.nn.Module, input_ids: torch.Tensor) -> float:
    """Sum of next-token NLL over ``input_ids`` (b, L): ``b * (L - 1)`` predictions, float32 logits."""
    logits = model(input_ids, use_cache=False).logits  # (b, L, V)
    vocab = logits.shape[-1]
    shift_logits = logits[:, :-1, :].reshape(-1, vocab).float()  # (b*(L-1), V)
    shift_labels = input_ids[:, 1:].reshape(-1)  # (b*(L-1),)
    return F.cross_entropy(shift_logits, shift_labels, reduction="sum").item()


def _mean_nll(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    on_progress: Callable[[int, int], None] | None,
) -> float:
    """Mean next-token NLL over ``windows`` (n, L), in eval mode under inference_mode; restores train mode."""
    n_windows, length = windows.shape
    total = 0.0  # python float: float64 accumulation
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)  # (b, L)
                total += _batch_nll_sum(model, batch)
                if on_progress is not None:
                    on_progress(min(start + batch_size, n_windows), n_windows)
    finally:
        model.train(was_training)
    return total / (n_windows * (length - 1))


def _exp(nll: float) -> float:
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf


def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 2048,
    *,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``tokens`` (``LongTensor[1, T]`` or ``[T]``) with the standard protocol.

    Uses the first ``min(T // seq_len, max_windows)`` non-overlapping windows. ``device`` is where the
    inputs go (default: the device of the model's first parameter); the model itself is not moved.
    ``on_progress(done_windows, total_windows)`` is called after every batch.
    """
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be one stream, shape [1, T] or [T]; got {tuple(tokens.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_context(model, seq_len)
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    n_windows = tokens.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"the token stream has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = tokens[: n_windows * seq_len].reshape(n_windows, seq_len).long()  # (n, seq_len)
    _check_token_range(model, windows)
    device = torch.device(device) if device is not None else _model_device(model)

    started = time.perf_counter()
    nll = _mean_nll(model, windows, batch_size, device, on_progress)
    seconds = time.perf_counter() - started
    result = PerplexityResult(
        ppl=_exp(nll),
        nll=nll,
        n_windows=n_windows,
        n_tokens=n_windows * (seq_len - 1),
        seq_len=seq_len,
        seconds=seconds,
    )
    if not math.isfinite(nll):
        log.warning("perplexity: non-finite mean NLL (%s); the model's outputs are broken", nll)
    log.info("perplexity %.4f over %d windows of %d tokens (%.1f s)", result.ppl, n_windows, seq_len, seconds)
    return result


def calibration_loss(model: torch.nn.Module, samples: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token NLL of calibration samples ``LongTensor[n, L]`` (each row scored on its own).

    Cheap proxy for quality while choosing how many blocks to remove: it uses data already in memory.
    """
    if samples.dim() != 2 or samples.shape[1] < 2 or samples.shape[0] < 1:
        raise ValueError(f"samples must have shape [n >= 1, L >= 2], got {tuple(samples.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = samples.long()
    _check_token_range(model, samples)
    return _mean_nll(model, samples, batch_size, _model_device(model), None)

"""Prune&Comp's magnitude compensation for removed blocks, in closed form (Chen et al., AAAI 2026,
arXiv 2507.18212; reference code ``magcomp.py``).

Every block adds to the residual stream, so the hidden states leaving block i are larger than those entering
it. Removing block i hands block i+1 the smaller input x instead of y; Prune&Comp multiplies the stream at the
cut by one scalar measured on calibration data,

    s = (1/D) Σ_c (1/N) Σ_n [ mean_t |y_n[t,c]| / mean_t |x_n[t,c]| ]

over the D hidden channels c and the N calibration sequences n (t: the tokens of one sequence) — the mean of
per-channel, per-sequence ratios, not a ratio of means. Since every (n, c) pair weighs the same, that is the
mean over all N·D ratios, so batches add up as (sum, count).

Where several blocks go, kept block k sees the product of the scales of every gap before it
(``cumulative_scales``); a replay of the shortened model multiplies the stream entering each active block by
the scales of the gaps just before it (``entering_scales``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

MAGNITUDE_DTYPE = torch.float64  # the per-channel token means and their ratios


def channel_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """mean_t |x[n, t, c]| per sequence n and channel c: (batch, seq, d) → (batch, d), in ``MAGNITUDE_DTYPE``
    (|x| is exact in the stream's own precision; the sum over tokens accumulates in float64)."""
    if x.dim() != 3:
        raise ValueError(f"expected hidden states of shape (batch, seq, d), got {tuple(x.shape)}")
    return x.abs().sum(dim=1, dtype=MAGNITUDE_DTYPE) / x.shape[1]  # (batch, d)


def magnitude_ratio_sum(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Σ over sequences n and channels c of mean_t |y_n[t,c]| / mean_t |x_n[t,c]|, and the number of (n, c)
    pairs — one calibration batch's share of ``magnitude_scale``. x, y: (batch, seq, d), a block's input and
    output. Refuses a channel that is zero over a whole sequence of x (the ratio is undefined there)."""
    if x.shape != y.shape:
        raise ValueError(f"input and output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mx, my = channel_magnitudes(x), channel_magnitudes(y)  # (batch, d)
    if not bool((mx > 0).all()):
        n, c = (torch.nonzero(mx <= 0)[0]).tolist()
        raise ValueError(f"hidden channel {c} of calibration sequence {n} is zero at the block's input: its "
                         "magnitude ratio (Prune&Comp's scale) is undefined")
    return float((my / mx).sum()), mx.numel()


def magnitude_scale(x_batches: Sequence[torch.Tensor], y_batches: Sequence[torch.Tensor]) -> float:
    """Prune&Comp's scale s of one removed block from its inputs ``x_batches`` and outputs ``y_batches`` (one
    (batch, seq, d) tensor per calibration batch; each row a sequence): the mean over every sequence and
    channel of mean_t |y| / mean_t |x|."""
    if len(x_batches) != len(y_batches) or not x_batches:
        raise ValueError("need one output batch per input batch, and at least one")
    total, count = 0.0, 0
    for x, y in zip(x_batches, y_batches):
        s, n = magnitude_ratio_sum(x, y)
        total, count = total + s, count + n
    return total / count


def cumulative_scales(kept: Iterable[int], scales: Mapping[int, float]) -> dict[int, float]:
    """{kept block k: the product of ``scales[g]`` over every removed block g < k} (original indices).

    Prune&Comp's own form multiplies the stream at each cut (embeddings and every earlier block's output
    projections); the equivalent form that leaves the embeddings alone (tied to the head in many models)
    divides block k's output projections by this product instead. Blocks before the first gap get 1.0."""
    out = {}
    for k in kept:
        factor = 1.0
        for g in sorted(scales):
            if g < k:
                factor *= scales[g]
        out[k] = factor
    return out


def entering_scales(active: Sequence[int], scales: Mapping[int, float]) -> dict[int, float]:
    """{active block k: the product of ``scales[g]`` over the removed blocks g between the previous active
    block and k} — what a replay of the shortened model multiplies the stream entering k by; only blocks with
    a gap just before them appear. Gaps after the last active block are left out (the stream then meets the
    final norm, which is scale invariant)."""
    out = {}
    previous = -1
    for k in active:
        gaps = [g for g in sorted(scales) if previous < g < k]
        if gaps:
            factor = 1.0
            for g in gaps:
                factor *= scales[g]
            out[k] = factor
        previous = k
    return out

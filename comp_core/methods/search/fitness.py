"""The search's fitness: KL divergence from the original model's next-token distribution to a candidate's, per
token, on held-out calibration sequences (EvoPress ``src/metrics.py``: KL(P_original ‖ Q_candidate) over the
whole vocabulary, every position but the last, averaged over tokens).

The original's log-probabilities are computed once (``Reference``, kept in float16: a tenth of a percent
on a log-probability moves every candidate's score alike). The early selection stages draw their minibatch of
held-out sequences afresh each time from a seeded generator, taking whole sequences until the stage's token
budget (the last one cut short), as EvoPress does. The last stage — where the parent meets the survivors —
reads the same tokens every generation (drawn once): on the bundled model the KL of one allocation moved by
a factor of two between two 1 024-token draws, so fresh draws there would let a lucky draw replace the parent
and make the curve of the parent's fitness unreadable; with one set the parent only ever improves on it, and
the search's result is still judged on every held-out token (``StagedKL.full``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

REFERENCE_DTYPE = torch.float16


def token_kl(reference_logp: torch.Tensor, logits: torch.Tensor) -> tuple[float, int]:
    """Σ over positions of KL(P ‖ Q) = Σ_v p_v (log p_v − log q_v), with P from ``reference_logp`` (…, V)
    log-probabilities and Q = softmax(``logits``) (…, V); and the number of positions."""
    logq = F.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    logp = reference_logp.float().reshape(-1, logits.shape[-1])
    return float(F.kl_div(logq, logp, log_target=True, reduction="sum")), logq.shape[0]


@dataclass
class Reference:
    """Held-out token ids (n, seq_len) and the original model's log-probabilities at every position but the
    last (n, seq_len − 1, V)."""

    tokens: torch.Tensor
    logp: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> "Reference":
        logp = [F.log_softmax(_logits(model, tokens[s:s + batch_size])[:, :-1].float(), dim=-1).to(REFERENCE_DTYPE)
                for s in range(0, tokens.shape[0], batch_size)]
        return cls(tokens=tokens, logp=torch.cat(logp))

    @property
    def megabytes(self) -> float:
        return self.logp.numel() * self.logp.element_size() / 2**20


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=ids.to(device), use_cache=False).logits.cpu()


def minibatch(n_sequences: int, seq_len: int, tokens: int, rng: random.Random) -> list[tuple[int, int]]:
    """(sequence, length) pairs: random distinct sequences, whole, until ``tokens`` (the last cut short; at
    least 2 tokens each, so a position has a next token); all of them if the budget exceeds the set."""
    order = list(range(n_sequences))
    rng.shuffle(order)
    out, left = [], tokens
    for s in order:
        if left < 2:
            break
        length = min(seq_len, left)
        out.append((s, length))
        left -= length
    return out


def mean_kl(model: nn.Module, reference: Reference, batch: Sequence[tuple[int, int]], batch_size: int = 4) -> float:
    """The model's mean per-token KL to the reference on ``batch`` ((sequence, length) pairs)."""
    total, count = 0.0, 0
    by_length: dict[int, list[int]] = {}
    for s, length in batch:
        by_length.setdefault(length, []).append(s)
    for length, rows in sorted(by_length.items()):
        for start in range(0, len(rows), batch_size):
            idx = torch.tensor(rows[start:start + batch_size])
            logits = _logits(model, reference.tokens[idx, :length])[:, :-1]
            kl, n = token_kl(reference.logp[idx, :length - 1], logits)
            total, count = total + kl, count + n
    return total / max(count, 1)


class StagedKL:
    """The ``math.evolution.Fitness`` of a search: ``assemble(levels)`` puts a candidate in the model, each
    call draws the stage's minibatch (``stage_tokens[stage]``) and scores every candidate on it."""

    def __init__(self, model: nn.Module, reference: Reference, assemble: Callable[[tuple[int, ...]], None],
                 stage_tokens: Sequence[int], seed: int) -> None:
        self.model, self.reference, self.assemble = model, reference, assemble
        self.stage_tokens = list(stage_tokens)
        self.rng = random.Random(seed + 1)  # not the mutations' stream
        n, seq_len = reference.tokens.shape
        self.last_batch = minibatch(n, seq_len, self.stage_tokens[-1], random.Random(seed + 2))
        self.tokens_scored = 0

    def __call__(self, candidates: list[tuple[int, ...]], stage: int) -> list[float]:
        n, seq_len = self.reference.tokens.shape
        last = stage == len(self.stage_tokens) - 1
        batch = self.last_batch if last else minibatch(n, seq_len, self.stage_tokens[stage], self.rng)
        scores = []
        for levels in candidates:
            self.assemble(levels)
            scores.append(mean_kl(self.model, self.reference, batch))
            self.tokens_scored += sum(length for _, length in batch)
        return scores

    def full(self, levels: tuple[int, ...]) -> float:
        """The candidate's KL on every held-out token: the one comparison that decides the search's result."""
        n, seq_len = self.reference.tokens.shape
        self.assemble(levels)
        return mean_kl(self.model, self.reference, [(s, seq_len) for s in range(n)])

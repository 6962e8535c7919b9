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

Candidates differ from each other in a few layers, so a candidate's forward starts at the first block where it
differs from one already run on the same tokens (``PrefixCache``): the blocks before it give back the outputs
they gave then. The logits are those of a whole forward (the same blocks on the same inputs).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

REFERENCE_DTYPE = torch.float16
BATCH_SIZE = 4  # held-out sequences per forward; the prefix cache's chunks are these batches
LAST_STAGE_RUNS = 3  # forwards remembered per chunk of the last stage's tokens (most recently useful)


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
    def of(cls, model: nn.Module, tokens: torch.Tensor, batch_size: int = BATCH_SIZE) -> "Reference":
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


class _Replay(nn.Module):
    """Stands in a block's place for one forward and gives back what that block gave on these tokens before;
    the model's loop may read the block's own attributes (e.g. Gemma's ``attention_type``), so those are the
    block's."""

    def __init__(self, block: nn.Module, output) -> None:
        super().__init__()
        object.__setattr__(self, "_stands_for", block)  # not a submodule: its weights stay out of this forward
        object.__setattr__(self, "_output", output)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_stands_for"), name)

    def forward(self, *args, **kwargs):
        return self._output


@dataclass
class _Run:
    blocks: tuple[int, ...]  # id() of the module at every position of the block list
    outputs: list  # what each of them returned on the chunk's tokens


def _shared_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """The block outputs of recent forwards on each chunk of tokens, so that a forward whose first k blocks are
    the same modules as an earlier one's on the same chunk replays their outputs instead of running them.
    ``keep``: forwards remembered per chunk (the most recent)."""

    def __init__(self, container: nn.ModuleList, keep: int) -> None:
        self.container, self.keep = container, keep
        self.runs: dict[tuple, list[_Run]] = {}
        self.blocks_run = 0
        self.blocks_replayed = 0

    def logits(self, model: nn.Module, ids: torch.Tensor, chunk: tuple) -> torch.Tensor:
        """The model's logits on ``ids`` (the tokens ``chunk`` names), replaying the longest shared prefix."""
        modules = list(self.container)
        current = tuple(id(b) for b in modules)
        runs = self.runs.setdefault(chunk, [])
        best = max(runs, key=lambda r: _shared_prefix(r.blocks, current), default=None)
        k = _shared_prefix(best.blocks, current) if best is not None else 0
        if best is not None:  # the most useful forwards stay longest (a parent keeps serving its children)
            runs.remove(best)
            runs.append(best)
        outputs = list(best.outputs[:k]) if best is not None else []
        handles = []

        def record(_module, _args, output) -> None:
            outputs.append(output)

        try:
            for position in range(k):
                self.container[position] = _Replay(modules[position], best.outputs[position])
            handles = [modules[position].register_forward_hook(record) for position in range(k, len(modules))]
            logits = _logits(model, ids)
        finally:
            for handle in handles:
                handle.remove()
            for position, block in enumerate(modules):
                self.container[position] = block
        if len(outputs) == len(modules):  # a model that stops early (no such family today) is just not cached
            runs.append(_Run(blocks=current, outputs=outputs))
            del runs[:-self.keep]
        self.blocks_run += len(modules) - k
        self.blocks_replayed += k
        return logits

    def forget(self, chunks) -> None:
        for chunk in chunks:
            self.runs.pop(chunk, None)


def _chunks(batch: Sequence[tuple[int, int]], batch_size: int) -> list[tuple[tuple[int, ...], int]]:
    """``batch``'s sequences grouped by length, ``batch_size`` at a time: ((sequences), length) per forward."""
    by_length: dict[int, list[int]] = {}
    for s, length in batch:
        by_length.setdefault(length, []).append(s)
    return [(tuple(rows[start:start + batch_size]), length) for length, rows in sorted(by_length.items())
            for start in range(0, len(rows), batch_size)]


def mean_kl(model: nn.Module, reference: Reference, batch: Sequence[tuple[int, int]], batch_size: int = BATCH_SIZE,
            cache: PrefixCache | None = None) -> float:
    """The model's mean per-token KL to the reference on ``batch`` ((sequence, length) pairs); with ``cache``,
    each forward starts after the blocks it shares with an earlier forward on the same tokens."""
    total, count = 0.0, 0
    for rows, length in _chunks(batch, batch_size):
        idx = torch.tensor(rows)
        ids = reference.tokens[idx, :length]
        logits = (cache.logits(model, ids, (rows, length)) if cache is not None else _logits(model, ids))[:, :-1]
        kl, n = token_kl(reference.logp[idx, :length - 1], logits)
        total, count = total + kl, count + n
    return total / max(count, 1)


class StagedKL:
    """The ``math.evolution.Fitness`` of a search: ``assemble(levels)`` puts a candidate in the model, each
    call draws the stage's minibatch (``stage_tokens[stage]``) and scores every candidate on it."""

    def __init__(self, model: nn.Module, reference: Reference, assemble: Callable[[tuple[int, ...]], None],
                 stage_tokens: Sequence[int], seed: int, container: nn.ModuleList | None = None,
                 offspring: int = 8) -> None:
        """``container``: the model's block list that ``assemble`` fills, for the prefix cache (None: every
        forward runs every block)."""
        self.model, self.reference, self.assemble = model, reference, assemble
        self.stage_tokens = list(stage_tokens)
        self.rng = random.Random(seed + 1)  # not the mutations' stream
        n, seq_len = reference.tokens.shape
        self.last_batch = minibatch(n, seq_len, self.stage_tokens[-1], random.Random(seed + 2))
        self.tokens_scored = 0
        # a generation's offspring share its fresh tokens (forgotten after); the last stage's tokens are the same
        # every time, where the next generation's candidates descend from the parent or one of its challengers
        self.fresh = PrefixCache(container, keep=offspring) if container is not None else None
        self.fixed = PrefixCache(container, keep=LAST_STAGE_RUNS) if container is not None else None

    def __call__(self, candidates: list[tuple[int, ...]], stage: int) -> list[float]:
        n, seq_len = self.reference.tokens.shape
        last = stage == len(self.stage_tokens) - 1
        batch = self.last_batch if last else minibatch(n, seq_len, self.stage_tokens[stage], self.rng)
        cache = self.fixed if last else self.fresh
        scores = []
        for levels in candidates:
            self.assemble(levels)
            scores.append(mean_kl(self.model, self.reference, batch, cache=cache))
            self.tokens_scored += sum(length for _, length in batch)
        if cache is not None and not last:  # fresh tokens, drawn for this generation only
            cache.forget(_chunks(batch, BATCH_SIZE))
        return scores

    @property
    def replayed_share(self) -> float:
        """Share of the block forwards the candidates needed that the prefix cache replayed."""
        caches = [c for c in (self.fresh, self.fixed) if c is not None]
        run, replayed = sum(c.blocks_run for c in caches), sum(c.blocks_replayed for c in caches)
        return replayed / (run + replayed) if run + replayed else 0.0

    def full(self, levels: tuple[int, ...]) -> float:
        """The candidate's KL on every held-out token: the one comparison that decides the search's result."""
        n, seq_len = self.reference.tokens.shape
        self.assemble(levels)
        return mean_kl(self.model, self.reference, [(s, seq_len) for s in range(n)])

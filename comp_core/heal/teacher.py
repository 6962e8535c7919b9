"""The teacher's targets for the healing text, computed once (offline distillation): per position its top-k
next tokens and their renormalised log-probabilities, stored small (float16, int32) so a healing step needs
no teacher forward and the teacher can leave memory before the student trains."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..math.distill import top_k_targets


@dataclass
class TeacherTargets:
    """``tokens`` (n, seq_len) and, for every position but the last, the teacher's top-k ``logp`` (n, seq_len − 1,
    k) float16 and ``index`` (n, seq_len − 1, k) int32, at ``temperature``."""

    tokens: torch.Tensor
    logp: torch.Tensor
    index: torch.Tensor
    temperature: float

    @property
    def megabytes(self) -> float:
        return (self.logp.numel() * self.logp.element_size() + self.index.numel() * self.index.element_size()) / 2**20

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())


@torch.no_grad()
def teacher_targets(teacher: nn.Module, tokens: torch.Tensor, k: int, temperature: float = 1.0,
                    batch_size: int = 4, on_batch: Callable[[int, int], None] | None = None) -> TeacherTargets:
    """One forward of ``teacher`` over ``tokens`` (n, seq_len), kept as its top-k targets; ``on_batch(done,
    total)`` after each batch of sequences."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"healing text must be (sequences, tokens ≥ 2), got shape {tuple(tokens.shape)}")
    device = next(teacher.parameters()).device
    logps, indices = [], []
    n = tokens.shape[0]
    for start in range(0, n, batch_size):
        ids = tokens[start:start + batch_size].to(device)
        logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
        logp, index = top_k_targets(logits, k, temperature)
        logps.append(logp.to(torch.float16).cpu())
        indices.append(index.to(torch.int32).cpu())
        if on_batch is not None:
            on_batch(min(start + batch_size, n), n)
    return TeacherTargets(tokens=tokens.cpu(), logp=torch.cat(logps), index=torch.cat(indices),
                          temperature=temperature)

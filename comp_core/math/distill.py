"""Knowledge distillation from stored teacher targets (offline distillation).

The teacher's next-token distribution is computed once for the healing text and kept as its ``k`` most likely
tokens per position (``top_k_targets``), so a healing step runs the student only: no teacher forward per step,
and the teacher need not stay in memory. The loss (``sparse_kl``) is KL(p̃ ‖ q) with p̃ the teacher's top-k
probabilities renormalised to sum to one and q the student's full softmax, both at temperature T, times T²
(Hinton et al.: the gradients keep their scale across temperatures). The student's mass outside the teacher's
top k is penalised through q's normalisation.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def top_k_targets(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most likely next tokens per position and their log-probabilities, renormalised over
    those ``k`` at ``temperature``: ``logits`` (..., V) → (log p̃ (..., k) float32, indices (..., k) int64)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    values, indices = torch.topk(logits.float() / temperature, min(k, logits.shape[-1]), dim=-1)
    return F.log_softmax(values, dim=-1), indices


def sparse_kl(student_logits: torch.Tensor, target_logp: torch.Tensor, target_index: torch.Tensor,
              temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of T² · Σ_j p̃_j (log p̃_j − log q_{index_j}), q = softmax(student_logits / T):
    ``student_logits`` (..., V), ``target_logp``/``target_index`` (..., k) from ``top_k_targets``. A scalar with
    gradient; zero exactly when the student's distribution is the teacher's renormalised top k."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    picked = torch.gather(logq, -1, target_index.long())
    p = target_logp.float().exp()
    per_position = (p * (target_logp.float() - picked)).sum(-1)
    return per_position.mean() * temperature ** 2

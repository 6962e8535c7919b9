"""Offline distillation's loss (comp_core.math.distill) against the full KL divergence and by hand."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from comp_core.math.distill import sparse_kl, top_k_targets


def test_with_every_token_kept_it_is_the_kl_divergence():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    for t in (1.0, 2.0):
        logp, index = top_k_targets(teacher, k=11, temperature=t)
        want = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="sum") / 10 * t ** 2
        assert sparse_kl(student, logp, index, t).item() == pytest.approx(want.item(), rel=1e-5)


def test_top_k_renormalises_the_teachers_k_best_and_the_loss_matches_a_hand_computation():
    teacher = torch.tensor([[3.0, 1.0, 2.0, -1.0]])
    logp, index = top_k_targets(teacher, k=2)
    assert index.tolist() == [[0, 2]]
    p = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    assert logp.exp()[0].tolist() == pytest.approx(p.tolist())
    student = torch.tensor([[0.5, 0.0, 1.5, 0.2]])
    q = torch.softmax(student, -1)[0]
    want = float(p[0] * (p[0].log() - q[0].log()) + p[1] * (p[1].log() - q[2].log()))
    assert sparse_kl(student, logp, index).item() == pytest.approx(want, rel=1e-6)


def test_the_loss_has_a_gradient_and_refuses_bad_settings():
    student = torch.randn(3, 7, requires_grad=True)
    logp, index = top_k_targets(torch.randn(3, 7), 3)
    sparse_kl(student, logp, index).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="k must be"):
        top_k_targets(torch.randn(2, 4), 0)
    with pytest.raises(ValueError, match="temperature"):
        top_k_targets(torch.randn(2, 4), 2, temperature=0)

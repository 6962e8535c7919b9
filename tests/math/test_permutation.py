"""comp_core.math.permutation: RIA's N:M channel permutation (reallocation, assignment refinement, the identity
guard) on score matrices."""
from __future__ import annotations

import itertools

import pytest
import torch

from comp_core.math.permutation import (assignment_gains, channel_reallocation, compute_permutation,
                                        inverse_order, refine_by_assignment, retained_importance)


def _scores(seed: int, d_out: int, d_in: int, power: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(d_out, d_in, generator=generator) ** power


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_assignment_gains_equal_brute_force(n, m):
    scores = _scores(3, 5, 4 * m)
    order = torch.randperm(4 * m, generator=torch.Generator().manual_seed(4))
    groups = order.view(4, m)
    for slot in range(m):
        gain = assignment_gains(scores, order, n, m, slot)
        for g, c in itertools.product(range(4), range(4)):
            members = groups[g].clone()
            members[slot] = groups[c, slot]
            brute = scores[:, members].double().topk(m - n, dim=1).values.sum()
            assert abs(float(gain[g, c]) - float(brute)) < 1e-9


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("n, m, d_out, d_in", [(2, 4, 16, 64), (4, 8, 8, 64), (2, 4, 3, 32), (1, 4, 24, 48)])
def test_permutation_never_lowers_retained_importance(seed, n, m, d_out, d_in):
    scores = _scores(seed, d_out, d_in, power=1.0 + seed % 3)
    found = compute_permutation(scores, n, m)
    identity = retained_importance(scores, n, m)
    assert found.retained_identity == identity
    assert found.retained >= identity
    assert found.retained == retained_importance(scores, n, m, found.order)
    assert torch.equal(torch.sort(found.order).values, torch.arange(d_in))  # a permutation
    refined = refine_by_assignment(scores, found.order, n, m, rounds=2)  # refining again can only help
    assert retained_importance(scores, n, m, refined) >= found.retained


@pytest.mark.parametrize("block_groups", [1, 3, 4])
def test_blocked_refinement_never_lowers_retained_importance(block_groups):
    scores = _scores(11, 10, 64)
    for start in (torch.arange(64), channel_reallocation(scores, 4)):
        refined = refine_by_assignment(scores, start, 2, 4, block_groups=block_groups)
        assert retained_importance(scores, 2, 4, refined) >= retained_importance(scores, 2, 4, start)


def test_permutation_gains_on_random_scores():
    scores = _scores(0, 64, 256)
    found = compute_permutation(scores, 2, 4)
    assert found.retained > found.retained_identity and not found.is_identity


def test_identity_kept_when_it_is_already_optimal():
    """Every group holds exactly the two channels each row needs, so the identity keeps every nonzero
    score (the upper bound): nothing can beat it and the permutation must stay the identity, although
    the column sums are very uneven and reallocation reshuffles the channels."""
    scores = torch.zeros(2, 8)
    scores[0, [0, 1]] = 10.0
    scores[1, [2, 3]] = 10.0
    scores[0, [4, 5]] = 1.0
    scores[1, [6, 7]] = 1.0
    found = compute_permutation(scores, 2, 4)
    assert found.retained_identity == float(scores.sum())
    assert found.is_identity and found.retained == found.retained_identity


def test_identity_kept_when_reallocation_is_worse():
    """Find random problems where RIA's heuristic reallocation retains less than the identity: the
    refinement must then start from the identity, and without refinement the identity is returned."""
    seen = 0
    for seed in range(60):
        scores = _scores(seed, 4, 16, power=3.0)
        if retained_importance(scores, 2, 4, channel_reallocation(scores, 4)) >= retained_importance(scores, 2, 4):
            continue
        seen += 1
        found = compute_permutation(scores, 2, 4)
        assert found.start == "identity" and found.retained >= found.retained_identity
        assert found.retained_reallocated < found.retained_identity
        plain = compute_permutation(scores, 2, 4, refine=False)
        assert plain.is_identity and plain.retained == plain.retained_identity
    assert seen >= 5, "expected some problems where the heuristic reallocation is worse than the identity"


def test_reallocation_deals_one_channel_of_every_chunk_to_each_group():
    scores = torch.arange(16.0).repeat(3, 1)  # column j has total 3j: channel j is the j-th weakest
    order = channel_reallocation(scores, 4).view(4, 4)  # (groups, slots)
    for chunk in range(4):
        assert set(order[:, chunk].tolist()) == set(range(4 * chunk, 4 * chunk + 4))
    assert order[:, 1].tolist() == [7, 6, 5, 4]  # odd chunks are dealt strongest first
    assert torch.equal(inverse_order(order.flatten())[order.flatten()], torch.arange(16))



@pytest.mark.parametrize("n, m, d_in", [(2, 4, 16), (4, 8, 32), (1, 4, 12)])
def test_the_order_is_a_permutation_and_its_inverse_undoes_it(n, m, d_in):
    scores = _scores(7, 6, d_in)
    order = compute_permutation(scores, n, m).order
    assert order.dtype == torch.long and torch.equal(order.sort().values, torch.arange(d_in))
    inverse = inverse_order(order)
    assert torch.equal(order[inverse], torch.arange(d_in)) and torch.equal(inverse[order], torch.arange(d_in))
    assert torch.equal(scores[:, order][:, inverse], scores)


def test_retained_importance_keeps_the_top_n_of_every_group_of_m():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.25, 8.0, 1.5]])
    assert retained_importance(scores, 2, 4) == pytest.approx(4 + 3 + 8 + 1.5)
    order = torch.tensor([0, 4, 6, 5, 1, 2, 3, 7])  # groups (4, .5, 8, .25) and (1, 3, 2, 1.5)
    assert retained_importance(scores, 2, 4, order) == pytest.approx(4 + 8 + 3 + 2)

"""Input-channel permutations for N:M sparsity: pure math on a score matrix, no modules.

An N:M mask prunes the N lowest scores in every group of M *consecutive* inputs of each row. Which inputs
share a group is arbitrary: reordering the input channels of a linear (and its input the same way) leaves
its function unchanged but changes the groups, so important weights that would compete inside one group
can be spread over several. Following RIA (Zhang et al., "Plug-and-Play: An Efficient Post-training
Pruning Method for Large Language Models", ICLR 2024, §3.3 and their ``lib/prune.py: prune_ria``):

1. **channel reallocation** (``channel_reallocation``): sort the channels by their total score (the
   column sums), cut the sorted list into M equal chunks and give every group one channel of each
   chunk, walking the odd chunks backwards, so each group gets a mix of strong and weak channels;
2. **linear-sum-assignment refinement** (``refine_by_assignment``): for one slot s of the M slots at a
   time, re-deal the channels sitting in slot s over the groups (of one block of consecutive groups) so
   the total retained score is maximal given the other M-1 channels of every group; that is a square
   assignment problem, solved exactly with the Hungarian method (``scipy.optimize.linear_sum_assignment``).

The quantity both steps improve is the **retained importance**: the sum of the scores an N:M mask keeps
(``retained_importance``). Step 2 never lowers it (keeping every channel where it is is one of the
assignments it chooses from; a step is taken only when it strictly gains). Step 1 is a heuristic and can
lower it, so ``compute_permutation`` refines from the identity instead whenever the reallocation scores
below the identity, and returns the identity when nothing beats it: the permutation it returns never
retains less than the unpermuted order.

Orders are ``LongTensor[d_in]`` "stored position -> original channel": the permuted score matrix is
``scores[:, order]``. Scores are ``(d_out, d_in)`` with ``d_in`` a multiple of M; sums are float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUM_DTYPE = torch.float64
# Elements of the (rows, groups, groups) comparison tensor built at once while scoring an assignment.
_CHUNK_ELEMENTS = 1 << 22


def _check(scores: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a (d_out, d_in) matrix, got shape {tuple(scores.shape)}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    d_out, d_in = scores.shape
    if d_in % m:
        raise ValueError(f"{d_in} input channels are not a multiple of M={m}")
    return d_out, d_in


def identity_order(d_in: int, device: torch.device | str | None = None) -> torch.Tensor:
    return torch.arange(d_in, device=device)


def group_retained(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Retained score of every group of ``m`` consecutive columns, summed over rows: (d_in / m,) float64.

    Within each row and group the ``m - n`` highest scores survive an N:M mask (ties do not change the sum).
    """
    d_out, d_in = _check(scores, n, m)
    groups = scores.to(SUM_DTYPE).reshape(d_out, d_in // m, m)  # (d_out, G, m)
    return groups.topk(m - n, dim=-1).values.sum(dim=(0, 2))  # (G,)


def retained_importance(scores: torch.Tensor, n: int, m: int, order: torch.Tensor | None = None) -> float:
    """Sum of the scores an N:M mask keeps when the columns are stored in ``order`` (None: as they are)."""
    permuted = scores if order is None else scores[:, order.to(scores.device)]
    return float(group_retained(permuted, n, m).sum())


def channel_reallocation(scores: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's heuristic channel reallocation: an order (d_in,) that deals every group one channel per
    importance chunk (chunk c = the c-th M-th of the channels sorted by column sum, ascending), walking
    the odd chunks from their strongest channel down so the groups' totals stay balanced."""
    d_in = scores.shape[1]
    if d_in % m:
        raise ValueError(f"{d_in} input channels are not a multiple of M={m}")
    n_groups = d_in // m
    ranked = torch.sort(scores.to(SUM_DTYPE).sum(dim=0), stable=True).indices  # (d_in,) weakest first
    order = torch.empty_like(ranked)
    for chunk in range(m):
        members = ranked[chunk * n_groups:(chunk + 1) * n_groups]  # (G,)
        order[chunk::m] = members.flip(0) if chunk % 2 else members  # slot `chunk` of every group
    return order


def assignment_gains(scores: torch.Tensor, order: torch.Tensor, n: int, m: int, slot: int) -> torch.Tensor:
    """Retained score of every group if its channel in ``slot`` were replaced by another group's.

    ``order`` lists the channels of the groups considered (all of them, or one block: G·M entries).

    Returns ``gain`` (G, G) float64: ``gain[g, c]`` = retained score (summed over rows) of group g when it
    holds its own M-1 channels outside ``slot`` plus the channel now in ``slot`` of group c. The diagonal
    is the current per-group retained score.

    With k = M - N kept per group and o_1 >= ... >= o_{M-1} the scores of the fixed channels in one row,
    the top k of {o_1..o_{M-1}, x} sum to (o_1 + ... + o_{k-1}) + max(x, o_k); so every entry is one fixed
    part per group plus a sum over rows of an elementwise maximum.
    """
    d_out, _ = _check(scores, n, m)
    if order.numel() % m:
        raise ValueError(f"{order.numel()} channels are not a multiple of M={m}")
    keep = m - n
    n_groups = order.numel() // m
    block = scores[:, order.to(scores.device)].to(SUM_DTYPE).reshape(d_out, n_groups, m)  # (d_out, G, m)
    others = torch.cat([block[..., :slot], block[..., slot + 1:]], dim=-1)  # (d_out, G, m-1)
    others = others.sort(dim=-1, descending=True).values
    fixed = others[..., :keep - 1].sum(dim=(0, 2))  # (G,) rows summed
    threshold = others[..., keep - 1]  # (d_out, G): o_k of each group
    candidate = block[..., slot]  # (d_out, G): the channel each group now has in `slot`
    gain = torch.zeros(n_groups, n_groups, dtype=SUM_DTYPE, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, n_groups * n_groups))
    for start in range(0, d_out, step):
        rows = slice(start, start + step)
        # (rows, G_receiving, G_candidate) -> (G, G)
        gain += torch.maximum(threshold[rows, :, None], candidate[rows, None, :]).sum(dim=0)
    return gain + fixed[:, None]


def _solve_assignment(gain: torch.Tensor) -> torch.Tensor:
    """For every group g the group c whose slot channel it receives, maximising the total (G,) long."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - scipy is a dependency of the permutation
        raise ImportError("the N:M channel permutation needs scipy (scipy.optimize.linear_sum_assignment); "
                          "pip install scipy, or prune with permute=False") from err
    rows, cols = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
    source = torch.empty(gain.shape[0], dtype=torch.long)
    source[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return source


def refine_by_assignment(scores: torch.Tensor, order: torch.Tensor, n: int, m: int, *,
                         block_groups: int = 0, rounds: int = 1) -> torch.Tensor:
    """Improve ``order`` slot by slot with optimal assignments; never lowers the retained importance.

    ``block_groups``: groups per assignment problem (consecutive groups of the current order); 0 = all
    groups of the matrix in one problem (RIA's default; their ``--fast`` splits q/k/v/o into 4 blocks,
    gate/up into 8 and down into 16). ``rounds``: passes over the M slots (RIA makes one).
    """
    d_out, d_in = _check(scores, n, m)
    if block_groups < 0 or rounds < 0:
        raise ValueError("block_groups and rounds must be >= 0")
    n_groups = d_in // m
    size = n_groups if block_groups == 0 else min(block_groups, n_groups)
    order = order.clone().cpu()
    for _ in range(rounds):
        improved = False
        for slot in range(m):
            for first in range(0, n_groups, size):
                groups = slice(first, min(first + size, n_groups))
                part = order[groups.start * m:groups.stop * m]  # (B*m,) channels of this block
                gain = assignment_gains(scores, part, n, m, slot)  # (B, B)
                source = _solve_assignment(gain)  # (B,)
                current = float(gain.diagonal().sum())
                chosen = float(gain[torch.arange(source.numel()), source].sum())
                if chosen <= current:  # keep the channels where they are unless it strictly gains
                    continue
                slots = part.view(-1, m)
                slots[:, slot] = slots[source, slot].clone()
                improved = True
        if not improved:
            break
    return order


@dataclass(frozen=True)
class ChannelPermutation:
    """The order chosen for one matrix and the retained importance along the way."""

    order: torch.Tensor  # (d_in,) stored position -> original channel
    retained_identity: float  # N:M in the original order
    retained_reallocated: float  # after the heuristic reallocation alone
    retained: float  # of ``order``; >= retained_identity
    start: str  # where the refinement started: "reallocation" or "identity"

    @property
    def is_identity(self) -> bool:
        return bool(torch.equal(self.order, torch.arange(self.order.numel())))

    @property
    def gain(self) -> float:
        """Relative gain in retained importance over the unpermuted order."""
        return self.retained / self.retained_identity - 1.0 if self.retained_identity else 0.0


def compute_permutation(scores: torch.Tensor, n: int, m: int, *, refine: bool = True, block_groups: int = 0,
                        rounds: int = 1) -> ChannelPermutation:
    """RIA's channel permutation for an N:M mask of ``scores`` (d_out, d_in), guarded by the identity.

    Reallocation, then (``refine``) the assignment refinement from whichever of the reallocation and the
    identity retains more; the result is the identity whenever no candidate retains strictly more.
    """
    _check(scores, n, m)
    scores = scores.detach()
    identity = identity_order(scores.shape[1])
    base = retained_importance(scores, n, m)
    reallocated = channel_reallocation(scores, m)
    after_reallocation = retained_importance(scores, n, m, reallocated)
    start, order = ("reallocation", reallocated) if after_reallocation >= base else ("identity", identity)
    if refine:
        order = refine_by_assignment(scores, order, n, m, block_groups=block_groups, rounds=rounds)
    retained = retained_importance(scores, n, m, order)
    if retained <= base:
        order, retained = identity, base
    return ChannelPermutation(order=order, retained_identity=base, retained_reallocated=after_reallocation,
                              retained=retained, start=start)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """``inverse[order[p]] = p``: the stored position of every original channel."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse

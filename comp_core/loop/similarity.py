"""Layer similarity: the angular distance between the hidden state entering layer l and the one entering l + n.

    d(x^l, x^{l+n}) = (1/π) · arccos(cos(x^l_t, x^{l+n}_t)), averaged over tokens t

(Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", eq. 7), for every first layer l
and every span n = 1..L, where x^L is the last block's output. A small distance says the n blocks from l on
change the residual stream little: they are candidates to drop together. The n = 1 row is the per-layer
picture COMP's cosine importance draws (I_l = mean 1 − cos(x^l_t, x^{l+1}_t)); it differs only in mapping each
cosine through arccos/π instead of 1 − cos before the mean.

Gromov et al. measure the last token of each sequence; we average over every token of every sequence, like
the cosine importance, so the two read on the same footing (and many more tokens steady the mean).

The states of one calibration batch come from the capture forward (``capture_with_importances``), so the
matrix costs no pass of its own: ``LayerDistanceTally.observe`` keeps each block's input (the previous block's
output, which the forward made anyway) until the last block's output arrives, sums the batch in cache-sized
chunks and lets the states go, so memory stays bounded by one batch's states (``max_bytes`` bounds it
further by an even stride over the tokens).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CHUNK_BYTES = 16 * 2**20  # float32 states of this many bytes stacked at a time for the products (cache-sized)
MAX_BYTES = 128 * 2**20  # one batch's states the tally may hold before it keeps every k-th token only


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def token_rows(state: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """(N, d) rows of a (…, d) hidden state's tokens, every ``stride``-th only (a view of the state)."""
    flat = state.detach().reshape(-1, state.shape[-1])  # (N, d)
    return flat[::stride] if stride > 1 else flat


def distance_sums(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Summed angular distances between L+1 states of the same N tokens, each (N, d) in any float dtype on any
    device: an (L, L) float64 CPU tensor whose [n-1, l] is Σ_t arccos(cos(x^l_t, x^{l+n}_t))/π for l + n ≤ L,
    and 0 where l + n > L.

    A few hundred tokens at a time, the states are stacked as float32 (T, L+1, d) on the first state's device,
    and one batched product gives every pair's dot product and, on its diagonal, every squared norm (the
    states are never normalised one by one); the cosines are divided out, clamped to [−1, 1] (rounding can
    leave them just outside), mapped through arccos and summed in float64. A zero state counts as cosine 0."""
    n_states = len(rows)
    n_layers = n_states - 1
    n_tokens, width = rows[0].shape
    device = rows[0].device
    step = max(1, CHUNK_BYTES // (n_states * width * 4))
    pair = torch.zeros(n_states, n_states, dtype=torch.float64, device=device)  # [a, b]: Σ_t arccos(cos)
    with _no_autocast(device):  # the capture hooks run inside the forward's autocast: no bf16 here
        for start in range(0, n_tokens, step):
            chunk = torch.stack([r[start:start + step].to(device, torch.float32) for r in rows], dim=1)  # (T, L+1, d)
            gram = torch.bmm(chunk, chunk.transpose(1, 2)).double()  # (T, L+1, L+1): x^a · x^b
            norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt()  # (T, L+1)
            cos = gram / (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp_min(torch.finfo(torch.float32).tiny)
            pair += torch.arccos(cos.clamp_(-1.0, 1.0)).sum(dim=0)
    pair = pair.cpu() / math.pi
    sums = torch.zeros(n_layers, n_layers, dtype=torch.float64)
    for n in range(1, n_layers + 1):
        sums[n - 1, :n_states - n] = torch.diagonal(pair, offset=n)  # pair[l, l + n] for l = 0..L-n
    return sums


def angular_distance_sums(states: Sequence[torch.Tensor], stride: int = 1) -> tuple[torch.Tensor, int]:
    """For one batch's hidden states entering every block plus the last block's output (L+1 tensors, each
    (batch, seq, d), on any devices): the (L, L) float64 sums of ``distance_sums`` and the number of tokens
    summed (to average over batches); ``stride``: every k-th token of the flattened batch only."""
    rows = [token_rows(s, stride) for s in states]
    return distance_sums(rows), rows[0].shape[0]


def stride_for(n_tokens: int, n_states: int, width: int, itemsize: int, max_bytes: int | None) -> int:
    """The smallest k for which every k-th of ``n_tokens`` tokens keeps ``n_states`` states within ``max_bytes``."""
    if max_bytes is None:
        return 1
    return max(1, math.ceil(n_tokens * n_states * width * itemsize / max_bytes))


class LayerDistanceTally:
    """Mean angular distance between the inputs of layers l and l + n over the tokens of every batch, summed
    batch by batch: ``add`` takes one batch's L+1 states, ``observe`` is a capture ``BlockObserver`` that
    gathers them block by block (it fires for blocks 0..L-1 in order within each batch), sums the batch when
    the last block's output arrives and lets its states go.

    ``observe`` keeps the states the forward made (no copy: each block's output is the next block's input, so
    this holds one batch's hidden states alive, in the model's dtype), unless they would take more than
    ``max_bytes``: then it keeps a copy of every k-th token only (an even stride over sequences and
    positions) and the states themselves can go. The default 128 MiB keeps every token of COMP's default
    calibration on the bundled model (batches of 8 × 128 tokens × 31 states × 576 float32: 70 MiB) and every
    3rd of 64 × 512 (280 MiB a batch), and bounds what a larger model holds on its device (a 7B model's
    batch of 8 × 2048 tokens would hold 4.4 GB); None keeps every token, whatever it takes.
    """

    def __init__(self, n_layers: int, max_bytes: int | None = MAX_BYTES) -> None:
        if n_layers < 1:
            raise ValueError(f"a layer-distance matrix needs at least one layer, got {n_layers}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes (or None), got {max_bytes}")
        self.n_layers = n_layers
        self.max_bytes = max_bytes
        self.sums = torch.zeros(n_layers, n_layers, dtype=torch.float64)
        self.count = 0  # tokens summed
        self.seen = 0  # tokens the batches had (more than ``count`` where a stride applied)
        self._rows: list[torch.Tensor] = []  # the batch in flight: (N, d) per state so far
        self._versions: list[int] = []  # each kept state's version counter, to catch in-place changes
        self._stride = 1
        self._next = 0  # the block whose input ``observe`` expects next

    def _stride_of(self, first: torch.Tensor) -> int:
        n_tokens = first.numel() // first.shape[-1]
        return stride_for(n_tokens, self.n_layers + 1, first.shape[-1], first.element_size(), self.max_bytes)

    def add(self, states: Sequence[torch.Tensor]) -> None:
        if len(states) != self.n_layers + 1:
            raise ValueError(f"expected {self.n_layers + 1} hidden states (every block's input and the last "
                             f"block's output), got {len(states)}")
        sums, count = angular_distance_sums(states, self._stride_of(states[0]))
        self.sums += sums
        self.count += count
        self.seen += states[0].numel() // states[0].shape[-1]

    def _keep(self, state: torch.Tensor) -> None:
        rows = token_rows(state, self._stride)
        if self._stride > 1:
            rows = rows.clone()  # 1/k of the tokens: the full state can go
        self._rows.append(rows)
        self._versions.append(rows._version)

    def observe(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if index != self._next:
            raise RuntimeError(f"the capture showed block {index} where block {self._next} was due: the blocks "
                               "must run once each, in order, per batch")
        if index == 0:
            self._stride = self._stride_of(x)
            self.seen += x.numel() // x.shape[-1]
        self._keep(x)
        self._next = index + 1
        if index < self.n_layers - 1:
            return
        self._keep(y)
        if [r._version for r in self._rows] != self._versions:
            raise RuntimeError("a block changed a hidden state in place after it was seen; the layer distances "
                               "(and the capture's layer importances) assume blocks return new tensors")
        self.sums += distance_sums(self._rows)
        self.count += self._rows[0].shape[0]
        self._rows, self._versions, self._next = [], [], 0

    def distances(self) -> list[list[float]]:
        """D[n-1][l]: mean distance between the inputs of layers l and l + n (l + n = L: the last block's
        output), n = 1..L; NaN where l + n > L, and everywhere before any batch was added."""
        mean = self.sums / self.count if self.count else torch.full_like(self.sums, math.nan)
        return [[float(mean[n - 1, l]) if l + n <= self.n_layers else math.nan for l in range(self.n_layers)]
                for n in range(1, self.n_layers + 1)]

"""The statistics every method reads, collected once per block: one accumulator per dense input.

A dense's input X (tokens × d) gives everything the methods need from three running sums:
the Gram ``XᵀX`` (COMP's mask tuning, SparseGPT/APT Hessians), the column sums (FLAP's mean input for
bias compensation) and the token count. Squared column norms ‖X_j‖² (Wanda, RIA) are the Gram's diagonal
and the per-channel sample variance (FLAP's fluctuation) follows from the diagonal and the mean, so no
method keeps a second pass or a second accumulator. All sums are float64 (shared notes/calibration.md).

Paired inputs (COMP's ``inputs="paired"``) run a block on two streams — the unpruned model's hidden states
(reference, giving the target input X) and the pruned model's (shifted, giving X̃, what the dense reads) —
and add two more sums: the cross moment X̃ᵀX and the target Gram XᵀX. ``gram`` stays X̃ᵀX̃, so every
method and score that reads only the Gram works unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Collection, Iterator, TypeVar

import torch
from torch import nn

from ..math.linalg import STAT_DTYPE
from ..models.adapters import ArchAdapter

# One batch's products XᵀX are taken in float32 (twice the CPU throughput of float64) and summed into the
# float64 accumulators: a batch holds a few thousand tokens, so float32's rounding stays ~1e-6 relative,
# while the accumulators keep full precision over any number of batches.
PRODUCT_DTYPE = torch.float32


class InputStats:
    """Running ``XᵀX`` (a sum, not a mean: mask tuning is scale-free), ``Σ_t x_t`` and the token count.

    With ``paired``: also ``cross`` = X̃ᵀX (rows: the inputs the dense reads) and ``target_gram`` = XᵀX of
    the reference inputs; ``gram``, ``total`` and ``n_tokens`` then describe X̃.
    """

    def __init__(self, width: int, device: torch.device | str = "cpu", *, paired: bool = False, folds: int = 0):
        if folds not in (0, 2):
            raise ValueError(f"folds must be 0 (none) or 2, got {folds}")
        if folds and paired:
            raise ValueError("held-out folds are kept for unpaired statistics only")
        self.device = torch.device(device)
        self.total = torch.zeros(width, dtype=STAT_DTYPE, device=device)  # (d,)
        self.n_tokens = 0
        # folds=2: the Gram of every other calibration sequence (``fold_grams[f]``, samples f, f+2, …), so a
        # compensation can be fitted on one half and checked on the other; ``gram`` is then their sum, formed
        # when first read (one d × d addition instead of one per batch)
        self.fold_grams = [torch.zeros(width, width, dtype=STAT_DTYPE, device=device) for _ in range(folds)]
        self._gram = None if folds else torch.zeros(width, width, dtype=STAT_DTYPE, device=device)  # (d, d)
        self.cross = torch.zeros(width, width, dtype=STAT_DTYPE, device=device) if paired else None  # X̃ᵀX
        self.target_gram = torch.zeros_like(self.cross) if paired else None  # (d, d) XᵀX
        self._sequences = 0

    @property
    def gram(self) -> torch.Tensor:
        """Σ_t x_t x_tᵀ over every token seen, (d, d) float64."""
        if self.fold_grams and self._gram is None:
            self._gram = self.fold_grams[0] + self.fold_grams[1]
        return self._gram

    @staticmethod
    def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """aᵀb for one batch (N, d) × (N, d), in float32 (float64 inputs stay float64), returned as float64;
        never under the calibration forward's autocast (bf16 *inputs* are exact in float32, bf16 products not)."""
        dtype = STAT_DTYPE if a.dtype == STAT_DTYPE else PRODUCT_DTYPE
        with torch.autocast(device_type=a.device.type, enabled=False):
            return (a.to(dtype).T @ b.to(dtype)).to(STAT_DTYPE)

    def update(self, x: torch.Tensor) -> None:
        """Add one batch, (sequences, tokens, d) or (tokens, d) = one sequence."""
        sequences = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)  # (S, T, d)
        sequences = sequences.to(device=self.device)
        flat = sequences.reshape(-1, sequences.shape[-1])  # (N, d)
        if self.fold_grams:
            self._gram = None  # stale: re-formed from the folds when read
            for fold, acc in enumerate(self.fold_grams):
                first = (fold - self._sequences) % 2
                part = sequences[first::2].reshape(-1, sequences.shape[-1])
                if part.shape[0]:
                    acc.add_(self._product(part, part))
        else:
            self.gram.add_(self._product(flat, flat))
        self._sequences += sequences.shape[0]
        self.total.add_(flat.sum(dim=0, dtype=STAT_DTYPE))
        self.n_tokens += flat.shape[0]

    def update_pair(self, shifted: torch.Tensor, reference: torch.Tensor) -> None:
        """Add one batch read as X̃ (``shifted``) whose target input is X (``reference``), same tokens."""
        if self.cross is None:
            raise ValueError("these statistics were not made for paired inputs (InputStats(..., paired=True))")
        if shifted.shape != reference.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(shifted.shape)} vs {tuple(reference.shape)}")
        xs = shifted.reshape(-1, shifted.shape[-1]).to(device=self.device)  # (N, d)
        xr = reference.reshape(-1, reference.shape[-1]).to(device=self.device)  # (N, d)
        self.update(xs)
        self.cross.add_(self._product(xs, xr))
        self.target_gram.add_(self._product(xr, xr))

    @property
    def width(self) -> int:
        return self.total.shape[0]

    @property
    def sq_norms(self) -> torch.Tensor:
        """‖X_j‖² per input column (d,): Wanda's and RIA's activation statistic, squared."""
        return self.gram.diagonal().clone()

    @property
    def mean(self) -> torch.Tensor:
        """Mean input per column (d,): what FLAP folds into the bias for removed columns."""
        return self.total / max(self.n_tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of every input column over the calibration tokens (d,), FLAP's fluctuation."""
        n = self.n_tokens
        if n < 2:
            return torch.zeros_like(self.total)
        centred = self.gram.diagonal() - self.total * self.total / n
        return centred.clamp_min(0.0) / (n - 1)


def own_gram(module: nn.Module, gram: torch.Tensor) -> torch.Tensor:
    """The Gram of the inputs a dense really reads (an already pruned dense reads a subset of the shared input)."""
    if hasattr(module, "input_index"):
        index = module.input_index.to(gram.device)
        return gram[index][:, index]
    return gram


def own_moments(module: nn.Module, stats: InputStats
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(G̃, M, G) restricted to the inputs ``module`` reads: the same index on both sides of every moment,
    since an input-indexed dense reads x̃[index] and its target is W x[index]. M and G are None unpaired."""
    cross = own_gram(module, stats.cross) if stats.cross is not None else None
    target = own_gram(module, stats.target_gram) if stats.target_gram is not None else None
    return own_gram(module, stats.gram), cross, target


def _groups(adapter: ArchAdapter, only: Collection[str] | None) -> list[tuple[str, ...]]:
    """The input groups holding at least one dense of ``only`` (None: all): a Gram nobody reads is not taken."""
    return [g for g in adapter.input_groups if only is None or any(name in only for name in g)]


@contextlib.contextmanager
def collect_block_stats(block: nn.Module, adapter: ArchAdapter, device: torch.device | str = "cpu", *,
                        folds: int = 0, only: Collection[str] | None = None) -> Iterator[dict[str, InputStats]]:
    """While active, every forward of ``block`` adds its denses' inputs to one ``InputStats`` per input group.

    Denses that read the same tensor (q/k/v, gate/up) share one accumulator; the dict maps every dense name
    to its group's accumulator. ``only``: the denses whose statistics are wanted (their groups are
    collected, the rest not: on a Llama block the down_proj Gram alone is 70 % of the work). Hooks are
    always removed on exit.
    """
    stats: dict[str, InputStats] = {}
    handles = []
    for group in _groups(adapter, only):
        first = adapter.dense(block, group[0])
        acc = InputStats(first.in_features, device, folds=folds)
        for name in group:
            stats[name] = acc

        def hook(_module, args, acc=acc):
            acc.update(args[0])
        handles.append(first.register_forward_pre_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


Output = TypeVar("Output")


def collect_paired_block_stats(block: nn.Module, adapter: ArchAdapter, run_reference: Callable[[int], Output],
                               run_shifted: Callable[[int], Output], n_batches: int,
                               device: torch.device | str = "cpu", *, only: Collection[str] | None = None
                               ) -> tuple[dict[str, InputStats], list[Output], list[Output]]:
    """Paired statistics of ``block``'s denses and both streams' outputs, one calibration batch at a time.

    Per batch b: ``run_reference(b)`` (the block on the unpruned model's hidden states) while hooks keep each
    input group's tensor X, then ``run_shifted(b)`` (the block on the pruned model's) while hooks add
    (X̃, X) to the group's accumulator; so only one batch of reference inputs is ever held. Both runs must
    see the same tokens. Hooks are always removed on exit.
    """
    stats: dict[str, InputStats] = {}
    held: dict[int, torch.Tensor] = {}
    phase = {"reference": True}
    handles = []
    for g, group in enumerate(_groups(adapter, only)):
        first = adapter.dense(block, group[0])
        acc = InputStats(first.in_features, device, paired=True)
        for name in group:
            stats[name] = acc

        def hook(_module, args, acc=acc, g=g):
            if phase["reference"]:
                held[g] = args[0].detach()
            else:
                acc.update_pair(args[0], held.pop(g))
        handles.append(first.register_forward_pre_hook(hook))
    reference_out, shifted_out = [], []
    try:
        for b in range(n_batches):
            phase["reference"] = True
            reference_out.append(run_reference(b))
            phase["reference"] = False
            shifted_out.append(run_shifted(b))
            if held:
                raise RuntimeError("a dense ran on the reference stream but not on the shifted one")
    finally:
        for h in handles:
            h.remove()
    return stats, reference_out, shifted_out

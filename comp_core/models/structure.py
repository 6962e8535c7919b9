"""Structured units of a block and what each costs: attention units (heads or KV groups) and MLP channels.

Structured methods (FLAP, Wanda-sp, magnitude-sp) remove whole units, so the physically smaller model needs
no custom attention:

* **attention unit** — in a multi-head model (heads == kv_heads) one head: its q, k, v rows and its o_proj
  input columns. In a grouped-query model one **KV group**: the k/v head and every query head that reads it.
  Removing whole groups keeps ``heads / kv_heads`` constant, so the stock attention (``repeat_kv`` with the
  block's ``num_key_value_groups``) runs unchanged and the export records stay uniform; removing single
  query heads would leave groups of different sizes, which no stock attention expresses.
* **MLP channel** — one input column of down_proj (fc2) with the matching rows of gate/up (fc1).

Everything is read from the current module shapes, so it also works on an already pruned block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import ArchAdapter, UnsupportedModelError


def dense_by_kind(adapter: ArchAdapter) -> dict[str, str]:
    """kind -> dense path (``{"q": "self_attn.q_proj", ..., "down": "mlp.down_proj"}``)."""
    return {d.kind: d.name for d in adapter.denses}


RESIDUAL_WRITER_KINDS = ("o", "down")  # the dense kinds whose outputs a block adds to the residual stream


def residual_writers(adapter: ArchAdapter) -> tuple[str, ...]:
    """Dense paths whose outputs a block adds to the residual stream: the attention output (kind "o") and the
    MLP's down projection (kind "down", the consumer whose inputs decide its producers' rows) — also in fused
    families, where q/k/v or gate/up share one linear but these two stay their own."""
    kinds = dense_by_kind(adapter)
    missing = [k for k in RESIDUAL_WRITER_KINDS if k not in kinds]
    if missing:
        raise UnsupportedModelError(f"{adapter.family}: no dense of kind {', '.join(missing)}, so what the blocks add "
                                    "to the residual stream is not known")
    assert kinds["down"] == mlp_consumer(adapter), (kinds["down"], mlp_consumer(adapter))
    return tuple(kinds[k] for k in RESIDUAL_WRITER_KINDS)


def _params(module: nn.Module, rows: int = 0, cols: int = 0) -> int:
    """Parameters in ``rows`` output rows (weight + bias) or ``cols`` input columns of a linear."""
    d_out, d_in = module.weight.shape
    return rows * (d_in + (1 if module.bias is not None else 0)) + cols * d_out


@dataclass(frozen=True)
class AttentionUnits:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def grouped(self) -> bool:
        return self.kv_heads < self.heads

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @property
    def count(self) -> int:
        return self.kv_heads if self.grouped else self.heads

    @property
    def query_heads_per_unit(self) -> int:
        return self.group if self.grouped else 1

    def column_units(self) -> torch.Tensor:
        """Unit of every o_proj input column / q output row, (heads · head_dim,) long."""
        head = torch.arange(self.heads * self.head_dim) // self.head_dim
        return head // self.query_heads_per_unit

    def q_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """q output rows (= o_proj input columns) of the kept units, ascending."""
        return torch.nonzero(torch.isin(self.column_units(), keep.cpu())).flatten()

    def kv_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """k/v output rows of the kept units, ascending."""
        kv_head = torch.arange(self.kv_heads * self.head_dim) // self.head_dim  # one kv head per unit either way
        return torch.nonzero(torch.isin(kv_head, keep.cpu())).flatten()


def attention_units(block: nn.Module, adapter: ArchAdapter, head_dim: int) -> AttentionUnits:
    o = adapter.dense(block, adapter.attention.o)
    if hasattr(o, "input_index"):
        raise ValueError("this block's o_proj already lost single input columns; structured head pruning needs "
                         "whole heads — start from a model without neuron-pruned attention")
    refused = adapter.head_removal_refused(block)
    if refused is not None:
        raise UnsupportedModelError(f"{adapter.family}: structured pruning removes attention heads, which this "
                                    f"architecture cannot lose exactly ({refused})")
    heads, kv_heads = adapter.head_counts(block, head_dim)
    return AttentionUnits(heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def attention_unit_params(block: nn.Module, adapter: ArchAdapter, units: AttentionUnits) -> int:
    """Parameters one attention unit holds: its q, k, v rows (wherever the layout keeps them) and its o_proj
    columns (biases included)."""
    a = adapter.attention
    q_rows = units.query_heads_per_unit * units.head_dim
    rows: dict[str, int] = {}
    for name, n in ((a.q, q_rows), (a.k, units.head_dim), (a.v, units.head_dim)):
        rows[name] = rows.get(name, 0) + n
    return (sum(_params(adapter.dense(block, name), rows=n) for name, n in rows.items())
            + _params(adapter.dense(block, a.o), cols=q_rows))


def mlp_channel_params(block: nn.Module, adapter: ArchAdapter) -> int:
    """Parameters one MLP channel holds: a down_proj column and the gate/up rows that feed it."""
    consumer = next(d for d in adapter.denses if d.coupled_producers)
    down = adapter.dense(block, consumer.name)
    return _params(down, cols=1) + sum(_params(adapter.dense(block, p), rows=adapter.dense_spec(p).row_blocks)
                                       for p in consumer.coupled_producers)


def mlp_width(block: nn.Module, adapter: ArchAdapter) -> int:
    consumer = next(d for d in adapter.denses if d.coupled_producers)
    return adapter.dense(block, consumer.name).weight.shape[1]


def mlp_consumer(adapter: ArchAdapter) -> str:
    return next(d.name for d in adapter.denses if d.coupled_producers)

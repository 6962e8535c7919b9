"""Physical weight surgery: remove input columns (and coupled output rows) from linears for real.

A dense whose input is the hidden state (q/k/v/gate/up/fc1) cannot shrink its input without changing every
other reader of that hidden state, so it becomes an ``IndexedInputLinear``: a smaller weight plus the kept
input indices, applied as an index-select before the matmul. A dense whose input is private to the block
(down_proj/fc2, o_proj) is handled the same way, and for down/fc2 the producers' dead rows are removed, so
the MLP really gets narrower.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import ArchAdapter, UnsupportedModelError
from .structure import residual_writers


class IndexedInputLinear(nn.Module):
    """``y = x[..., input_index] @ weight.T + bias`` — a linear whose pruned input columns are gone."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_index: torch.Tensor, in_features: int):
        super().__init__()
        self.in_features = in_features  # width of the tensor this module reads, not of its weight
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.register_buffer("input_index", input_index.to(torch.long), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.input_index), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept_inputs={self.weight.shape[1]}, out_features={self.out_features}"


def input_index_of(module: nn.Module) -> torch.Tensor:
    """Indices (into the original input) that a dense still reads."""
    if isinstance(module, IndexedInputLinear):
        return module.input_index
    return torch.arange(module.weight.shape[1], device=module.weight.device)


def original_in_features(module: nn.Module) -> int:
    return module.in_features


def prune_inputs(module: nn.Module, keep: torch.Tensor, scale: torch.Tensor | None = None,
                 new_weight: torch.Tensor | None = None) -> nn.Module:
    """New module that reads only input columns ``keep`` (positions in the module's current weight).

    ``scale`` (len(keep)) multiplies the kept columns: that is how a tuned mask is folded into W.
    ``new_weight`` (d_out × len(keep)) replaces them outright (least-squares refit).
    If every column is kept the module keeps its plain nn.Linear type.
    """
    weight = module.weight.data[:, keep]  # (d_out, k)
    if new_weight is not None:
        weight = new_weight.to(dtype=weight.dtype, device=weight.device)
    elif scale is not None:
        weight = weight * scale.to(weight.dtype).unsqueeze(0)
    bias = module.bias.data.clone() if module.bias is not None else None
    index = input_index_of(module)[keep]
    full_width = original_in_features(module)
    if index.numel() == full_width and isinstance(module, nn.Linear):
        new = nn.Linear(full_width, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        new.weight.data.copy_(weight)
        if bias is not None:
            new.bias.data.copy_(bias)
        return new
    return IndexedInputLinear(weight.contiguous(), bias, index, full_width)


def prune_outputs(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """New module with only output rows ``keep`` (for producers whose consumer lost those inputs)."""
    weight = module.weight.data[keep].contiguous()
    bias = module.bias.data[keep].clone() if module.bias is not None else None
    if isinstance(module, IndexedInputLinear):
        return IndexedInputLinear(weight, bias, module.input_index.clone(), module.in_features)
    new = nn.Linear(module.in_features, weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def make_consumer_plain(module: nn.Module) -> nn.Module:
    """A consumer (down/fc2) whose dead inputs were removed upstream reads a narrower tensor: plain Linear."""
    weight = module.weight.data
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if module.bias is not None:
        new.bias.data.copy_(module.bias.data)
    return new


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    *parents, last = path.split(".")
    obj = root
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, new)


def add_output_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """``bias += delta`` (d_out,), giving the linear a bias first if it has none (FLAP's compensation)."""
    delta = delta.to(device=module.weight.device, dtype=module.weight.dtype)
    if module.bias is None:
        module.bias = nn.Parameter(delta.clone())
    else:
        module.bias.data.add_(delta)


def check_stream_rescale(block: nn.Module, adapter: ArchAdapter) -> None:
    """Refuse (``UnsupportedModelError``) a block whose share of the residual stream cannot be scaled exactly
    through its output projections (``ArchAdapter.stream_rescale``): the one check and message, asked before
    any measurement as well as by ``rescale_outputs``."""
    residual_writers(adapter)
    refused = adapter.stream_rescale_refused(block)
    if refused is not None:
        raise UnsupportedModelError(f"{adapter.family}: Prune&Comp's rescaling (layer_rescale) needs the residual "
                                    f"stream rescaled through the blocks' output projections, which cannot be "
                                    f"done exactly here: {refused}")


def rescale_outputs(block: nn.Module, adapter: ArchAdapter, factor: float) -> None:
    """Multiply what ``block`` adds to the residual stream by ``factor``, in place: the weights and biases of its
    residual writers (``structure.residual_writers``: attention output and MLP down, pruned or not). How
    Prune&Comp's scale of a removed block is folded into the blocks after it (by 1/s, which leaves tied
    embeddings alone). Refuses an architecture whose blocks normalise those outputs again or whose stream is
    not read through scale-invariant norms (``check_stream_rescale``)."""
    check_stream_rescale(block, adapter)
    with torch.no_grad():  # in place, so the version counters (and a streamed block's spill check) see it
        for name in residual_writers(adapter):
            module = adapter.dense(block, name)
            module.weight.mul_(factor)
            if module.bias is not None:
                module.bias.mul_(factor)


def apply_cuts(block: nn.Module, adapter: ArchAdapter, keeps: dict[str, torch.Tensor],
               masks: dict[str, torch.Tensor | None] | None = None,
               new_weights: dict[str, torch.Tensor | None] | None = None,
               bias_deltas: dict[str, torch.Tensor] | None = None) -> int:
    """Keep only columns ``keeps[name]`` (positions in each dense's current weight) of the denses named there,
    folding a tuned mask or a refit weight into them and adding ``bias_deltas[name]`` to their output bias; a
    consumer's removed inputs also remove its producers' rows. Returns the number of parameters gone."""
    params = sum(p.numel() for p in block.parameters())
    masks, new_weights, bias_deltas = masks or {}, new_weights or {}, bias_deltas or {}
    new_modules: dict[str, nn.Module] = {}
    for spec in adapter.denses:
        module = adapter.dense(block, spec.name)
        if spec.name in bias_deltas:
            add_output_bias(module, bias_deltas[spec.name])
        if spec.name not in keeps:
            continue
        keep = keeps[spec.name].to(module.weight.device)
        if keep.numel() == module.weight.shape[1]:
            continue
        mask, weight = masks.get(spec.name), new_weights.get(spec.name)
        shrunk = prune_inputs(module, keep, mask.to(module.weight.device) if mask is not None else None, weight)
        new_modules[spec.name] = make_consumer_plain(shrunk) if spec.coupled_producers else shrunk
        for producer in spec.coupled_producers:
            base = new_modules.get(producer, adapter.dense(block, producer))
            new_modules[producer] = prune_outputs(base, adapter.producer_rows(producer, keep, module.weight.shape[1]))
    for name, module in new_modules.items():
        replace_submodule(block, name, module)
    return params - sum(p.numel() for p in block.parameters())


def remove_attention_units(block: nn.Module, adapter: ArchAdapter, units, keep: torch.Tensor,
                           o_scale: torch.Tensor | None = None, o_weight: torch.Tensor | None = None) -> int:
    """Remove every attention unit (head or KV group, ``structure.AttentionUnits``) not in ``keep``: q/k/v rows
    and o_proj columns go, and o_proj becomes a plain linear over the narrower attention output. ``o_scale``
    (one factor per kept o column) folds a tuned mask into o_proj; ``o_weight`` (d_out × kept columns)
    replaces its kept columns outright (a refit). The q/k/v rows go wherever the registry's layout puts
    them (also inside a fused q/k/v linear). Returns the parameters gone."""
    keep = torch.sort(keep.cpu()).values
    if keep.numel() == units.count:
        return 0
    if keep.numel() == 0:
        raise ValueError("an attention module must keep at least one unit")
    attention = adapter.attention
    refused = adapter.head_removal_refused(block)
    if refused is not None:
        raise UnsupportedModelError(f"{adapter.family}: attention heads cannot be removed exactly: {refused}")
    params = sum(p.numel() for p in block.parameters())
    heads = keep.numel() * units.query_heads_per_unit
    kv_heads = keep.numel() if units.grouped else heads
    kept_heads = torch.nonzero(torch.isin(units.column_units()[::units.head_dim], keep)).flatten()
    kept_kv = keep if units.grouped else kept_heads
    replace_heads(block, adapter, units.heads, units.kv_heads, units.head_dim, kept_heads, kept_kv)
    o = adapter.dense(block, attention.o)
    q_rows = units.q_rows(keep)
    scale = o_scale.to(o.weight.device) if o_scale is not None else None
    replace_submodule(block, attention.o, make_consumer_plain(prune_inputs(o, q_rows.to(o.weight.device), scale,
                                                                           o_weight)))
    adapter.set_heads(block, heads, kv_heads)
    return params - sum(p.numel() for p in block.parameters())


def qkv_keep_rows(adapter: ArchAdapter, block: nn.Module, heads: int, kv_heads: int, head_dim: int,
                  kept_heads: torch.Tensor, kept_kv: torch.Tensor) -> dict[str, torch.Tensor]:
    """{q/k/v dense path: its output rows that the kept query heads and kv heads hold, ascending}; a fused
    q/k/v dense gets the union. The layout's index map places them so that the kept rows, in order, are
    the same layout with fewer heads (asserted)."""
    rows = adapter.head_rows(block, heads, kv_heads, head_dim)
    picked = {"q": rows["q"][kept_heads], "k": rows["k"][kept_kv], "v": rows["v"][kept_kv]}
    attention = adapter.attention
    by_dense: dict[str, list[torch.Tensor]] = {}
    for kind, name in (("q", attention.q), ("k", attention.k), ("v", attention.v)):
        by_dense.setdefault(name, []).append(picked[kind].flatten())
    out = {name: torch.sort(torch.cat(parts)).values for name, parts in by_dense.items()}
    # the kept rows, renumbered, must be the new layout's rows of the same heads
    new_rows = adapter.head_rows(block, kept_heads.numel(), kept_kv.numel(), head_dim)
    for kind, name in (("q", attention.q), ("k", attention.k), ("v", attention.v)):
        renumbered = torch.searchsorted(out[name], picked[kind].flatten())
        assert torch.equal(renumbered, new_rows[kind].flatten()), f"{name}: kept heads break the {kind} layout"
    return out


def replace_heads(block: nn.Module, adapter: ArchAdapter, heads: int, kv_heads: int, head_dim: int,
                  kept_heads: torch.Tensor, kept_kv: torch.Tensor) -> None:
    """Keep only the rows of query heads ``kept_heads`` and kv heads ``kept_kv`` in the q/k/v denses."""
    for name, rows in qkv_keep_rows(adapter, block, heads, kv_heads, head_dim, kept_heads, kept_kv).items():
        module = adapter.dense(block, name)
        replace_submodule(block, name, prune_outputs(module, rows.to(module.weight.device)))


def apply_input_order(block: nn.Module, adapter: ArchAdapter, name: str, order: torch.Tensor) -> None:
    """Store dense ``name``'s weight with its input columns in ``order`` and make its input arrive in that
    order, without changing what the block computes.

    A plain coupled consumer (down_proj, fc2) gets its producers' output rows (and biases) permuted, so the
    activations arrive already permuted at no runtime cost; any other dense reads a tensor it shares (the
    normed residual stream, the heads' outputs) and becomes an ``IndexedInputLinear`` reading
    ``input[..., index[order]]``."""
    module = adapter.dense(block, name)
    spec = adapter.dense_spec(name)
    order = order.to(module.weight.device)
    if order.numel() != module.weight.shape[1]:
        raise ValueError(f"{name}: order has {order.numel()} entries, the weight {module.weight.shape[1]} columns")
    weight = module.weight.data[:, order].contiguous()  # (d_out, d_in) in stored order
    if spec.coupled_producers and not isinstance(module, IndexedInputLinear):
        module.weight.data = weight
        for producer in spec.coupled_producers:
            source = adapter.dense(block, producer)
            rows = adapter.producer_rows(producer, order, order.numel())
            source.weight.data = source.weight.data[rows].contiguous()  # output rows in stored order
            if source.bias is not None:
                source.bias.data = source.bias.data[rows].contiguous()
        return
    bias = module.bias.data.clone() if module.bias is not None else None
    index = input_index_of(module)[order]
    replace_submodule(block, name, IndexedInputLinear(weight, bias, index, module.in_features))

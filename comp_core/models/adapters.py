"""Architecture adapters: where a model keeps its blocks and which linears ("denses") each block has.

Found by inspecting modules, not by model class, so Llama, Mistral, Qwen2/Qwen3, SmolLM and any other
Llama-shaped model share one adapter, and OPT has the other. Everything the pruning code needs to know
about an architecture lives here: block list, dense names in processing order, which denses share an
input (one Gram serves them all), which output rows die with a consumer's input column (structural
coupling), and how to fix the config after blocks are removed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model does not have a block layout comp-explorer knows how to prune."""


@dataclass(frozen=True)
class DenseSpec:
    """One prunable linear inside a block.

    name: dotted path inside the block (``"mlp.down_proj"``); kind: short label shared across
    architectures (``"q"``, ``"down"``...). ``coupled_producers`` are denses whose *output rows* become
    dead when an *input column* of this dense is removed (gate/up rows for down_proj; fc1 rows for fc2).
    """

    name: str
    kind: str
    coupled_producers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    blocks_path: str
    denses: tuple[DenseSpec, ...]
    input_groups: tuple[tuple[str, ...], ...]  # denses that see the same input tensor
    attention_path: str = "self_attn"
    per_layer_config_lists: tuple[str, ...] = field(default=("layer_types", "no_rope_layers", "mlp_only_layers"))

    # -- model level -------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(_base(model), self.blocks_path)

    def dense(self, block: nn.Module, name: str) -> nn.Module:
        return _get(block, name)

    def dense_spec(self, name: str) -> DenseSpec:
        return next(d for d in self.denses if d.name == name)

    def coupled_consumer(self, producer: str) -> str | None:
        """The dense whose input columns decide this dense's output rows, if any."""
        for d in self.denses:
            if producer in d.coupled_producers:
                return d.name
        return None

    def keep_blocks(self, model: nn.Module, keep: list[int]) -> None:
        """Drop every block not in ``keep`` (indices into the current list) and fix the config.

        transformers 5 sizes the KV cache from ``num_hidden_layers`` and indexes it by each attention's
        ``layer_idx``; both must be renumbered, and per-layer config lists sliced, or generate() breaks
        (see shared notes/hf-reload.md).
        """
        blocks = self.blocks(model)
        kept = [blocks[i] for i in keep]
        _set(_base(model), self.blocks_path, nn.ModuleList(kept))
        for new_idx, block in enumerate(kept):
            attn = _get(block, self.attention_path)
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = new_idx
            if hasattr(block, "layer_idx"):
                block.layer_idx = new_idx
        config = model.config
        old_n = config.num_hidden_layers
        for attr in self.per_layer_config_lists:
            values = getattr(config, attr, None)
            if isinstance(values, (list, tuple)) and len(values) == old_n:
                setattr(config, attr, [values[i] for i in keep])
        config.num_hidden_layers = len(kept)


    @contextlib.contextmanager
    def only_blocks(self, model: nn.Module, blocks: list[nn.Module]) -> Iterator[None]:
        """Run the model with just ``blocks`` for a while (a full forward/backward of the layer-removed model
        during analysis), then restore the original list and layer count. No-op if they are the list."""
        base = _base(model)
        saved_list, saved_n = self.blocks(model), model.config.num_hidden_layers
        if list(saved_list) == list(blocks):
            yield
            return
        _set(base, self.blocks_path, nn.ModuleList(blocks))
        model.config.num_hidden_layers = len(blocks)
        try:
            yield
        finally:
            _set(base, self.blocks_path, saved_list)
            model.config.num_hidden_layers = saved_n


def _base(model: nn.Module) -> nn.Module:
    """The decoder stack: ``model.model`` for *ForCausalLM wrappers, else the model itself."""
    return getattr(model, "model", model)


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(root: nn.Module, path: str, value) -> None:
    *parents, last = path.split(".")
    obj = root
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _has(root: nn.Module, path: str) -> bool:
    try:
        _get(root, path)
        return True
    except AttributeError:
        return False


LLAMA_FAMILY = ArchAdapter(
    family="llama",
    blocks_path="layers",
    denses=(
        DenseSpec("self_attn.q_proj", "q"),
        DenseSpec("self_attn.k_proj", "k"),
        DenseSpec("self_attn.v_proj", "v"),
        DenseSpec("self_attn.o_proj", "o"),
        DenseSpec("mlp.gate_proj", "gate"),
        DenseSpec("mlp.up_proj", "up"),
        DenseSpec("mlp.down_proj", "down", coupled_producers=("mlp.gate_proj", "mlp.up_proj")),
    ),
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

OPT_FAMILY = ArchAdapter(
    family="opt",
    blocks_path="decoder.layers",
    denses=(
        DenseSpec("self_attn.q_proj", "q"),
        DenseSpec("self_attn.k_proj", "k"),
        DenseSpec("self_attn.v_proj", "v"),
        DenseSpec("self_attn.out_proj", "o"),
        DenseSpec("fc1", "up"),
        DenseSpec("fc2", "down", coupled_producers=("fc1",)),
    ),
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
)

ADAPTERS: tuple[ArchAdapter, ...] = (LLAMA_FAMILY, OPT_FAMILY)


def get_adapter(model: nn.Module) -> ArchAdapter:
    """Pick the adapter whose block list and denses the model really has; explain what was missing."""
    base = _base(model)
    if not hasattr(model, "config"):
        raise UnsupportedModelError("model has no `config`; pass a transformers causal LM")
    reasons = []
    for adapter in ADAPTERS:
        if not _has(base, adapter.blocks_path):
            reasons.append(f"{adapter.family}: no `{adapter.blocks_path}` block list")
            continue
        blocks = _get(base, adapter.blocks_path)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            reasons.append(f"{adapter.family}: `{adapter.blocks_path}` is not a non-empty ModuleList")
            continue
        missing = [d.name for d in adapter.denses if not _has(blocks[0], d.name)]
        if missing:
            reasons.append(f"{adapter.family}: block 0 lacks {', '.join(missing)}")
            continue
        not_linear = [d.name for d in adapter.denses if not isinstance(_get(blocks[0], d.name), nn.Linear)
                      and not hasattr(_get(blocks[0], d.name), "input_index")]
        if not_linear:
            reasons.append(f"{adapter.family}: {', '.join(not_linear)} are not nn.Linear")
            continue
        return adapter
    model_type = getattr(model.config, "model_type", type(model).__name__)
    raise UnsupportedModelError(
        f"unsupported architecture '{model_type}': comp-explorer supports Llama-family "
        f"(q/k/v/o + gate/up/down) and OPT (q/k/v/out + fc1/fc2) decoders. Checked: " + "; ".join(reasons)
    )


def block_parameter_count(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def dense_weight(module: nn.Module) -> torch.Tensor:
    return module.weight

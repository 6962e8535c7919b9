"""Model classes for physically pruned checkpoints: every block rebuilt from its own record in config.json.

No architecture in transformers 5.x expresses "a block whose MLP width, head count or input columns differ per
layer" (shared notes/hf-reload.md), so each registered model type (``models.adapters.REGISTRY``) gets a thin
pair of subclasses:

* ``Comp<Base>Config`` (``model_type = "comp_<base>"``, e.g. ``comp_llama``): the stock config plus one field,
  ``comp_layers``, a list with one record per block::

      {"mlp_width": 1097,            # the registry's MLP width attribute (intermediate_size, ffn_dim...)
       "heads": 9, "kv_heads": 3,    # attention heads kept (kv_heads == heads where the stock block has
                                     # one kv head per query head: OPT, GPT-NeoX)
       "indexed": {"self_attn.o_proj": 536},   # denses that read only some input columns: kept count
       "added_bias": ["self_attn.o_proj", "mlp.down_proj"]}   # optional: denses that gained a bias

  ``added_bias`` lists the denses that have an output bias although the stock block has none (FLAP's bias
  compensation gives o_proj / down_proj one); it is left out when empty, so records written before it
  existed still load. Validation (``@strict`` + ``validate_architecture``) checks every record against
  the stock config.
* ``Comp<Base>ForCausalLM``: the stock model class; after the stock ``__init__`` has built full-size blocks
  (on the meta device inside ``from_pretrained``, so that costs nothing) each block's denses are replaced by
  modules of the recorded shapes (a fused q/k/v or gate/up linear gets the rows the registry's index maps
  give), and the attention's cached head counts are set (``ArchAdapter.set_heads``). Weight names are unchanged, and an ``IndexedInputLinear`` adds one key,
  ``<dense>.input_index`` (int64, a persistent buffer), so the checkpoint maps key for key onto the model.

Importing this module registers every pair with ``AutoConfig`` / ``AutoModelForCausalLM``, so after
``import comp_core.models.pruned`` (done by ``comp_core.export.folder``) a plain
``AutoModelForCausalLM.from_pretrained(folder)`` loads a pruned folder; no remote code is involved.

Supported stock types: ``llama`` (also SmolLM/SmolLM2), ``smollm3``, ``mistral``, ``qwen2``, ``qwen3``, ``opt``,
``gemma``, ``gemma2``, ``gemma3_text`` (Gemma3ForCausalLM), ``phi3`` (Phi-3 and Phi-4), ``gpt_neox`` (Pythia),
``olmo2``, ``falcon``.
"""
from __future__ import annotations

import functools
import json

import torch
from torch import nn

from .surgery import IndexedInputLinear
from .adapters import COMP_PREFIX, REGISTRY, ArchAdapter, registered

LAYERS_FIELD = "comp_layers"
# stock model_type -> (config class name, causal-LM class name) in the ``transformers`` namespace; read from
# the registry (``models.adapters.REGISTRY``)
SUPPORTED: dict[str, tuple[str, str]] = {
    model_type: (adapter.config_class, adapter.model_class) for model_type, adapter in REGISTRY.items()}


def adapter_for(base_type: str) -> ArchAdapter:
    return registered(base_type)


def base_model_type(model_type: str) -> str:
    """``"comp_qwen3"`` -> ``"qwen3"``; a stock type is returned unchanged. Raises for unsupported types."""
    registered(model_type)
    return model_type.removeprefix(COMP_PREFIX)


def mlp_width_attr(base_type: str) -> str:
    return adapter_for(base_type).mlp_width_attr


def full_heads(config, base_type: str | None = None) -> tuple[int, int]:
    """(query heads, key/value heads) of an unpruned block of this config (read from a stock block, so
    Falcon's multi-query single kv head counts too)."""
    _, heads, kv_heads = _stock_facts(base_type or config.model_type.removeprefix(COMP_PREFIX),
                                      _stock_values(config, base_type))
    return heads, kv_heads


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ---------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------

def mlp_names(adapter: ArchAdapter) -> tuple[tuple[str, ...], str]:
    """(producers, consumer) of the MLP: ((gate, up), down), ((gate_up,), down) or ((fc1,), fc2)."""
    consumer = next(d for d in adapter.denses if d.coupled_producers)
    return consumer.coupled_producers, consumer.name


_CONFIG_ONLY_KEYS = ("model_type", "transformers_version", "architectures", LAYERS_FIELD, "auto_map")


def _stock_values(config, base_type: str | None) -> str:
    """The config's values for a one-block stock config, as a JSON key (per-layer lists left out)."""
    adapter = adapter_for(base_type or config.model_type.removeprefix(COMP_PREFIX))
    drop = set(_CONFIG_ONLY_KEYS) | set(adapter.per_layer_config_lists)
    values = {k: v for k, v in config.to_dict().items() if k not in drop}
    values["num_hidden_layers"] = 1
    return json.dumps(values, sort_keys=True, default=str)


def stock_block(config, base_type: str) -> nn.Module:
    """One stock block of ``config`` (stock or ``comp_<type>``), built on the meta device (no memory, no
    weights), so every family's own rules (biases, head counts) are read from the stock code itself."""
    return _build_stock_block(base_type, _stock_values(config, base_type))[0]


def _build_stock_block(base_type: str, values: str) -> tuple[nn.Module, object]:
    """(stock block, its one-block stock config)."""
    import transformers

    config_name, model_name = SUPPORTED[base_type]
    stock_config = getattr(transformers, config_name).from_dict(json.loads(values))
    with torch.device("meta"):
        stock = getattr(transformers, model_name)(stock_config)
    return adapter_for(base_type).blocks(stock)[0], stock_config


@functools.lru_cache(maxsize=64)
def _stock_facts(base_type: str, values: str) -> tuple[frozenset[str], int, int]:
    """(biased denses, heads, kv_heads) of a stock block; cached, as every record check asks for them."""
    adapter = adapter_for(base_type)
    block, stock_config = _build_stock_block(base_type, values)
    biased = frozenset(d.name for d in adapter.denses if adapter.dense(block, d.name).bias is not None)
    heads, kv_heads = adapter.head_counts(block, head_dim_of(stock_config))
    return biased, heads, kv_heads


def stock_biased(config, base_type: str) -> frozenset[str]:
    """Denses that have an output bias in a stock block of ``config`` (``attention_bias``, ``mlp_bias``,
    Qwen2's biased q/k/v, OPT's ``enable_bias``, GPT-NeoX's biases everywhere...)."""
    return _stock_facts(base_type, _stock_values(config, base_type))[0]


def block_record(denses: dict[str, nn.Module], adapter: ArchAdapter, head_dim: int,
                 stock_bias: frozenset[str] | set[str] = frozenset()) -> dict:
    """The record (see module docstring) describing a block whose denses are ``denses`` (path -> module);
    ``stock_bias``: the denses a stock block has a bias in (``stock_biased``), so the others' are recorded."""
    _, consumer = mlp_names(adapter)
    down = denses[consumer]
    indexed = {name: int(module.input_index.numel()) for name, module in denses.items()
               if isinstance(module, IndexedInputLinear)}
    heads, kv_heads = adapter.head_counts_of(denses, head_dim)
    record = {
        "mlp_width": int(down.in_features),  # an IndexedInputLinear's in_features is the width it reads
        "heads": int(heads),
        "kv_heads": int(kv_heads),
        "indexed": indexed,
    }
    added = [d.name for d in adapter.denses if denses[d.name].bias is not None and d.name not in stock_bias]
    if added:
        record["added_bias"] = added
    return record


def is_stock_record(record: dict, config, base_type: str) -> bool:
    """True when a block has exactly the stock shapes and biases (nothing but whole-block removal happened)."""
    heads, kv_heads = full_heads(config, base_type)
    return (record["mlp_width"] == getattr(config, mlp_width_attr(base_type)) and record["heads"] == heads
            and record["kv_heads"] == kv_heads and not record["indexed"] and not record.get("added_bias"))


def check_records(records, config, base_type: str) -> None:
    """Raise ``ValueError`` unless ``records`` is a valid ``comp_layers`` list for ``config`` (None = all stock)."""
    if records is None:
        return
    n = config.num_hidden_layers
    if not isinstance(records, (list, tuple)) or len(records) != n:
        raise ValueError(f"{LAYERS_FIELD} must be a list with one record per block ({n}), "
                         f"got {type(records).__name__} of length {len(records) if hasattr(records, '__len__') else '?'}")
    heads, kv_heads = full_heads(config, base_type)
    dims = {d.name for d in adapter_for(base_type).denses}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not {"mlp_width", "heads", "kv_heads", "indexed"} <= set(rec):
            raise ValueError(f"{LAYERS_FIELD}[{i}] must have keys mlp_width, heads, kv_heads, indexed; got {rec!r}")
        if not isinstance(rec["mlp_width"], int) or rec["mlp_width"] < 0:
            raise ValueError(f"{LAYERS_FIELD}[{i}].mlp_width must be an integer >= 0, got {rec['mlp_width']!r}")
        h, kv = rec["heads"], rec["kv_heads"]
        if not (isinstance(h, int) and isinstance(kv, int) and 1 <= kv <= kv_heads and 1 <= h <= heads
                and h % kv == 0):
            raise ValueError(f"{LAYERS_FIELD}[{i}]: heads={h}, kv_heads={kv} must satisfy 1 <= kv_heads <= "
                             f"{kv_heads}, 1 <= heads <= {heads} and heads % kv_heads == 0")
        if kv_heads == heads and h != kv:
            raise ValueError(f"{LAYERS_FIELD}[{i}]: a stock block of this config has one key/value head per "
                             f"query head, so heads == kv_heads; got heads={h}, kv_heads={kv}")
        for name, kept in dict(rec["indexed"]).items():
            if name not in dims:
                raise ValueError(f"{LAYERS_FIELD}[{i}].indexed: unknown dense '{name}' (known: {sorted(dims)})")
            if not isinstance(kept, int) or kept < 1:
                raise ValueError(f"{LAYERS_FIELD}[{i}].indexed['{name}'] must be an integer >= 1, got {kept!r}")
        added = rec.get("added_bias", [])
        if (not isinstance(added, (list, tuple)) or not all(isinstance(n, str) for n in added)
                or len(set(added)) != len(added)):
            raise ValueError(f"{LAYERS_FIELD}[{i}].added_bias must be a list of distinct dense names, got {added!r}")
        unknown = sorted(set(added) - dims)
        if unknown:
            raise ValueError(f"{LAYERS_FIELD}[{i}].added_bias: unknown denses {unknown} (known: {sorted(dims)})")


# ---------------------------------------------------------------------------------------------------------
# rebuilding a block from its record
# ---------------------------------------------------------------------------------------------------------

def _linear(in_features: int, out_features: int, bias: bool, like: nn.Module) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def apply_record(block: nn.Module, record: dict, adapter: ArchAdapter, head_dim: int) -> None:
    """Replace the denses of a stock-shaped ``block`` by modules with the shapes in ``record`` (weights unset)."""
    producers, consumer = mlp_names(adapter)
    attention = adapter.attention
    heads, kv_heads, width = record["heads"], record["kv_heads"], record["mlp_width"]
    # (in_features, out_features) of every dense in the new block, before input indexing; a fused q/k/v
    # dense holds the rows of every kind the layout puts in it
    shapes: dict[str, tuple[int | None, int | None]] = {}
    rows = adapter.head_rows(block, heads, kv_heads, head_dim)
    for kind, name in (("q", attention.q), ("k", attention.k), ("v", attention.v)):
        shapes[name] = (None, (shapes.get(name, (None, 0))[1] or 0) + rows[kind].numel())
    shapes[attention.o] = (heads * head_dim, None)
    shapes[consumer] = (width, None)
    shapes.update({p: (None, width * adapter.dense_spec(p).row_blocks) for p in producers})
    added = set(record.get("added_bias", ()))
    for spec in adapter.denses:
        old = adapter.dense(block, spec.name)
        d_in, d_out = shapes.get(spec.name, (None, None))
        d_in = old.in_features if d_in is None else d_in
        d_out = old.out_features if d_out is None else d_out
        if spec.name in added and old.bias is not None:
            raise ValueError(f"{LAYERS_FIELD}: '{spec.name}' is listed in added_bias but a stock block already "
                             "has a bias there")
        has_bias = old.bias is not None or spec.name in added
        if spec.name in record["indexed"]:
            kept = record["indexed"][spec.name]
            new = IndexedInputLinear(
                torch.empty(d_out, kept, device=old.weight.device, dtype=old.weight.dtype),  # (d_out, k)
                torch.empty(d_out, device=old.weight.device, dtype=old.weight.dtype) if has_bias else None,
                torch.zeros(kept, dtype=torch.long, device=old.weight.device), d_in)
        elif (d_in, d_out) != (old.in_features, old.out_features) or has_bias != (old.bias is not None):
            new = _linear(d_in, d_out, has_bias, old)
        else:
            continue
        _set_path(block, spec.name, new)
    adapter.set_heads(block, heads, kv_heads)


def _set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, value)


# ---------------------------------------------------------------------------------------------------------
# class factory + registration
# ---------------------------------------------------------------------------------------------------------

@functools.cache
def comp_classes(base_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) for ``comp_<base_type>``, created once and registered with the Auto classes."""
    import transformers
    from huggingface_hub.dataclasses import strict
    from transformers import AutoConfig, AutoModelForCausalLM

    base_type = base_model_type(base_type)
    config_name, model_name = SUPPORTED[base_type]
    base_config = getattr(transformers, config_name)
    base_model = getattr(transformers, model_name)
    adapter = adapter_for(base_type)

    def validate_architecture(self):
        base_config.validate_architecture(self)
        check_records(self.comp_layers, self, base_type)

    config_cls = strict(type(f"Comp{config_name}", (base_config,), {
        "__module__": __name__,
        "__doc__": f"{config_name} plus ``comp_layers``: one shape record per block (see comp_core.models.pruned).",
        "__annotations__": {LAYERS_FIELD: "list | None"},
        LAYERS_FIELD: None,
        "model_type": COMP_PREFIX + base_type,
        "validate_architecture": validate_architecture,
    }))

    def __init__(self, config):
        base_model.__init__(self, config)
        head_dim = head_dim_of(config)
        blocks = adapter.blocks(self)
        records = config.comp_layers
        if records is None:  # a default-constructed config: every block stock-shaped
            return
        assert len(blocks) == len(records), (len(blocks), len(records))
        for block, record in zip(blocks, records):
            apply_record(block, record, adapter, head_dim)

    model_cls = type(f"Comp{model_name}", (base_model,), {
        "__module__": __name__,
        "__doc__": f"{model_name} whose blocks are rebuilt from ``config.comp_layers`` (see comp_core.models.pruned).",
        "config_class": config_cls,
        "__init__": __init__,
    })
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    return config_cls, model_cls


def register_all() -> None:
    """Register ``comp_<type>`` for every supported stock type (idempotent)."""
    for base_type in SUPPORTED:
        comp_classes(base_type)


register_all()

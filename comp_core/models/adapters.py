"""Architecture registry: per ``config.model_type``, where a model keeps its blocks and what each block holds.

Everything the pruning and export code needs to know about an architecture lives here, in one entry per
stock ``model_type`` (``REGISTRY``): the block list, the prunable linears ("denses") in processing order,
which denses share an input (one Gram serves them all), which producer rows die with a consumer's input
column (coupling, as an index map), where each attention head's q/k/v rows sit (also when q, k and v are
one fused linear), which attention attributes cache head counts, and the stock classes a pruned model is
saved and reloaded as. The rest of the code reads these facts and never branches on a family name.

A model whose ``model_type`` is not registered is matched by structure against the known block layouts
(``STRUCTURAL``); the match is logged, and such a model can be pruned in memory but not exported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

COMP_PREFIX = "comp_"


class UnsupportedModelError(ValueError):
    """The model does not have a block layout comp-explorer knows how to prune."""


@dataclass(frozen=True)
class DenseSpec:
    """One prunable linear inside a block.

    name: dotted path inside the block (``"mlp.down_proj"``); kind: short label shared across
    architectures (``"q"``, ``"down"``, ``"qkv"`` for a fused q/k/v...). ``coupled_producers`` are denses whose
    *output rows* become dead when an *input column* of this dense is removed (gate/up rows for down_proj;
    fc1 rows for fc2). ``row_blocks``: for a producer, how many stacked copies of its consumer's input space
    its output rows hold — 2 for a fused ``gate_up_proj`` = [gate rows 0..I-1 ; up rows I..2I-1], so
    removing consumer input j removes its rows j and I + j (``ArchAdapter.producer_rows``).
    """

    name: str
    kind: str
    coupled_producers: tuple[str, ...] = ()
    row_blocks: int = 1


# ---------------------------------------------------------------------------------------------------------
# attention layouts: where head h's rows sit in the q/k/v denses (index maps, pure)
# ---------------------------------------------------------------------------------------------------------

def _separate(heads: int, kv_heads: int, d: int) -> dict[str, torch.Tensor]:
    """q, k, v in their own linears, head-major."""
    return {"q": torch.arange(heads * d).view(heads, d), "k": torch.arange(kv_heads * d).view(kv_heads, d),
            "v": torch.arange(kv_heads * d).view(kv_heads, d)}


def _stacked(heads: int, kv_heads: int, d: int) -> dict[str, torch.Tensor]:
    """One fused linear = [all q heads ; all k heads ; all v heads] (Phi-3 ``qkv_proj``, Falcon multi-query)."""
    q = torch.arange(heads * d).view(heads, d)
    k = heads * d + torch.arange(kv_heads * d).view(kv_heads, d)
    return {"q": q, "k": k, "v": k + kv_heads * d}


def _interleaved(heads: int, kv_heads: int, d: int) -> dict[str, torch.Tensor]:
    """One fused linear viewed as (heads, 3, d): head h's q, k, v rows side by side (GPT-NeoX, Falcon
    without multi-query); needs kv_heads == heads."""
    assert kv_heads == heads, (heads, kv_heads)
    base = torch.arange(heads)[:, None] * 3 * d + torch.arange(d)  # (heads, d)
    return {"q": base, "k": base + d, "v": base + 2 * d}


def _grouped(heads: int, kv_heads: int, d: int) -> dict[str, torch.Tensor]:
    """One fused linear viewed as (kv_heads, group + 2, d): each group's q heads, then its k, then its v
    (Falcon ``new_decoder_architecture``)."""
    group = heads // kv_heads
    start = torch.arange(kv_heads)[:, None] * (group + 2) * d  # (kv_heads, 1)
    q = (start[:, None, :] + torch.arange(group)[None, :, None] * d + torch.arange(d)).reshape(heads, d)
    k = start + group * d + torch.arange(d)
    return {"q": q, "k": k, "v": k + d}


LAYOUTS: dict[str, Callable[[int, int, int], dict[str, torch.Tensor]]] = {
    "separate": _separate, "stacked": _stacked, "interleaved": _interleaved, "grouped": _grouped}


@dataclass(frozen=True)
class AttentionSpec:
    """How one attention module is laid out and what it caches about its heads.

    ``q``/``k``/``v``/``o``: dense paths inside the block (the same path for a fused q/k/v). ``layout``: a key
    of ``LAYOUTS``, or a function of the attention module returning one (Falcon's depends on its config).
    ``head_attrs``: attention attributes holding a head count, each set to ``"heads"``, ``"kv_heads"`` or
    ``"groups"`` (heads // kv_heads) when heads are removed. ``head_removal``: None when whole heads may be
    removed exactly, else why not (the heads then stay; their o inputs can still go), or a function of the
    attention module saying so (Falcon: only without alibi).
    """

    q: str
    k: str
    v: str
    o: str
    layout: str | Callable[[nn.Module], str] = "separate"
    head_attrs: tuple[tuple[str, str], ...] = (("num_key_value_groups", "groups"),)
    head_removal: str | Callable[[nn.Module], str | None] | None = None

    def layout_of(self, attention: nn.Module) -> str:
        return self.layout if isinstance(self.layout, str) else self.layout(attention)

    def head_removal_refused(self, attention: nn.Module) -> str | None:
        """Why this attention module's heads cannot be removed exactly; None when they can."""
        return self.head_removal(attention) if callable(self.head_removal) else self.head_removal


def _falcon_alibi(attention: nn.Module) -> str | None:
    if attention.config.alibi:
        return "Falcon's alibi biases are built for config.num_attention_heads heads, one count for every layer"
    return None


def _opt_post_norm(block: nn.Module) -> str | None:
    if not getattr(block, "do_layer_norm_before", True):
        return ("this OPT normalises after the residual add (do_layer_norm_before=False), so the residual stream "
                "is not read through scale-invariant norms")
    return None


_POST_NORMS = ("normalises the attention and MLP outputs (post_attention_layernorm, post_feedforward_layernorm) "
               "before adding them to the residual stream, so scaling o_proj/down_proj changes nothing")


def _falcon_layout(attention: nn.Module) -> str:
    if attention.new_decoder_architecture:
        return "grouped"
    return "stacked" if attention.multi_query else "interleaved"


@dataclass(frozen=True)
class ArchAdapter:
    """One registered architecture (or a structural match): block layout, couplings and stock classes."""

    family: str
    blocks_path: str  # inside ``base_path``
    denses: tuple[DenseSpec, ...]
    input_groups: tuple[tuple[str, ...], ...]  # denses that see the same input tensor
    attention: AttentionSpec
    attention_path: str = "self_attn"
    base_path: str = "model"  # the decoder stack inside the *ForCausalLM wrapper
    mlp_width_attr: str = "intermediate_size"
    config_class: str | None = None  # stock classes in the ``transformers`` namespace (None: not exportable)
    model_class: str | None = None
    matched: str = "model_type"  # or what the structural fallback matched
    per_layer_config_lists: tuple[str, ...] = field(default=("layer_types", "no_rope_layers", "mlp_only_layers"))
    # None when multiplying a block's residual writers (its "o" and "down" denses, ``structure.residual_writers``)
    # scales exactly what the block adds to the residual stream, and every reader of the stream (the blocks'
    # input norms, the final norm) is scale invariant — pre-norm blocks; else why not, or a function of a block
    # saying so. Prune&Comp's compensation for removed blocks (``surgery.rescale_outputs``) needs None.
    stream_rescale: str | Callable[[nn.Module], str | None] | None = None

    # -- model level -------------------------------------------------------------------------------
    def base(self, model: nn.Module) -> nn.Module:
        """The decoder stack: ``model.<base_path>`` for *ForCausalLM wrappers, else the model itself."""
        return getattr(model, self.base_path, model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(self.base(model), self.blocks_path)

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

    def producer_rows(self, producer: str, consumer_index: torch.Tensor, width: int) -> torch.Tensor:
        """Rows of ``producer`` that feed the consumer inputs ``consumer_index`` (positions in a consumer input
        of ``width``): the index map of the coupling — ``[j ; width + j]`` for a fused gate_up."""
        blocks = self.dense_spec(producer).row_blocks
        return torch.cat([b * width + consumer_index for b in range(blocks)])

    def head_counts(self, block: nn.Module, head_dim: int) -> tuple[int, int]:
        """(query heads, key/value heads) a block holds now, read from its module shapes."""
        a = self.attention
        return self.head_counts_of({name: self.dense(block, name) for name in (a.q, a.k, a.v, a.o)}, head_dim)

    def head_counts_of(self, denses: dict[str, nn.Module], head_dim: int) -> tuple[int, int]:
        """``head_counts`` from {dense path: module}: o reads heads · head_dim columns; the k rows are what the
        k dense holds beyond q (and shares with v, when fused with it)."""
        a = self.attention
        heads = denses[a.o].in_features // head_dim
        k_rows = denses[a.k].weight.shape[0] // head_dim - (heads if a.k == a.q else 0)
        return heads, k_rows // (2 if a.k == a.v else 1)

    def head_rows(self, block: nn.Module, heads: int, kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """{"q": (heads, head_dim), "k"/"v": (kv_heads, head_dim)} row indices inside their denses."""
        layout = self.attention.layout_of(self.dense(block, self.attention_path))
        return LAYOUTS[layout](heads, kv_heads, head_dim)

    def head_removal_refused(self, block: nn.Module) -> str | None:
        """Why this block's attention heads cannot be removed exactly (``AttentionSpec.head_removal``)."""
        return self.attention.head_removal_refused(self.dense(block, self.attention_path))

    def stream_rescale_refused(self, block: nn.Module) -> str | None:
        """Why scaling this block's residual writers would not scale its share of the residual stream exactly
        (``stream_rescale``; a structural match is refused, its norms being unknown); None when it would."""
        if self.matched != "model_type":
            return (f"the model type is matched by structure only ({self.matched}), so whether its blocks read the "
                    "residual stream through scale-invariant norms is unknown")
        return self.stream_rescale(block) if callable(self.stream_rescale) else self.stream_rescale

    def set_heads(self, block: nn.Module, heads: int, kv_heads: int) -> None:
        """Tell the stock attention module how many heads its (narrower) projections now hold."""
        attention = self.dense(block, self.attention_path)
        values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads}
        for attr, which in self.attention.head_attrs:
            setattr(attention, attr, values[which])

    def keep_blocks(self, model: nn.Module, keep: list[int]) -> None:
        """Drop every block not in ``keep`` (indices into the current list) and fix the config.

        transformers 5 sizes the KV cache from ``num_hidden_layers`` and indexes it by each attention's
        ``layer_idx``; both must be renumbered, and per-layer config lists sliced, or generate() breaks
        (see shared notes/hf-reload.md).
        """
        blocks = self.blocks(model)
        kept = [blocks[i] for i in keep]
        _set(self.base(model), self.blocks_path, nn.ModuleList(kept))
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
        base = self.base(model)
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


# ---------------------------------------------------------------------------------------------------------
# block layouts (shared by several model types) and the registry
# ---------------------------------------------------------------------------------------------------------

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
    attention=AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
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
    attention=AttentionSpec("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                            head_attrs=(("num_heads", "heads"),)),
    mlp_width_attr="ffn_dim",
    stream_rescale=_opt_post_norm,
)

PHI3_FAMILY = ArchAdapter(
    family="phi3",
    blocks_path="layers",
    denses=(
        DenseSpec("self_attn.qkv_proj", "qkv"),
        DenseSpec("self_attn.o_proj", "o"),
        DenseSpec("mlp.gate_up_proj", "gate_up", row_blocks=2),
        DenseSpec("mlp.down_proj", "down", coupled_producers=("mlp.gate_up_proj",)),
    ),
    input_groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    attention=AttentionSpec("self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj",
                            layout="stacked",
                            head_attrs=(("num_key_value_groups", "groups"), ("num_key_value_heads", "kv_heads")),
                            head_removal="Phi-3's attention slices q/k/v at config.num_attention_heads · head_dim, "
                                         "one count for every layer"),
)

GPT_NEOX_FAMILY = ArchAdapter(
    family="gpt_neox",
    base_path="gpt_neox",
    blocks_path="layers",
    attention_path="attention",
    denses=(
        DenseSpec("attention.query_key_value", "qkv"),
        DenseSpec("attention.dense", "o"),
        DenseSpec("mlp.dense_h_to_4h", "up"),
        DenseSpec("mlp.dense_4h_to_h", "down", coupled_producers=("mlp.dense_h_to_4h",)),
    ),
    input_groups=(("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                  ("mlp.dense_4h_to_h",)),
    attention=AttentionSpec("attention.query_key_value", "attention.query_key_value", "attention.query_key_value",
                            "attention.dense", layout="interleaved", head_attrs=()),  # heads read from shapes
)

FALCON_FAMILY = ArchAdapter(
    family="falcon",
    base_path="transformer",
    blocks_path="h",
    attention_path="self_attention",
    denses=(
        DenseSpec("self_attention.query_key_value", "qkv"),
        DenseSpec("self_attention.dense", "o"),
        DenseSpec("mlp.dense_h_to_4h", "up"),
        DenseSpec("mlp.dense_4h_to_h", "down", coupled_producers=("mlp.dense_h_to_4h",)),
    ),
    input_groups=(("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
                  ("mlp.dense_4h_to_h",)),
    attention=AttentionSpec("self_attention.query_key_value", "self_attention.query_key_value",
                            "self_attention.query_key_value", "self_attention.dense", layout=_falcon_layout,
                            head_attrs=(("num_heads", "heads"), ("num_kv_heads", "kv_heads"),
                                        ("num_key_value_groups", "groups")),
                            head_removal=_falcon_alibi),
    mlp_width_attr="ffn_hidden_size",
)


def _llama_like(family: str, config_class: str, model_class: str, *, stream_rescale: str | None = None,
                **attention_changes) -> ArchAdapter:
    attention = dataclasses.replace(LLAMA_FAMILY.attention, **attention_changes)
    return dataclasses.replace(LLAMA_FAMILY, family=family, attention=attention, config_class=config_class,
                               model_class=model_class, stream_rescale=stream_rescale)


def _stock(adapter: ArchAdapter, config_class: str, model_class: str) -> ArchAdapter:
    return dataclasses.replace(adapter, config_class=config_class, model_class=model_class)


# stock model_type -> its entry (SmolLM and SmolLM2 checkpoints say "llama"). Gemma 2/3 and OLMo 2 have Llama's denses but their own blocks (extra norms,
# soft capping, scaled embeddings; OLMo 2's q_norm/k_norm) and classes, so each is its own entry.
REGISTRY: dict[str, ArchAdapter] = {
    "llama": _stock(LLAMA_FAMILY, "LlamaConfig", "LlamaForCausalLM"),
    "mistral": _stock(LLAMA_FAMILY, "MistralConfig", "MistralForCausalLM"),
    "qwen2": _stock(LLAMA_FAMILY, "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _stock(LLAMA_FAMILY, "Qwen3Config", "Qwen3ForCausalLM"),
    "opt": _stock(OPT_FAMILY, "OPTConfig", "OPTForCausalLM"),
    "smollm3": _stock(LLAMA_FAMILY, "SmolLM3Config", "SmolLM3ForCausalLM"),  # + no_rope_layers
    "gemma": _llama_like("gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma2": _llama_like("gemma2", "Gemma2Config", "Gemma2ForCausalLM", stream_rescale=f"Gemma 2 {_POST_NORMS}"),
    "gemma3_text": _llama_like("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
                               stream_rescale=f"Gemma 3 {_POST_NORMS}"),
    "olmo2": _llama_like("olmo2", "Olmo2Config", "Olmo2ForCausalLM",
                         head_removal="OLMo 2's q_norm/k_norm normalise over all heads together, so removing "
                                      "a head would change the others",
                         stream_rescale=f"OLMo 2 reads the raw residual stream and {_POST_NORMS}"),
    "phi3": _stock(PHI3_FAMILY, "Phi3Config", "Phi3ForCausalLM"),
    "gpt_neox": _stock(GPT_NEOX_FAMILY, "GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "falcon": _stock(FALCON_FAMILY, "FalconConfig", "FalconForCausalLM"),
}
# unknown model types are matched against these block layouts, in order
STRUCTURAL: tuple[ArchAdapter, ...] = (LLAMA_FAMILY, OPT_FAMILY, PHI3_FAMILY, GPT_NEOX_FAMILY, FALCON_FAMILY)


def supported_types() -> str:
    return ", ".join(REGISTRY)


def registered(model_type: str) -> ArchAdapter:
    """The entry of a stock or ``comp_<stock>`` model type; raises ``UnsupportedModelError`` naming what is
    supported otherwise."""
    base = model_type.removeprefix(COMP_PREFIX)
    if base not in REGISTRY:
        raise UnsupportedModelError(
            f"cannot export/reload model_type '{model_type}': physically pruned checkpoints are supported for "
            f"{supported_types()}")
    return REGISTRY[base]


def _mismatch(model: nn.Module, adapter: ArchAdapter) -> str | None:
    """Why ``model`` does not have ``adapter``'s block layout, or None when it does."""
    base = adapter.base(model)
    if not _has(base, adapter.blocks_path):
        return f"{adapter.family}: no `{adapter.blocks_path}` block list"
    blocks = _get(base, adapter.blocks_path)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return f"{adapter.family}: `{adapter.blocks_path}` is not a non-empty ModuleList"
    missing = [d.name for d in adapter.denses if not _has(blocks[0], d.name)]
    if missing:
        return f"{adapter.family}: block 0 lacks {', '.join(missing)}"
    not_linear = [d.name for d in adapter.denses if not isinstance(_get(blocks[0], d.name), nn.Linear)
                  and not hasattr(_get(blocks[0], d.name), "input_index")]
    if not_linear:
        return f"{adapter.family}: {', '.join(not_linear)} are not nn.Linear"
    return None


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The registry entry of the model's ``config.model_type`` (checked against its modules), or for an
    unregistered type the block layout its modules match (logged); explains what was missing otherwise."""
    if not hasattr(model, "config"):
        raise UnsupportedModelError("model has no `config`; pass a transformers causal LM")
    model_type = getattr(model.config, "model_type", type(model).__name__)
    base_type = model_type.removeprefix(COMP_PREFIX)
    if base_type in REGISTRY:
        adapter = REGISTRY[base_type]
        reason = _mismatch(model, adapter)
        if reason is None:
            return adapter
        raise UnsupportedModelError(f"model_type '{model_type}' is registered, but its modules do not match: {reason}")
    reasons = []
    for layout in STRUCTURAL:
        reason = _mismatch(model, layout)
        if reason is None:
            logger.info("model_type '%s' is not registered; its blocks match the %s layout (%s), so it is pruned "
                        "as such; export supports %s", model_type, layout.family,
                        ", ".join(d.name for d in layout.denses), supported_types())
            return dataclasses.replace(layout, matched=f"structure: {layout.family} layout")
        reasons.append(reason)
    raise UnsupportedModelError(
        f"unsupported architecture '{model_type}': comp-explorer supports the model types {supported_types()} "
        f"and, by structure, Llama-like (q/k/v/o + gate/up/down), OPT-like (q/k/v/out + fc1/fc2) and fused "
        f"(qkv_proj/gate_up_proj, query_key_value/dense_h_to_4h) decoders. Checked: " + "; ".join(reasons)
    )


def block_parameter_count(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())


def count_block_parameters(model: nn.Module) -> int:
    """Parameters in the model's decoder blocks (its adapter's ``blocks``): all of them but the embeddings, the
    final norm and the head. What a ratio over the blocks (``runtime.ratio_over_all``) is a share of."""
    return sum(block_parameter_count(b) for b in get_adapter(model).blocks(model))


def dense_weight(module: nn.Module) -> torch.Tensor:
    return module.weight

"""Write a (pruned) Llama-family model as a GGUF file that llama.cpp runs: per-layer widths, f16 or q8_0.

llama.cpp's ``llama`` architecture reads one feed-forward width and one head count for every layer; its
``deci`` architecture (written for NAS-pruned Llama models) reads ``feed_forward_length``,
``attention.head_count`` and ``attention.head_count_kv`` as per-layer arrays. A model whose blocks all have
one shape is written as ``llama``, any other as ``deci``; the tensors are the same.

What llama.cpp cannot express is mapped openly, and exactly (the file computes what the torch model computes):

* removed blocks: simply fewer blocks (``block_count``);
* pruned MLP channels: a narrower FFN in that layer (``feed_forward_length[i]``). A block whose MLP lost
  every channel keeps one zero channel, because ``deci`` skips the *whole* layer output (attention included)
  of a layer with ``feed_forward_length == 0``;
* removed attention heads (``comp_core.export.folder.compute_head_removal``): per-layer ``head_count`` /
  ``head_count_kv``;
* pruned input columns of o_proj (value dimensions inside a head) do not fit llama.cpp's one head size: they
  are restored as zero columns of ``attn_output``, and the value rows no kept column reads (in any query head
  of the group) are zeroed in ``attn_v``. Pruned input columns of q/k/v/gate/up/down are restored as zero
  columns the same way. The file then holds more weights than the torch model: ``GGUFReport`` gives both, and
  the share of the original model's parameters the file really stores. Whole heads (``--set
  o_granularity=units``) map onto head counts and cost nothing.

q/k rows are reordered from Hugging Face's rotate-half layout to the interleaved pairs llama.cpp's rope
reads (as ``convert_hf_to_gguf.py`` does). Tokenizer metadata is copied from the source GGUF when the model
came from one (the bundled SmolLM2), else built from the HF tokenizer (``gguf_tokenizer``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..models.adapters import UnsupportedModelError, get_adapter
from ..models.pruned import head_dim_of, mlp_names
from ..runtime import count_parameters
from ..models.surgery import IndexedInputLinear
from ..models.loading import BUNDLED, bundled_gguf_path
from ..models.streaming import is_streamed
from . import gguf_tokenizer
from .errors import GGUFExportError
from .folder import REPORT_FILE, load_pruned, plan_export, read_report

logger = logging.getLogger(__name__)

FILE_TYPES = ("f16", "q8_0")
Q8_BLOCK = 32  # q8_0 quantises rows in blocks of 32 values; a row of another length stays f16


# ---------------------------------------------------------------------------------------------------------
# layouts: HF module paths -> GGUF tensor names, per registered model type
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFLayout:
    """How one registered model type maps onto llama.cpp's tensors.

    ``model_tensors``: (path in the causal LM, GGUF tensor name); ``block_tensors``: (path in a block, GGUF
    name with ``{bid}``). ``rope_rows``: block paths whose rows are permuted for llama.cpp's rope.
    ``check``: returns why a config cannot be written (None when it can).
    """

    arch: str  # every block the same shape
    varying_arch: str  # per-layer widths / head counts
    model_tensors: tuple[tuple[str, str], ...]
    block_tensors: tuple[tuple[str, str], ...]
    rope_rows: tuple[str, ...]
    check: Callable[[Any], str | None] = lambda config: None


def _llama_check(config) -> str | None:
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act '{config.hidden_act}' (llama.cpp's llama/deci graph is SiLU-gated)"
    if getattr(config, "sliding_window", None):
        return "a sliding attention window (llama.cpp's llama/deci graph attends to the whole context)"
    return None


def _tensor_names() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    model = (("model.embed_tokens.weight", MODEL_TENSOR.TOKEN_EMBD), ("model.norm.weight", MODEL_TENSOR.OUTPUT_NORM),
             ("lm_head.weight", MODEL_TENSOR.OUTPUT))
    block = (("input_layernorm", MODEL_TENSOR.ATTN_NORM), ("self_attn.q_proj", MODEL_TENSOR.ATTN_Q),
             ("self_attn.k_proj", MODEL_TENSOR.ATTN_K), ("self_attn.v_proj", MODEL_TENSOR.ATTN_V),
             ("self_attn.o_proj", MODEL_TENSOR.ATTN_OUT), ("post_attention_layernorm", MODEL_TENSOR.FFN_NORM),
             ("mlp.gate_proj", MODEL_TENSOR.FFN_GATE), ("mlp.up_proj", MODEL_TENSOR.FFN_UP),
             ("mlp.down_proj", MODEL_TENSOR.FFN_DOWN))
    return (tuple((path, TENSOR_NAMES[t] + ".weight") for path, t in model),
            tuple((path, TENSOR_NAMES[t]) for path, t in block))


def _llama_layout() -> GGUFLayout:
    model, block = _tensor_names()
    return GGUFLayout(arch="llama", varying_arch="deci", model_tensors=model, block_tensors=block,
                      rope_rows=("self_attn.q_proj", "self_attn.k_proj"), check=_llama_check)


# model_type -> layout factory (gguf is imported only when a file is written)
GGUF_LAYOUTS: dict[str, Callable[[], GGUFLayout]] = {"llama": _llama_layout, "mistral": _llama_layout}


def gguf_layout(model_type: str) -> GGUFLayout:
    base = model_type.removeprefix("comp_")
    if base not in GGUF_LAYOUTS:
        raise UnsupportedModelError(f"GGUF export supports the model types {', '.join(GGUF_LAYOUTS)} (llama.cpp's "
                                    f"llama / deci layout); got '{model_type}'")
    return GGUF_LAYOUTS[base]()


# ---------------------------------------------------------------------------------------------------------
# pure tensor maps
# ---------------------------------------------------------------------------------------------------------

def restore_columns(weight: torch.Tensor, input_index: torch.Tensor, in_features: int) -> torch.Tensor:
    """(d_out, in_features) weight with ``weight``'s columns at ``input_index`` and zeros elsewhere: what a
    dense that reads only some of its inputs is in a runtime that cannot index-select."""
    full = weight.new_zeros(weight.shape[0], in_features)  # (d_out, in_features)
    full[:, input_index.to(weight.device)] = weight
    return full


def permute_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp's interleaved rope pairs, per head: row order (0, d/2, 1, d/2+1, ...).

    ``weight`` (heads · head_dim, ...) is a q or k weight (or bias)."""
    rows = weight.shape[0]
    assert rows % head_dim == 0 and head_dim % 2 == 0, (rows, head_dim)
    per_head = weight.reshape(rows // head_dim, 2, head_dim // 2, *weight.shape[1:])  # (h, 2, d/2, ...)
    return per_head.swapaxes(1, 2).reshape(weight.shape)


def read_value_rows(o_index: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """(kv_heads · head_dim,) bool: value rows some kept o_proj column reads. Value row (g, d) feeds column
    (h, d) of every query head h of group g, so it is dead only when that column is gone in all of them."""
    alive = torch.zeros(heads * head_dim, dtype=torch.bool)
    alive[o_index.cpu()] = True
    return alive.view(kv_heads, heads // kv_heads, head_dim).any(dim=1).reshape(-1)  # (kv_heads · d,)


def padded_width(width: int, multiple: int = 1) -> int:
    """The FFN width written for ``width`` kept channels: rounded up to ``multiple`` (q8_0 quantises rows in
    blocks of 32, so down_proj rows of another length would stay f16), and never 0 (see the module docstring)."""
    return max(1, -(-width // multiple) * multiple)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` (r, ...) with zero rows appended up to ``rows``: extra MLP channels that compute 0, since
    silu(0) · 0 = 0 and their down_proj columns are 0."""
    extra = rows - tensor.shape[0]
    assert extra >= 0, (tensor.shape, rows)
    return torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])]) if extra else tensor


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """(head_dim / 2,) frequency divisors of Llama 3's rope scaling (llama.cpp's ``rope_freqs`` tensor)."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < context / high, torch.ones_like(freqs), mid)
    return torch.where(wavelen > context / low, torch.full_like(freqs, factor), out).float()


# ---------------------------------------------------------------------------------------------------------
# plan: every tensor and shape of the file, before anything is written
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerShape:
    """One block as llama.cpp sees it."""

    heads: int
    kv_heads: int
    ff: int


@dataclass
class GGUFPlan:
    """What ``write_gguf`` writes: architecture, per-layer shapes, float32 tensors by GGUF name."""

    arch: str
    layers: list[LayerShape]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]  # hyper-parameters, keyed by the GGUFWriter method that writes them
    params_model: int  # parameters of the torch model
    restored_zeros: int  # weights the file holds as zeros because llama.cpp cannot index-select
    notes: list[str] = field(default_factory=list)

    @property
    def params_file(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _dense_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().float()
    if isinstance(module, IndexedInputLinear):
        return restore_columns(weight, module.input_index, module.in_features)
    return weight


def _rope(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope:
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        rope = {**scaling, **rope}
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def _rope_metadata(rope: dict, head_dim: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    kind = rope["rope_type"]
    meta: dict[str, Any] = {"add_rope_freq_base": float(rope["rope_theta"]), "add_rope_dimension_count": head_dim}
    if kind == "default":
        return meta, {}
    if kind == "linear":
        from gguf import RopeScalingType

        meta.update(add_rope_scaling_type=RopeScalingType.LINEAR, add_rope_scaling_factor=float(rope["factor"]))
        return meta, {}
    if kind == "llama3":
        return meta, {"rope_freqs.weight": llama3_rope_factors(rope, head_dim)}
    raise GGUFExportError(f"rope type '{kind}' is not supported by the GGUF export (default, linear, llama3 are)")


def plan_gguf(model: nn.Module, ff_multiple: int = 1) -> GGUFPlan:
    """Every tensor (float32, GGUF layout) and hyper-parameter of the file for ``model`` (stock or pruned).

    Heads whose o_proj columns are all gone are removed first, as ``save_pruned`` does; what remains of
    the o_proj/v_proj value dimensions is restored as zeros (see the module docstring). ``ff_multiple``:
    every FFN width is rounded up to a multiple of it with zero channels (``padded_width``).
    """
    if ff_multiple < 1:
        raise GGUFExportError(f"ff_multiple must be >= 1, got {ff_multiple}")

    if is_streamed(model):
        raise GGUFExportError("this model is streamed (its blocks stay on disk) and the GGUF writer holds every "
                              "tensor in memory; save it first (save_pruned / --out) and run export-gguf on that "
                              "folder where it fits in memory")

    config = model.config
    layout = gguf_layout(config.model_type)
    reason = layout.check(config)
    if reason:
        raise GGUFExportError(f"cannot write this model for llama.cpp: {reason}")
    plan = plan_export(model)  # dead heads removed; tensors shared with ``model``
    target = plan.model
    adapter = get_adapter(target)
    head_dim = head_dim_of(config)
    attention = adapter.attention
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    params = dict(target.named_parameters(remove_duplicate=False))
    for path, name in layout.model_tensors:
        if path == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        tensors[name] = params[path].detach().float()
    restored = 0
    layers: list[LayerShape] = []
    notes: list[str] = []
    for i, (block, record) in enumerate(zip(adapter.blocks(target), plan.records)):
        heads, kv_heads, ff = record["heads"], record["kv_heads"], record["mlp_width"]
        weights: dict[str, torch.Tensor] = {}
        biases: dict[str, torch.Tensor] = {}
        for spec in adapter.denses:
            module = adapter.dense(block, spec.name)
            weights[spec.name] = _dense_weight(module)
            restored += weights[spec.name].numel() - module.weight.numel()
            if module.bias is not None:
                biases[spec.name] = module.bias.detach().float().clone()
        o = adapter.dense(block, attention.o)
        if isinstance(o, IndexedInputLinear):
            dead = ~read_value_rows(o.input_index, heads, kv_heads, head_dim)
            weights[attention.v] = weights[attention.v].clone()
            weights[attention.v][dead] = 0.0
            if attention.v in biases:
                biases[attention.v][dead] = 0.0
        width = padded_width(ff, ff_multiple)
        if width != ff:
            producers, consumer = _mlp(adapter)
            before = sum(weights[n].numel() for n in (*producers, consumer))
            for name in producers:
                weights[name] = pad_rows(weights[name], width)
                if name in biases:
                    biases[name] = pad_rows(biases[name], width)
            weights[consumer] = pad_rows(weights[consumer].T, width).T.contiguous()
            restored += sum(weights[n].numel() for n in (*producers, consumer)) - before
            if ff == 0:
                notes.append(f"block {i}: no MLP channel left; written with {width} zero channel(s) (llama.cpp's "
                             "deci skips the whole layer output when its FFN width is 0)")
            ff = width
        for name in layout.rope_rows:
            weights[name] = permute_rope_rows(weights[name], head_dim)
            if name in biases:
                biases[name] = permute_rope_rows(biases[name], head_dim)
        for path, name in layout.block_tensors:
            base = name.format(bid=i)
            if path in weights:
                tensors[base + ".weight"] = weights[path]
                if path in biases:
                    tensors[base + ".bias"] = biases[path]
            else:
                tensors[base + ".weight"] = adapter.dense(block, path).weight.detach().float()
        layers.append(LayerShape(heads, kv_heads, ff))

    uniform = len(set(layers)) == 1
    rope_meta, rope_tensors = _rope_metadata(_rope(config), head_dim)
    tensors.update(rope_tensors)
    shapes = {"add_feed_forward_length": [s.ff for s in layers], "add_head_count": [s.heads for s in layers],
              "add_head_count_kv": [s.kv_heads for s in layers]}
    if uniform:
        shapes = {key: values[0] for key, values in shapes.items()}
    metadata = {
        "add_block_count": len(layers),
        "add_context_length": int(getattr(config, "max_position_embeddings", 2048)),
        "add_embedding_length": int(config.hidden_size),
        **shapes,
        "add_key_length": head_dim,
        "add_value_length": head_dim,
        "add_layer_norm_rms_eps": float(config.rms_norm_eps),
        "add_vocab_size": int(config.vocab_size),
        **rope_meta,
    }
    if restored:
        notes.append(f"{restored:,} weights restored as zeros (pruned input columns llama.cpp cannot skip: "
                     "o_proj value dimensions inside a head, hidden-state columns)")
    return GGUFPlan(arch=layout.arch if uniform else layout.varying_arch, layers=layers, tensors=tensors,
                    metadata=metadata, params_model=count_parameters(model), restored_zeros=restored, notes=notes)


def _mlp(adapter) -> tuple[tuple[str, ...], str]:

    return mlp_names(adapter)


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------

@dataclass
class GGUFReport:
    """What ``export_gguf`` wrote: file, architecture, sizes and the parameter share the file really holds."""

    path: str
    arch: str
    file_type: str
    file_bytes: int
    params_file: int  # weights stored in the file (token_embd once when tied)
    params_model: int  # parameters of the torch model it came from
    restored_zeros: int
    params_original: int | None  # of the unpruned model, when known (comp_report.json: params_before)
    feed_forward_length: list[int]
    head_count: list[int]
    head_count_kv: list[int]
    tensor_types: dict[str, int]  # GGML type -> number of tensors
    tokenizer: str  # where the tokenizer metadata came from
    notes: list[str]

    @property
    def share_of_original(self) -> float | None:
        """Weights in the file / parameters of the unpruned model."""
        return self.params_file / self.params_original if self.params_original else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "share_of_original": self.share_of_original}


def _quantise(name: str, tensor: torch.Tensor, file_type: str):
    """(array, GGML type) of one tensor: 1-D in f32; 2-D in f16, or q8_0 where rows split into 32-blocks."""
    from gguf import GGMLQuantizationType, quants

    data = tensor.contiguous().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), GGMLQuantizationType.F32
    if file_type == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(data.astype(np.float32), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), GGMLQuantizationType.F16


def write_gguf(plan: GGUFPlan, path: str | os.PathLike, file_type: str = "f16", *,
               tokenizer_writer: Callable[[Any], str], name: str = "comp-explorer pruned model") -> dict[str, int]:
    """Write ``plan`` to ``path`` (through a temporary file renamed into place); returns {GGML type: count}.

    ``tokenizer_writer(writer)`` adds the tokenizer.* keys and returns a one-line description."""
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    if file_type not in FILE_TYPES:
        raise GGUFExportError(f"file type must be one of {', '.join(FILE_TYPES)}, got '{file_type}'")
    path = Path(path).expanduser().absolute()
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = GGUFWriter(staging, plan.arch)
    counts: dict[str, int] = {}
    try:
        writer.add_name(name)
        writer.add_file_type(LlamaFileType.MOSTLY_F16 if file_type == "f16" else LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(GGML_QUANT_VERSION)
        for method, value in plan.metadata.items():
            getattr(writer, method)(value)
        plan_tokenizer = tokenizer_writer(writer)
        for tensor_name, tensor in plan.tensors.items():
            data, qtype = _quantise(tensor_name, tensor, file_type)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, path)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, tokenizer: %s)", path, plan.arch, plan_tokenizer)
    return counts


def export_gguf(model: nn.Module, path: str | os.PathLike, *, tokenizer=None, file_type: str = "f16",
                source_gguf: str | os.PathLike | None = None, params_original: int | None = None,
                ff_multiple: int = 1, overwrite: bool = False) -> GGUFReport:
    """Write ``model`` (a pruned or stock Llama-family causal LM) as a GGUF llama.cpp loads.

    Tokenizer metadata: copied from ``source_gguf`` when given (the file the model was loaded from), else
    built from ``tokenizer`` (``gguf_tokenizer.from_hf``). ``params_original``: the unpruned model's
    parameter count, for the share the file really holds. ``ff_multiple``: FFN widths rounded up to a
    multiple of it with zero channels (32 lets q8_0 quantise every down_proj). The model is not modified.
    """

    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if file_type not in FILE_TYPES:
        raise GGUFExportError(f"file type must be one of {', '.join(FILE_TYPES)}, got '{file_type}'")
    vocab = int(model.config.vocab_size)
    if source_gguf is not None:
        writer_fn, described = gguf_tokenizer.copy_from_gguf(source_gguf, vocab)
    elif tokenizer is not None:
        writer_fn, described = gguf_tokenizer.from_hf(tokenizer, vocab)
    else:
        raise GGUFExportError("no tokenizer: pass the model's tokenizer or the GGUF it was loaded from")
    with torch.no_grad():
        plan = plan_gguf(model, ff_multiple)
    counts = write_gguf(plan, path, file_type, tokenizer_writer=writer_fn)
    notes = list(plan.notes)
    return GGUFReport(
        path=str(path), arch=plan.arch, file_type=file_type, file_bytes=path.stat().st_size,
        params_file=plan.params_file, params_model=plan.params_model, restored_zeros=plan.restored_zeros,
        params_original=params_original, feed_forward_length=[s.ff for s in plan.layers],
        head_count=[s.heads for s in plan.layers], head_count_kv=[s.kv_heads for s in plan.layers],
        tensor_types=counts, tokenizer=described, notes=notes)


def export_gguf_folder(folder: str | os.PathLike, path: str | os.PathLike, *, file_type: str = "f16",
                       source_gguf: str | os.PathLike | None = None, ff_multiple: int = 1,
                       overwrite: bool = False) -> GGUFReport:
    """``export_gguf`` for a folder written by ``save_pruned`` (or any stock Llama folder).

    The source GGUF (for tokenizer metadata) is, in order: ``source_gguf``; the ``source`` recorded in
    comp_report.json when it is a .gguf file or the bundled model; none (the folder's HF tokenizer)."""

    folder = Path(folder).expanduser()
    report = read_report(folder) if (folder / REPORT_FILE).is_file() else {}
    if source_gguf is None:
        source_gguf = resolve_source_gguf((report.get("export") or {}).get("source"))
    model, tokenizer = load_pruned(folder, dtype=torch.float32)
    params_original = (report.get("pruning") or {}).get("params_before")
    return export_gguf(model, path, tokenizer=tokenizer, file_type=file_type, source_gguf=source_gguf,
                       params_original=params_original if params_original else count_parameters(model),
                       ff_multiple=ff_multiple, overwrite=overwrite)


def resolve_source_gguf(source: str | None) -> Path | None:
    """The GGUF file behind a recorded model source ("bundled", a .gguf path), or None when there is none."""
    if not source:
        return None

    if source == BUNDLED:
        return bundled_gguf_path()
    if str(source).endswith(".gguf") and Path(source).is_file():
        return Path(source)
    return None

"""Save a pruned model as a physically smaller folder, and load it back in one call. Safetensors only.

``save_pruned(model, tokenizer, path, report)`` writes::

    path/config.json              stock config, or comp_<type> config with one shape record per block
    path/generation_config.json
    path/model.safetensors        (or model-0000x-of-0000n.safetensors + index, above ``max_shard_size``)
    path/tokenizer*.json ...      when a tokenizer is given
    path/comp_report.json         what was exported (per-block shapes, parameter count) + the pruning report

What is physically removed (docs/export.md has the measurements behind each choice):

* removed blocks: gone from the block list and the config (``num_hidden_layers``, ``layer_types``; done by
  ``ArchAdapter.keep_blocks`` during pruning);
* pruned MLP channels: gate/up (fc1) rows and down (fc2) columns, so each block's MLP is simply narrower
  (a fused gate_up loses both halves' rows, through the registry's index map);
* pruned input columns of q/k/v/o, gate/up (fc1): the smaller weight plus the kept indices
  (``IndexedInputLinear.input_index``, int64) — the input is index-selected before a smaller matmul;
* whole attention heads: a head whose o_proj columns are all gone is removed from q (and its k/v head when
  the whole group is gone), as far as grouped-query attention stays uniform: every key/value group must keep
  the same number of query heads, so a group keeps some dead heads when another group lost fewer. A block
  always keeps at least one head (its o_proj columns are then simply not read). The rows go wherever the
  registry's layout puts them, also inside a fused q/k/v linear (Phi-3, GPT-NeoX, Falcon); families whose
  heads cannot be removed exactly (OLMo 2, Phi-3, Falcon with alibi: ``AttentionSpec.head_removal``) keep them
  all.
* added output biases: a dense that has a bias where the stock block has none (FLAP's compensation gives
  o_proj / down_proj one) is listed in its block record (``added_bias``) and rebuilt with a bias on reload.

Every model type of the registry (``comp_core.models.adapters.REGISTRY``: Llama/SmolLM, SmolLM3, Mistral,
Qwen2, Qwen3, OPT, Gemma, Gemma 2, Gemma 3 text, Phi-3/Phi-4, GPT-NeoX/Pythia, OLMo 2, Falcon) is exported;
any other raises ``UnsupportedModelError`` naming these.

A model whose blocks all have stock shapes and biases (only whole blocks removed) is saved as the stock architecture:
any transformers install loads it. Otherwise the folder's ``model_type`` is ``comp_<type>``
(``comp_core.models.pruned``): ``load_pruned(path)`` or, once ``comp_core.export.folder`` (or
``comp_core.models.pruned``) is imported, plain ``AutoModelForCausalLM.from_pretrained(path)``.

Writing is atomic (``comp_core.export.atomic``): everything goes to a hidden folder next to ``path`` that is swapped into
place at the end, so a kill at any moment leaves no ``path``, the old one intact, or the new one complete; an
existing ``path`` is refused (``FileExistsError``) unless ``overwrite``, and then replaced only once the new folder
is complete. A failed write (disk full, permission denied) removes its staging folder.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import replace_folder, staging_path, sweep
from ..models.adapters import ArchAdapter, get_adapter
from ..models.loading import _quiet
from ..models.pruned import (
    LAYERS_FIELD,
    base_model_type,
    block_record,
    comp_classes,
    head_dim_of,
    is_stock_record,
    register_all,
    stock_biased,
)
from ..runtime import count_parameters, resolve_device, resolve_dtype
from ..models.streaming import ShardWriter, is_streamed, resident
from ..models.surgery import IndexedInputLinear, prune_outputs, qkv_keep_rows

logger = logging.getLogger(__name__)

REPORT_FILE = "comp_report.json"
EXPORT_FORMAT = 1
# Files a saved folder may contain; anything else (a pickle, a .bin) is an error.
_ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# ---------------------------------------------------------------------------------------------------------
# attention heads
# ---------------------------------------------------------------------------------------------------------

def compute_head_removal(block: nn.Module, denses: dict[str, nn.Module], adapter: ArchAdapter,
                         head_dim: int) -> dict[str, nn.Module]:
    """Replacement q/k/v/o modules without the attention heads that o_proj no longer reads; {} if none can go.

    Heads are read from the module shapes (``ArchAdapter.head_counts_of``), so this also works on an already
    compacted block, and their rows from the registry's layout index map, so a fused q/k/v linear (Phi-3,
    GPT-NeoX, Falcon) loses each removed head's rows wherever they sit. Query head h belongs to kv group
    h // (heads / kv_heads). Removal keeps the grouping uniform: a group whose heads are all dead goes with
    its k/v head; from every other group the same number r of dead heads goes, r = the fewest dead heads of
    any surviving group. Families whose heads cannot be removed exactly (``AttentionSpec.head_removal``)
    keep them all: their o_proj simply does not read the dead heads' columns.
    """
    attention = adapter.attention
    o = denses[attention.o]
    if not isinstance(o, IndexedInputLinear) or adapter.head_removal_refused(block) is not None:
        return {}
    heads, kv_heads = adapter.head_counts_of(denses, head_dim)
    group = heads // kv_heads
    alive = torch.bincount(o.input_index.cpu() // head_dim, minlength=heads) > 0  # (heads,)
    alive_by_group = alive.view(kv_heads, group)  # (kv_heads, group)
    group_alive = alive_by_group.any(dim=1)  # (kv_heads,)
    assert bool(group_alive.any()), "o_proj reads no column at all"
    dead_counts = (~alive_by_group).sum(dim=1)  # (kv_heads,)
    drop_per_group = int(dead_counts[group_alive].min())
    keep_head = torch.zeros(heads, dtype=torch.bool)
    for g in range(kv_heads):
        if not group_alive[g]:
            continue
        members = torch.arange(g * group, (g + 1) * group)
        dead = members[~alive_by_group[g]]
        dropped = set(dead[:drop_per_group].tolist())
        for h in members.tolist():
            keep_head[h] = h not in dropped
    if bool(keep_head.all()):
        return {}
    kept_heads = torch.nonzero(keep_head).flatten()  # (heads',) ascending
    kept_groups = torch.nonzero(group_alive).flatten()  # (kv_heads',)
    kept_kv = kept_groups if kv_heads < heads else kept_heads
    device = o.weight.device
    new = {name: prune_outputs(denses[name], rows.to(device)) for name, rows in
           qkv_keep_rows(adapter, block, heads, kv_heads, head_dim, kept_heads, kept_kv).items()}
    # o_proj: same weight, its input index re-expressed in the smaller attention output
    new_position = torch.full((heads,), -1, dtype=torch.long)
    new_position[kept_heads] = torch.arange(kept_heads.numel())
    index = o.input_index.cpu()
    head_of = index // head_dim
    assert bool(keep_head[head_of].all()), "a removed head was still read by o_proj"
    new_index = new_position[head_of] * head_dim + index % head_dim  # ascending, like the old index
    width = kept_heads.numel() * head_dim
    bias = o.bias.data.clone() if o.bias is not None else None
    if new_index.numel() == width:
        plain = nn.Linear(width, o.out_features, bias=bias is not None, device=device, dtype=o.weight.dtype)
        plain.weight.data.copy_(o.weight.data)
        if bias is not None:
            plain.bias.data.copy_(bias)
        new[attention.o] = plain
    else:
        new[attention.o] = IndexedInputLinear(o.weight.data.clone(), bias, new_index.to(device), width)
    return new


# ---------------------------------------------------------------------------------------------------------
# in-memory model -> model of the export class (weights shared, built on the meta device)
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ExportPlan:
    """What ``save_pruned`` writes: the model to save and a summary for comp_report.json."""

    model: nn.Module | None  # of the export class, sharing the source model's tensors (None: streamed save)
    base_model_type: str
    model_type: str  # "llama" (stock) or "comp_llama"
    records: list[dict]
    removed_heads: int
    params: int

    def summary(self) -> dict:
        return {
            "format": EXPORT_FORMAT,
            "model_type": self.model_type,
            "base_model_type": self.base_model_type,
            "stock_architecture": self.model_type == self.base_model_type,
            "loader": ("transformers.AutoModelForCausalLM" if self.model_type == self.base_model_type
                       else "comp_core.load_pruned (or AutoModelForCausalLM after `import comp_core.export`)"),
            "params": self.params,
            "num_hidden_layers": len(self.records),
            "removed_heads": self.removed_heads,
            "layers": self.records,
        }


def _blocks_prefix(model: nn.Module, adapter: ArchAdapter) -> str:
    blocks = adapter.blocks(model)
    return next(name for name, module in model.named_modules() if module is blocks)


def export_block(block: nn.Module, position: int, prefix: str, adapter: ArchAdapter, head_dim: int,
                 stock_bias: frozenset[str]) -> tuple[dict, dict[str, torch.Tensor], int]:
    """One block as it will be saved: its shape record, its tensors under their saved names (the dead heads
    gone, ``compute_head_removal``) and how many heads went. ``position``: its place in the saved model."""
    denses = {spec.name: adapter.dense(block, spec.name) for spec in adapter.denses}
    state = {f"{prefix}.{position}.{key}": value for key, value in block.state_dict().items()}
    replaced = compute_head_removal(block, denses, adapter, head_dim)
    removed_heads = 0
    if replaced:
        o_name = adapter.attention.o
        removed_heads = (denses[o_name].in_features - replaced[o_name].in_features) // head_dim
        for name, module in replaced.items():
            for key in [k for k in state if k.startswith(f"{prefix}.{position}.{name}.")]:
                del state[key]
            state.update({f"{prefix}.{position}.{name}.{key}": value for key, value in module.state_dict().items()})
        denses.update(replaced)
    return block_record(denses, adapter, head_dim, stock_bias), state, removed_heads


def _export_target(model: nn.Module, records: list[dict]) -> tuple[nn.Module, str]:
    """The export class (stock or ``comp_<type>``) built on the meta device from the new config alone."""
    base_type = base_model_type(model.config.model_type)
    adapter = get_adapter(model)
    stock = all(is_stock_record(r, model.config, base_type) for r in records)
    config_dict = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures", LAYERS_FIELD, "auto_map"):
        config_dict.pop(key, None)
    if stock:
        import transformers

        config_cls = getattr(transformers, adapter.config_class)
        model_cls = getattr(transformers, adapter.model_class)
    else:
        config_cls, model_cls = comp_classes(base_type)
        config_dict[LAYERS_FIELD] = records
    config = config_cls.from_dict(config_dict)
    config.dtype = next(model.parameters()).dtype
    if config.num_hidden_layers != len(records):
        raise ValueError(f"config.num_hidden_layers={config.num_hidden_layers} but the model has {len(records)} "
                         "blocks; remove blocks with ArchAdapter.keep_blocks so the config is updated too")
    with torch.device("meta"):
        target = model_cls(config)
    if getattr(model, "generation_config", None) is not None:
        target.generation_config = copy.deepcopy(model.generation_config)
    return target, base_type


def _outside_blocks(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith(f"{prefix}.")}


def plan_export(model: nn.Module) -> ExportPlan:
    """Rebuild ``model`` as the class it will be saved as (stock or ``comp_<type>``), sharing its tensors.

    The target is built on the meta device from the new config alone, then receives the tensors with
    ``load_state_dict(strict=True, assign=True)``: every key and shape must match, so a config that would
    not reload into the same shapes fails here, before anything is written. A streamed model's blocks are
    not read (their tensors stay on the meta device): only the shapes are checked.
    """
    adapter = get_adapter(model)  # the registry entry, checked against the model's modules
    head_dim = head_dim_of(model.config)
    prefix = _blocks_prefix(model, adapter)
    state = _outside_blocks(model, prefix)
    stock_bias = stock_biased(model.config, base_model_type(model.config.model_type))
    records = []
    removed_heads = 0
    for i, block in enumerate(adapter.blocks(model)):
        record, block_state, heads = export_block(block, i, prefix, adapter, head_dim, stock_bias)
        records.append(record)
        state.update(block_state)
        removed_heads += heads
    target, base_type = _export_target(model, records)
    tied = getattr(target.config, "tie_word_embeddings", False)
    if tied:
        _check_tied(model)
    target.load_state_dict(state, strict=True, assign=True)
    if tied:
        target.tie_weights()
    meta = [name for name, p in target.named_parameters() if p.is_meta]
    assert not meta or is_streamed(model), f"parameters left on the meta device: {meta[:5]}"
    return ExportPlan(model=target, base_model_type=base_type, model_type=target.config.model_type,
                      records=records, removed_heads=removed_heads, params=count_parameters(target))


def _write_streamed(model: nn.Module, folder: Path) -> ExportPlan:
    """Save a streamed model block by block: each block is read (from the spill folder when pruned), written
    as its own shard and dropped, so the model is never whole in memory. The keys and shapes written are
    checked against the export class built from the new config, as ``plan_export`` does."""
    adapter = get_adapter(model)
    head_dim = head_dim_of(model.config)
    prefix = _blocks_prefix(model, adapter)
    stock_bias = stock_biased(model.config, base_model_type(model.config.model_type))
    blocks = adapter.blocks(model)
    n_files = len(blocks) + 1
    shards = ShardWriter(folder, n_files)
    records, removed_heads = [], 0

    for position, block in enumerate(blocks):
        with resident(block):
            record, state, heads = export_block(block, position, prefix, adapter, head_dim, stock_bias)
            shards.write(state, position + 1)
            del state
        records.append(record)
        removed_heads += heads
    target, base_type = _export_target(model, records)
    outside, seen = {}, {}
    for key, value in _outside_blocks(model, prefix).items():  # tied embeddings are saved once
        ident = (value.data_ptr(), tuple(value.shape))
        if ident in seen and getattr(target.config, "tie_word_embeddings", False):
            continue
        seen[ident] = key
        outside[key] = value
    shards.write(outside, n_files)
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    shapes = shards.shapes
    tied_out = [k for k in expected if k not in shapes]
    wrong = {k: (shapes.get(k), expected.get(k)) for k in set(shapes) | set(expected)
             if k not in tied_out and shapes.get(k) != expected.get(k)}
    if wrong or any(not k.endswith("lm_head.weight") for k in tied_out):
        raise ValueError(f"the streamed export does not match its config: {dict(list(wrong.items())[:5])} "
                         f"{tied_out[:5]}")
    target.config.architectures = [type(target).__name__]
    target.config.save_pretrained(folder)
    if getattr(target, "generation_config", None) is not None:
        target.generation_config.save_pretrained(folder)
    shards.write_index()
    params = sum(math.prod(shape) for key, shape in shapes.items() if key not in _buffer_names(target))
    return ExportPlan(model=None, base_model_type=base_type, model_type=target.config.model_type, records=records,
                      removed_heads=removed_heads, params=params)


def _buffer_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_buffers()}


def _check_tied(model: nn.Module) -> None:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and inp.weight.data_ptr() != out.weight.data_ptr() and not torch.equal(inp.weight, out.weight):
        raise ValueError("config.tie_word_embeddings is True but the input and output embeddings differ; "
                         "re-tie them (model.tie_weights()) or set tie_word_embeddings=False")


# ---------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------

def _json_default(value: Any):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def folder_bytes(path: str | Path, suffix: str = "") -> int:
    """Total size of the files in a folder (recursively), optionally only those ending in ``suffix``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(suffix))


def _check_replaceable(path: Path) -> None:
    """With ``overwrite``: only an empty folder or a saved-model folder may be replaced."""
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder; refusing to replace it")
    if any(path.iterdir()) and not (path / "config.json").is_file():
        raise FileExistsError(f"{path} is not empty and holds no config.json (not a saved model); "
                              "refusing to replace it even with overwrite=True")


def save_pruned(model: nn.Module, tokenizer, path: str | os.PathLike, report: dict | None = None, *,
                overwrite: bool = False, max_shard_size: int | str = "2GB", source: str | None = None,
                heal: dict | None = None) -> Path:
    """Save a (pruned) causal LM physically smaller, with tokenizer and report; returns the folder.

    ``report``: a dict (or anything with ``to_dict()``, such as ``PruneResult``) stored under ``"pruning"`` in
    comp_report.json. ``source``: where the unpruned model came from (``LoadedModel.source``: "bundled", a
    .gguf path, a folder, a hub id), recorded as ``export.source`` so a GGUF export can copy the source
    file's tokenizer. ``heal``: a healed model's ``HealRecord.to_dict()``, stored under ``"heal"``. Raises
    ``FileExistsError`` before writing anything when ``path`` exists and not
    ``overwrite``. The model is not modified.
    """
    path = Path(path).expanduser().absolute()
    if path.parent.is_dir():
        sweep(path)  # what a killed earlier save left: its staging folder, or the old folder it had moved aside
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        _check_replaceable(path)
    if report is not None and not isinstance(report, dict):
        report = report.to_dict()
    streamed = is_streamed(model)
    plan = plan_export(model)  # a config that would not reload fails here, before anything is written
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(path)
    staging.mkdir()
    try:
        if streamed:  # block by block, one shard each: the model is never whole in memory
            plan = _write_streamed(model, staging)
        else:
            with _quiet():
                plan.model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        summary = plan.summary()
        summary["weight_bytes"] = folder_bytes(staging, ".safetensors")
        if source is not None:
            summary["source"] = str(source)
        with open(staging / REPORT_FILE, "w") as f:
            json.dump({"export": summary, "pruning": report, **({"heal": heal} if heal is not None else {})}, f,
                      indent=1, default=_json_default)
        _check_no_pickle(staging)
        _normalise_permissions(staging)
        replace_folder(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %s (%s, %d params, %d weight bytes)", path, plan.model_type, plan.params,
                summary["weight_bytes"])
    return path


def _check_no_pickle(folder: Path) -> None:
    bad = [f.name for f in folder.rglob("*") if f.is_file() and f.suffix in _PICKLE_SUFFIXES]
    if bad:
        raise RuntimeError(f"refusing to save pickled files {bad}: the export must be safetensors only")


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _normalise_permissions(folder: Path) -> None:
    """Shards come out of transformers' temp-file writer as 0600; give every file the usual umask mode."""
    mode = 0o666 & ~_umask()
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(mode)


def load_pruned(path: str | os.PathLike, *, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None):
    """Load a folder written by :func:`save_pruned` (stock or ``comp_<type>``): returns ``(model, tokenizer)``.

    ``dtype`` None keeps the saved dtype. Every weight and index buffer must come from the checkpoint: a
    missing, unexpected or mismatched key raises ``ValueError`` instead of leaving random weights.
    ``tokenizer`` is None when the folder has none.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register_all()
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; is it a folder written by save_pruned?")
    pickled = [f.name for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES]
    if pickled:
        raise ValueError(f"{path} contains pickled files {pickled}; comp-explorer loads safetensors only")
    with _quiet():
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype) if dtype is not None else "auto", use_safetensors=True,
            output_loading_info=True)
    problems = {key: sorted(map(str, info.get(key) or [])) for key in
                ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        raise ValueError(f"{path} does not match its config: {problems}")
    model = model.to(resolve_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return model, tokenizer


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def read_report(path: str | os.PathLike) -> dict:
    """The contents of ``path/comp_report.json`` ({"export": ..., "pruning": ...})."""
    with open(Path(path) / REPORT_FILE) as f:
        return json.load(f)

"""Random-weight Llama models of any size, written shard by shard (never whole in memory).

What the streaming benchmark and tests prune: a 1.5 B-parameter model is 6 GB in float32, more than a test
machine should hold twice, so each block's tensors are drawn, written as their own safetensors shard and
dropped. The folder is an ordinary Hugging Face one (config.json, shards, index, optionally a tokenizer), so
every loader reads it, streaming or not.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .streaming import ShardWriter


@dataclass(frozen=True)
class RandomLlama:
    """The shape of a random Llama; ``params`` counts what ``write_random_llama`` writes."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 49152
    tie_embeddings: bool = True
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_shapes(self) -> dict[str, tuple[int, ...]]:
        kv = self.kv_heads * self.head_dim
        return {"self_attn.q_proj.weight": (self.hidden, self.hidden), "self_attn.k_proj.weight": (kv, self.hidden),
                "self_attn.v_proj.weight": (kv, self.hidden), "self_attn.o_proj.weight": (self.hidden, self.hidden),
                "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                "mlp.up_proj.weight": (self.intermediate, self.hidden),
                "mlp.down_proj.weight": (self.hidden, self.intermediate),
                "input_layernorm.weight": (self.hidden,), "post_attention_layernorm.weight": (self.hidden,)}

    @property
    def params(self) -> int:
        block = sum(math.prod(s) for s in self.block_shapes().values())
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * block + embeddings + self.hidden

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=self.max_positions,
                           tie_word_embeddings=self.tie_embeddings, rms_norm_eps=1e-5)


def write_random_llama(folder: str | os.PathLike, shape: RandomLlama, *, dtype: torch.dtype = torch.float32,
                       seed: int = 0, tokenizer_from: str | os.PathLike | None = None, std: float = 0.02) -> Path:
    """Write a random Llama of ``shape`` to ``folder`` (created; must not exist): N(0, std²) linears, unit
    norms, one shard per block plus one for the embeddings. ``tokenizer_from``: a folder whose tokenizer
    files are copied (its vocabulary must not exceed ``shape.vocab``)."""

    folder = Path(folder)
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    n_files = shape.layers + 1
    shards = ShardWriter(folder, n_files)
    for i in range(shape.layers):
        tensors = {}
        for name, dims in shape.block_shapes().items():
            if name.endswith("layernorm.weight"):
                tensors[f"model.layers.{i}.{name}"] = torch.ones(dims, dtype=dtype)
            else:
                tensors[f"model.layers.{i}.{name}"] = (torch.randn(dims, generator=generator) * std).to(dtype)
        shards.write(tensors, i + 1)
        del tensors
    outside = {"model.embed_tokens.weight": (torch.randn(shape.vocab, shape.hidden, generator=generator) * std).to(dtype),
               "model.norm.weight": torch.ones(shape.hidden, dtype=dtype)}
    if not shape.tie_embeddings:
        outside["lm_head.weight"] = (torch.randn(shape.vocab, shape.hidden, generator=generator) * std).to(dtype)
    shards.write(outside, n_files)
    config = shape.config()
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    shards.write_index()
    if tokenizer_from is not None:
        for item in Path(tokenizer_from).iterdir():
            if item.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges", "chat_template")):
                shutil.copy2(item, folder / item.name)
    return folder

"""The block loop's plumbing, written once: capture block inputs, replay blocks, collect Grams with hooks.

Capture runs the model once on the calibration batch with pre-forward hooks on every block: block 0's
hook keeps the hidden states, and every block's hook keeps the keyword arguments the model passes it
(attention mask, rotary position embeddings, …), which can differ per block (sliding-window layers), and
then the forward is stopped at the last block. Afterwards each block can be replayed alone on any hidden
states, so only one block's activations are ever alive.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .models.adapters import ArchAdapter


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass early (never escapes ``capture_block_inputs``)."""


@contextlib.contextmanager
def calibration_context(model: nn.Module) -> Iterator[None]:
    """no_grad, eval mode and KV cache off for the duration; restored afterwards."""
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache


@dataclass
class BlockInputs:
    """Calibration hidden states entering block 0, in batches, and the kwargs each block receives.

    ``kwargs[b][i]`` is what original block i got for batch b; it is keyed by the block *object* too
    (``kwargs_for``), so it stays valid after blocks are removed from the list.
    """

    hidden: list[torch.Tensor]  # per batch: (batch, seq, d_model)
    kwargs: list[dict[int, dict]] = field(default_factory=list)
    block_ids: dict[int, int] = field(default_factory=dict)  # id(block) -> original index

    def kwargs_for(self, block: nn.Module, batch: int) -> dict:
        return self.kwargs[batch][self.block_ids[id(block)]]


def capture_block_inputs(model: nn.Module, adapter: ArchAdapter, samples: torch.Tensor, *, batch_size: int = 8,
                         offload: torch.device | str | None = None) -> BlockInputs:
    """Inputs of block 0 and per-block kwargs for calibration ``samples`` (n, seq_len) token ids."""
    blocks = adapter.blocks(model)
    device = next(model.parameters()).device
    captured = BlockInputs(hidden=[], block_ids={id(b): i for i, b in enumerate(blocks)})
    last = len(blocks) - 1

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            rest["use_cache"] = False
            rest.pop("past_key_values", None)
            rest.pop("past_key_value", None)
            captured.kwargs[-1][index] = _to(rest, offload)
            if index == 0:
                captured.hidden.append(hidden.detach().to(offload) if offload is not None else hidden.detach())
            if index == last:
                raise _StopForward
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with calibration_context(model):
            for start in range(0, samples.shape[0], batch_size):
                captured.kwargs.append({})
                batch = samples[start:start + batch_size].to(device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return captured


def _to(obj, device):
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One block forward on captured kwargs; returns hidden states whatever the block's return type."""
    device = next(block.parameters()).device
    out = block(hidden.to(device), **_to(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


def replay(block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """Run ``block`` on every calibration batch; outputs stay on the inputs' device."""
    return [run_block(block, h, kw).to(h.device) for h, kw in zip(inputs, kwargs)]

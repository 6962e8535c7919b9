"""Healing a pruned model by distillation from the original: ``heal`` trains a copy of the student on the
teacher's stored targets (``teacher.TeacherTargets``) within a budget of steps or minutes, and returns it with a
``HealRecord``.

What trains (``HealSettings.mode``): LoRA adapters on every dense of the blocks, merged at the end
(``heal.lora``); every weight of the blocks and the final norm; or only norms and biases. The embeddings and
the output head never train (tied on most small models, and the largest matrices). A weight that is zero in a
dense with at least ``MASKED_SHARE`` zeros (a mask method's dense) stays zero: its gradient is masked, and a
LoRA update on it is masked too. No width changes, so saving, reloading and the GGUF export see a pruned model
like any other.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..events import ProgressCallback, emit
from ..loop.capture import fast_bfloat16
from ..math.distill import sparse_kl
from ..models.adapters import get_adapter
from ..models.streaming import is_streamed
from ..models.surgery import IndexedInputLinear
from ..runtime import peak_rss_mb, reset_peak_memory
from .lora import add_adapters, merge_adapters
from .settings import HealSettings
from .teacher import TeacherTargets

MASKED_SHARE = 0.01  # a dense with at least this share of exact zeros is a mask method's: its zeros stay


@dataclass
class HealRecord:
    """What a heal did: the mode, the budget used (steps, tokens, seconds), the loss per step and the learning
    rate, what was trained, the text, and the memory it took."""

    mode: str
    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    trained_params: int = 0
    masked_denses: int = 0
    text: str = ""
    text_tokens: int = 0
    top_k: int = 0
    temperature: float = 1.0
    targets_mb: float = 0.0
    peak_rss_mb: float | None = None
    bf16: bool = False
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def _denses(model: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Module]]:
    """Every dense of the blocks: "block.path" -> (parent module, attribute, dense)."""
    out = {}
    for i, block in enumerate(get_adapter(model).blocks(model)):
        for path, module in block.named_modules():
            for attribute, child in module.named_children():
                if isinstance(child, (nn.Linear, IndexedInputLinear)):
                    out[f"{i}.{path + '.' if path else ''}{attribute}"] = (module, attribute, child)
    return out


def zero_masks(denses: dict[str, tuple[nn.Module, str, nn.Module]]) -> dict[str, torch.Tensor]:
    """The nonzero pattern (bool, like the weight) of every dense with at least ``MASKED_SHARE`` exact zeros."""
    masks = {}
    for name, (_, _, dense) in denses.items():
        nonzero = dense.weight.detach() != 0
        if 1 - nonzero.float().mean().item() >= MASKED_SHARE:
            masks[name] = nonzero
    return masks


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """The parameters ``mode`` trains (LoRA's are added separately); never the embeddings or the head."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
                  for p in m.parameters()}
    if mode == "full":
        return [p for p in model.parameters() if id(p) not in embeddings]
    if mode == "norms":
        picked = {id(p): p for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
        picked.update({id(p): p for name, p in model.named_parameters() if name.endswith(".bias")})
        return [p for key, p in picked.items() if key not in embeddings]
    return []


def cosine_rate(progress: float, peak: float, warmup: float) -> float:
    """Learning rate at ``progress`` ∈ [0, 1] of the budget: linear warm-up to ``peak`` over ``warmup``, then a
    cosine to zero."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * progress / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))


def heal(student: nn.Module, targets: TeacherTargets, settings: HealSettings, *, text: str = "",
         on_event: ProgressCallback | None = None, inplace: bool = False) -> tuple[nn.Module, HealRecord]:
    """Train ``student`` (a copy unless ``inplace``: a cancelled heal — ``events.Cancelled`` raised from
    ``on_event`` — then leaves the caller's model as it was) towards the teacher's ``targets``; see the module
    docstring. ``text`` says which text the targets were computed on, for the record."""
    if is_streamed(student):
        raise ValueError("healing trains weights of every block at once, which a streamed model never holds; load "
                         "the model without streaming (--stream off)")
    if targets.tokens.shape[1] < 2:
        raise ValueError("the healing text's sequences need at least 2 tokens")
    model = student if inplace else copy.deepcopy(student)
    record = HealRecord(mode=settings.mode, steps=0, tokens=0, seconds=0.0, text=text, text_tokens=targets.n_tokens,
                        top_k=int(targets.index.shape[-1]), temperature=targets.temperature,
                        targets_mb=targets.megabytes, settings=asdict(settings))
    device = next(model.parameters()).device
    record.bf16 = fast_bfloat16(device)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    denses = _denses(model)
    masks = zero_masks(denses)
    record.masked_denses = len(masks)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    if settings.mode == "lora":
        wrapped = add_adapters(denses, settings.lora_rank, settings.lora_alpha, masks, settings.seed)
        params = [p for w in wrapped.values() for p in (w.lora_a, w.lora_b)]
    else:
        params = _trainable(model, settings.mode)
    for p in params:
        p.requires_grad_(True)
    record.trained_params = sum(p.numel() for p in params)
    hooks = []
    if settings.mode != "lora":  # a mask method's zeros get no gradient, so AdamW never moves them
        by_weight = {id(denses[name][2].weight): mask for name, mask in masks.items()}
        for p in params:
            mask = by_weight.get(id(p))
            if mask is not None:
                hooks.append(p.register_hook(lambda grad, m=mask.to(p.dtype): grad * m))
    reset_peak_memory()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay) if params else None
    order = list(range(targets.tokens.shape[0]))
    random.Random(settings.seed).shuffle(order)
    budget_s = settings.minutes * 60 if settings.minutes is not None else None
    start = time.perf_counter()
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if record.bf16
                else contextlib.nullcontext())
    position = 0
    try:
        model.eval()  # no dropout: the teacher's targets are deterministic, so is the student
        while optimizer is not None:
            elapsed = time.perf_counter() - start
            progress = max(record.steps / settings.steps if settings.steps else 0.0,
                           elapsed / budget_s if budget_s else 0.0)
            if (settings.steps is not None and record.steps >= settings.steps) or (
                    budget_s is not None and elapsed >= budget_s):
                break
            rate = cosine_rate(progress, settings.lr, settings.warmup)
            for group in optimizer.param_groups:
                group["lr"] = rate
            rows = [order[(position + j) % len(order)] for j in range(settings.batch_size)]
            position += settings.batch_size
            index = torch.tensor(rows)
            ids = targets.tokens[index].to(device)
            with autocast:
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = sparse_kl(logits, targets.logp[index].to(device), targets.index[index].to(device),
                             targets.temperature)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record.steps += 1
            record.tokens += int(ids.numel())
            record.losses.append(float(loss.detach()))
            record.learning_rates.append(rate)
            elapsed = time.perf_counter() - start
            total = settings.steps if settings.steps is not None and budget_s is None else 0
            left = _seconds_left(record.steps, elapsed, settings.steps, budget_s)
            emit(on_event, "heal", record.steps, total or max(record.steps, 1),
                 f"step {record.steps}: loss {record.losses[-1]:.4f}, {record.tokens / elapsed:.0f} tokens/s"
                 + (f", about {left:.0f} s left" if left is not None else ""), loss=record.losses[-1],
                 seconds_left=left)
    finally:
        for hook in hooks:
            hook.remove()
    if wrapped:
        merge_adapters(denses, wrapped)
    with torch.no_grad():  # exact zeros, whatever rounding the optimiser's arithmetic did
        for name, mask in masks.items():
            dense = denses[name][2]
            dense.weight.mul_(mask.to(dense.weight.dtype))
    for p in model.parameters():
        p.requires_grad_(flags.get(id(p), True))
    record.seconds = time.perf_counter() - start
    record.peak_rss_mb = peak_rss_mb()
    return model, record


def _seconds_left(steps: int, elapsed: float, step_budget: int | None, seconds_budget: float | None) -> float | None:
    candidates = []
    if step_budget:
        candidates.append(elapsed / steps * (step_budget - steps))
    if seconds_budget:
        candidates.append(seconds_budget - elapsed)
    return max(0.0, min(candidates)) if candidates else None

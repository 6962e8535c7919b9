"""Fisher importance of every dense's input neurons from next-token-loss gradients (FPT style).

Put a mask m on each dense's input, y = W (m ⊙ x). At m = 1 the gradient of the loss is
∂L/∂m_j = Σ_t x_t,j · (Wᵀ ∂L/∂y_t)_j, so one backward pass gives it from the dense's input and its output
gradient, without materialising any mask. The empirical Fisher diagonal is the mean over calibration
samples of (∂L/∂m_j)², the expected loss increase of removing j to second order.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..events import ProgressCallback, emit
from ..models.adapters import ArchAdapter


def collect_fisher(model: nn.Module, adapter: ArchAdapter, samples: torch.Tensor, layers: list[int],
                   on_event: ProgressCallback | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """{(position in the current block list, dense name): Fisher score (k,) float64}; one sample per pass.

    ``k`` is the number of inputs the dense still reads (its weight's columns), the coordinates every other
    score and the mask solve use; for an already pruned ``IndexedInputLinear`` that is fewer than ``in_features``."""
    blocks = adapter.blocks(model)
    scores: dict[tuple[int, str], torch.Tensor] = {}
    per_sample: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def make_hook(key, module):
        def forward_hook(_module, args, output):
            x = args[0].detach()

            def grad_hook(grad_out):
                g = grad_out.reshape(-1, grad_out.shape[-1]).double() @ module.weight.detach().double()  # (N, k)
                xk = x.reshape(-1, x.shape[-1]).double()  # (N, in_features)
                if hasattr(module, "input_index"):  # an already pruned dense reads only its kept inputs
                    xk = xk[:, module.input_index]  # (N, k)
                per_sample[key] = per_sample.get(key, 0) + (xk * g).sum(dim=0)  # (k,)
            output.register_hook(grad_hook)
        return forward_hook

    for pos in layers:
        for spec in adapter.denses:
            module = adapter.dense(blocks[pos], spec.name)
            handles.append(module.register_forward_hook(make_hook((pos, spec.name), module)))
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)  # only activation gradients are needed
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(samples.shape[0]):
            emit(on_event, "fisher", s, samples.shape[0], "gradients for the Fisher score")
            per_sample.clear()
            ids = samples[s:s + 1].to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                loss.backward()
            for key, g in per_sample.items():
                scores[key] = scores.get(key, 0) + g.pow(2) / samples.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    emit(on_event, "fisher", samples.shape[0], samples.shape[0], "done")
    return scores

"""comp_core.evaluate.loss: perplexity protocol checked against a hand computation on a tiny random Llama."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from tests.helpers import small_llama
from comp_core.evaluate.loss import PerplexityResult, calibration_loss, perplexity

VOCAB = 512


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return small_llama()


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1, 300), generator=generator)  # (1, T)


def _hand_ppl(model, tokens: torch.Tensor, seq_len: int, n_windows: int) -> tuple[float, float]:
    """exp(mean CE) over the first n_windows non-overlapping windows, one window at a time."""
    losses = []
    with torch.no_grad():
        for w in range(n_windows):
            window = tokens[:, w * seq_len : (w + 1) * seq_len]  # (1, L)
            logits = model(window).logits.float()  # (1, L, V)
            losses.append(F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="none"))
    nll = torch.cat(losses).double().mean().item()
    return math.exp(nll), nll


def test_matches_hand_computation(model, stream):
    result = perplexity(model, stream, seq_len=64)
    expected_ppl, expected_nll = _hand_ppl(model, stream, 64, 300 // 64)
    assert isinstance(result, PerplexityResult)
    assert result.n_windows == 4  # 300 // 64; the partial last window is dropped
    assert result.n_tokens == 4 * 63
    assert result.seq_len == 64 and result.seconds >= 0
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert result.ppl == pytest.approx(expected_ppl, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)
    # a random model is close to uniform over the vocabulary
    assert 0.5 * VOCAB < result.ppl < 2 * VOCAB


def test_batching_and_1d_input_do_not_change_the_result(model, stream):
    reference = perplexity(model, stream, seq_len=64)
    batched = perplexity(model, stream, seq_len=64, batch_size=3)  # batches of 3 and 1
    flat = perplexity(model, stream[0], seq_len=64, device="cpu")
    assert batched.nll == pytest.approx(reference.nll, rel=1e-5)
    assert flat.nll == pytest.approx(reference.nll, rel=1e-6)
    assert batched.n_windows == flat.n_windows == reference.n_windows


def test_max_windows_and_progress(model, stream):
    calls = []
    result = perplexity(model, stream, seq_len=32, max_windows=3, batch_size=2,
                        on_progress=lambda done, total: calls.append((done, total)))
    assert result.n_windows == 3 and result.n_tokens == 3 * 31
    assert calls == [(2, 3), (3, 3)]
    assert result.ppl == pytest.approx(_hand_ppl(model, stream, 32, 3)[0], rel=1e-5)
    # max_windows above what the stream holds is capped
    assert perplexity(model, stream, seq_len=100, max_windows=50).n_windows == 3


def test_too_short_stream_and_bad_arguments(model):
    short = torch.randint(0, VOCAB, (1, 63))
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, short, seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, short, seq_len=1)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, short, seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, short, seq_len=8, max_windows=0)
    with pytest.raises(ValueError, match="one stream"):
        perplexity(model, torch.randint(0, VOCAB, (2, 64)), seq_len=8)
    with pytest.raises(ValueError, match="embeddings"):
        perplexity(model, torch.full((1, 64), VOCAB), seq_len=8)


def test_uniform_logits_give_vocab_size():
    uniform = small_llama(seed=3)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()
        uniform.model.norm.weight.zero_()
    tokens = torch.randint(0, VOCAB, (1, 130))
    result = perplexity(uniform, tokens, seq_len=64)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-5)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_train_mode_is_restored_and_result_is_frozen(stream):
    model = small_llama()
    model.train()
    result = perplexity(model, stream, seq_len=64, max_windows=1)
    assert model.training
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ppl = 1.0  # type: ignore[misc]


def test_calibration_loss(model):
    generator = torch.Generator().manual_seed(2)
    samples = torch.randint(0, VOCAB, (5, 16), generator=generator)  # (n, L)
    loss = calibration_loss(model, samples, batch_size=2)
    with torch.no_grad():
        logits = model(samples).logits.float()  # (n, L, V)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), samples[:, 1:].reshape(-1)).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    # same numbers as perplexity on the samples laid end to end with seq_len = L
    assert loss == pytest.approx(perplexity(model, samples.reshape(1, -1), seq_len=16).nll, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        calibration_loss(model, samples[:, :1])

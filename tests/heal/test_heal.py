"""Healing (comp_core.heal): zero steps change nothing, a mask method's zeros stay, a merged LoRA is the
unmerged one, the loss falls, Cancel leaves the pruned model untouched, a healed folder reloads exactly."""
from __future__ import annotations

import json

import pytest
import torch

from comp_core.events import Cancelled
from comp_core.export.folder import load_pruned, save_pruned
from comp_core.heal import HealSettings, heal, teacher_targets
from comp_core.heal.lora import LoraDense
from comp_core.heal.run import _denses, cosine_rate, zero_masks
from comp_core.math.distill import sparse_kl
from comp_core.methods import prune_with
from comp_core.models.surgery import IndexedInputLinear

from tests.helpers import make_calib, make_tiny_model

MODES = ("lora", "full", "norms")


@pytest.fixture(scope="module")
def models():
    teacher = make_tiny_model("llama")
    pruned, _ = prune_with("comp", teacher, make_calib(), ratio=0.3)
    masked, _ = prune_with("wanda", teacher, make_calib(), sparsity="0.5")
    targets = teacher_targets(teacher, make_calib(seed=5), k=32)
    return teacher, pruned, masked, targets


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=make_calib(seed=9)[:2] if ids is None else ids).logits


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _kl_to_teacher(model, targets) -> float:
    with torch.no_grad():
        logits = model(input_ids=targets.tokens).logits[:, :-1]
    return float(sparse_kl(logits, targets.logp, targets.index, targets.temperature))


@pytest.mark.parametrize("mode", MODES)
def test_zero_steps_change_nothing_and_the_callers_model_is_never_touched(models, mode):
    _, pruned, _, targets = models
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    healed, record = heal(pruned, targets, HealSettings(mode=mode, steps=0))
    assert record.steps == 0 and record.losses == []
    assert _same_state(healed, pruned) and healed is not pruned
    trained, _ = heal(pruned, targets, HealSettings(mode=mode, steps=3))
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())  # the copy trained, not this
    assert not _same_state(trained, pruned)


@pytest.mark.parametrize("mode", MODES)
def test_a_mask_methods_zeros_stay_zero(models, mode):
    _, _, masked, targets = models
    masks = zero_masks(_denses(masked))
    assert len(masks) == len(_denses(masked)) == 6 * 7  # wanda masks every dense of every block
    assert zero_masks(_denses(models[1])) == {}  # a structured prune leaves no zeros to keep
    healed, record = heal(masked, targets, HealSettings(mode=mode, steps=6, learning_rate=1e-2))
    assert record.masked_denses == len(masks)
    for name, (_, _, dense) in _denses(healed).items():
        if name in masks:
            assert torch.equal(dense.weight != 0, masks[name]), name
    assert not _same_state(healed, masked)  # and it did train


def test_a_merged_lora_gives_the_unmerged_models_logits(models):
    _, pruned, masked, _ = models
    for model in (pruned, masked):
        denses = _denses(model)
        assert any(isinstance(d, IndexedInputLinear) for _, _, d in denses.values()) or model is masked
        healed, _ = heal(model, models[3], HealSettings(mode="lora", steps=0))
        masks = zero_masks(_denses(healed))
        g = torch.Generator().manual_seed(1)
        wrapped = {}
        for name, (parent, attribute, dense) in _denses(healed).items():
            adapter = LoraDense(dense, rank=4, alpha=8.0, mask=masks.get(name), generator=g)
            with torch.no_grad():
                adapter.lora_b.copy_(0.05 * torch.randn(adapter.lora_b.shape, generator=g))
            setattr(parent, attribute, adapter)
            wrapped[name] = (parent, attribute, adapter)
        unmerged = _logits(healed)
        assert not torch.allclose(unmerged, _logits(model), atol=1e-4)  # the adapters do change the model
        for name, (parent, attribute, adapter) in wrapped.items():
            expected = adapter.base.weight + 2.0 * adapter.lora_b @ adapter.lora_a * (
                masks[name] if name in masks else 1)
            setattr(parent, attribute, adapter.merged())
            torch.testing.assert_close(getattr(parent, attribute).weight, expected)
        torch.testing.assert_close(_logits(healed), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_loss_falls_and_the_student_comes_closer_to_the_teacher(models, mode):
    _, pruned, _, targets = models
    # a random tiny teacher has little a pruned student can learn: a few percent in 25 steps is the real effect
    healed, record = heal(pruned, targets, HealSettings(mode=mode, steps=25, learning_rate=1e-2 if mode == "lora"
                                                        else 1e-3))
    assert len(record.losses) == 25 and record.tokens == 25 * 4 * targets.tokens.shape[1]
    assert sum(record.losses[-5:]) / 5 < 0.97 * record.losses[0]
    assert _kl_to_teacher(healed, targets) < 0.97 * _kl_to_teacher(pruned, targets)
    assert record.trained_params > 0 and record.tokens_per_second > 0


def test_norms_only_trains_only_norms_and_biases(models):
    _, pruned, _, targets = models
    healed, record = heal(pruned, targets, HealSettings(mode="norms", steps=4, learning_rate=1e-2))
    changed = {k for k, v in healed.state_dict().items() if not torch.equal(v, pruned.state_dict()[k])}
    assert changed and all("norm" in k or k.endswith(".bias") for k in changed), changed
    assert record.trained_params == sum(p.numel() for n, p in pruned.named_parameters()
                                        if "norm" in n or n.endswith(".bias"))


def test_cancel_leaves_the_pruned_model_as_it_was(models):
    _, pruned, _, targets = models
    before = {k: v.clone() for k, v in pruned.state_dict().items()}

    def stop(event):
        if event.stage == "heal" and event.step == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        heal(pruned, targets, HealSettings(mode="full", steps=10), on_event=stop)
    assert all(torch.equal(v, before[k]) for k, v in pruned.state_dict().items())
    assert all(p.requires_grad for p in pruned.parameters())


def test_a_healed_folder_reloads_with_identical_logits_and_records_the_heal(models, tmp_path):
    _, pruned, _, targets = models
    healed, record = heal(pruned, targets, HealSettings(mode="lora", steps=3, learning_rate=1e-2))
    folder = save_pruned(healed, None, tmp_path / "healed", heal=record.to_dict())
    reloaded, _ = load_pruned(folder)
    torch.testing.assert_close(_logits(reloaded), _logits(healed), rtol=0, atol=0)
    saved = json.loads((folder / "comp_report.json").read_text())["heal"]
    assert saved["mode"] == "lora" and saved["steps"] == 3 and len(saved["losses"]) == 3


def test_the_schedule_warms_up_then_follows_a_cosine_to_zero():
    assert cosine_rate(0.0, 1.0, 0.1) == 0.0
    assert cosine_rate(0.05, 1.0, 0.1) == pytest.approx(0.5)
    assert cosine_rate(0.1, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_rate(0.55, 1.0, 0.1) == pytest.approx(0.5)
    assert cosine_rate(1.0, 1.0, 0.1) == pytest.approx(0.0, abs=1e-12)


def test_bad_settings_and_a_streamed_model_are_refused(models, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        HealSettings()
    with pytest.raises(ValueError, match="mode must be one of"):
        HealSettings(mode="qlora", steps=1)
    _, pruned, _, targets = models
    from comp_core.models.streaming import open_streamed
    folder = save_pruned(pruned, None, tmp_path / "p")
    with pytest.raises(ValueError, match="streamed"):
        heal(open_streamed(folder), targets, HealSettings(steps=1))

"""Paired inputs (the COMP paper's accumulated form): fit the unpruned output W X from the pruned inputs X̃.

The math is checked against brute-force least squares on explicit activations; the loop's paired statistics
against the identical and accumulated streams they are made of; COMP end to end on tiny models.
"""
from __future__ import annotations

import pytest
import torch

from comp_core import CompConfig, analyze, count_parameters, get_adapter, prune
from comp_core.loop.capture import calibration_context, capture_block_inputs
from comp_core.cli import build_parser
from comp_core.math.linalg import damped, damping
from comp_core.loop.blocks import block_loop
from comp_core.methods.comp.block import prune_block
from comp_core.math.mask_tuning import (coefficient_matrix, damped_target, mask_path, mask_variance_plain,
                                   refit_columns, refit_relative_error, relative_error, solve_mask, target_terms)
from comp_core.loop.stats import STAT_DTYPE, InputStats, collect_block_stats, collect_paired_block_stats, own_moments

from tests.helpers import make_calib, make_tiny_model


def _pair(d_out: int, d_in: int, n_tokens: int, seed: int, drift: float = 0.3):
    """Random W (d_out × d_in), target inputs X and drifted inputs X̃ = X + noise (d_in × N), float64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=STAT_DTYPE)
    w = w * torch.exp(0.5 * torch.randn(d_in, generator=g, dtype=STAT_DTYPE))
    x = torch.randn(d_in, n_tokens, generator=g, dtype=STAT_DTYPE)
    x = x * torch.exp(0.5 * torch.randn(d_in, 1, generator=g, dtype=STAT_DTYPE))
    x_tilde = x + drift * torch.randn(d_in, n_tokens, generator=g, dtype=STAT_DTYPE)
    return w, x, x_tilde


def _moments(x: torch.Tensor, x_tilde: torch.Tensor):
    return x_tilde @ x_tilde.T, x_tilde @ x.T, x @ x.T  # G̃, M (rows: pruned stream), G


def _brute_force_mask(w, x, x_tilde, keep, eps: float = 0.0) -> torch.Tensor:
    """argmin over m_U of ‖WX − W diag(m) X̃‖² + ε‖m_U − 1‖² by lstsq on the explicit design matrix."""
    design = torch.stack([torch.outer(w[:, j], x_tilde[j]).flatten() for j in keep.tolist()], dim=1)  # (d_out·N, k)
    target = (w @ x).flatten()
    if eps > 0:
        design = torch.cat([design, eps ** 0.5 * torch.eye(len(keep), dtype=STAT_DTYPE)])
        target = torch.cat([target, eps ** 0.5 * torch.ones(len(keep), dtype=STAT_DTYPE)])
    return torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)


def _keep(d_in: int, n_keep: int, seed: int) -> torch.Tensor:
    return torch.sort(torch.randperm(d_in, generator=torch.Generator().manual_seed(seed))[:n_keep]).values


# ---------------------------------------------------------------------------------------------------------
# mask solve, path and error with an explicit right-hand side
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solve_mask_with_rhs_is_least_squares_from_the_pruned_inputs(seed):
    w, x, x_tilde = _pair(9, 7, 40, seed)
    gram, cross, target_gram = _moments(x, x_tilde)
    keep = _keep(7, 4, seed)
    rhs, _ = target_terms(w, cross, target_gram)
    got = solve_mask(coefficient_matrix(w, gram), keep, rhs)
    torch.testing.assert_close(got, _brute_force_mask(w, x, x_tilde, keep), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_damped_paired_solve_is_ridge_towards_one(seed):
    """C̃ + εI with b + ε·1: the objective plus ε‖m_U − 1‖², the unpaired damping convention."""
    w, x, x_tilde = _pair(9, 7, 40, seed)
    gram, cross, target_gram = _moments(x, x_tilde)
    keep = _keep(7, 5, seed)
    raw = coefficient_matrix(w, gram)
    eps = damping(raw, 0.05)
    rhs, _ = damped_target(*target_terms(w, cross, target_gram), eps)
    got = solve_mask(damped(raw, 0.05), keep, rhs)
    torch.testing.assert_close(got, _brute_force_mask(w, x, x_tilde, keep, eps), rtol=1e-8, atol=1e-10)


def test_paired_terms_reduce_to_the_unpaired_ones_when_the_streams_agree():
    w, x, _ = _pair(9, 7, 40, 3)
    gram = x @ x.T
    raw = coefficient_matrix(w, gram)
    coeff = damped(raw, 0.01)
    rhs, total = damped_target(*target_terms(w, gram, gram), damping(raw, 0.01))
    torch.testing.assert_close(rhs, coeff.sum(dim=1))
    assert total == pytest.approx(float(coeff.sum()), rel=1e-12)
    keep = _keep(7, 4, 3)
    torch.testing.assert_close(solve_mask(coeff, keep, rhs), solve_mask(coeff, keep))
    mask = torch.zeros(7, dtype=STAT_DTYPE)
    mask[keep] = solve_mask(coeff, keep)
    assert relative_error(coeff, mask, rhs, total) == pytest.approx(relative_error(coeff, mask), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_mask_path_with_rhs_matches_lstsq_at_every_prefix(seed):
    w, x, x_tilde = _pair(12, 8, 60, seed)
    gram, cross, target_gram = _moments(x, x_tilde)
    coeff = coefficient_matrix(w, gram)
    rhs, _ = target_terms(w, cross, target_gram)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
    path = mask_path(coeff, order, 6, keep_masks=True, chunk=3, rhs=rhs)
    for n_removed in range(7):
        keep = path.keep_index(n_removed)
        torch.testing.assert_close(path.mask(n_removed), _brute_force_mask(w, x, x_tilde, keep),
                                   rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(path.variance, mask_variance_plain(coeff, order, 6, rhs))
    # the paired path differs from the unpaired one: the right-hand side is really used
    assert not torch.allclose(path.variance, mask_path(coeff, order, 6).variance)


def test_mask_path_without_rhs_is_the_row_sum_path():
    w, x, _ = _pair(12, 8, 60, 4)
    coeff = damped(coefficient_matrix(w, x @ x.T), 0.01)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(4))
    plain = mask_path(coeff, order, 6, keep_masks=True)
    explicit = mask_path(coeff, order, 6, keep_masks=True, rhs=coeff.sum(dim=1))
    torch.testing.assert_close(plain.variance, explicit.variance)
    torch.testing.assert_close(plain._cumulative, explicit._cumulative)


def test_paired_relative_error_is_the_explicit_output_error():
    w, x, x_tilde = _pair(9, 7, 40, 5)
    gram, cross, target_gram = _moments(x, x_tilde)
    rhs, total = target_terms(w, cross, target_gram)
    mask = torch.rand(7, generator=torch.Generator().manual_seed(5), dtype=STAT_DTYPE)
    mask[2] = 0.0
    explicit = float(((w @ x - w @ torch.diag(mask) @ x_tilde) ** 2).sum() / ((w @ x) ** 2).sum())
    assert relative_error(coefficient_matrix(w, gram), mask, rhs, total) == pytest.approx(explicit, rel=1e-9)
    with pytest.raises(ValueError, match="total"):
        relative_error(coefficient_matrix(w, gram), mask, rhs)


# ---------------------------------------------------------------------------------------------------------
# full refit with the cross moment
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_refit_with_cross_is_least_squares_from_the_pruned_inputs(seed):
    w, x, x_tilde = _pair(6, 10, 80, seed)
    gram, cross, target_gram = _moments(x, x_tilde)
    keep = _keep(10, 6, seed)
    got = refit_columns(w, gram, keep, 1e-12, cross=cross)
    want = torch.linalg.lstsq(x_tilde[keep].T, (w @ x).T).solution.T  # argmin ‖WX − W' X̃_U‖
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    explicit = float(((w @ x - got @ x_tilde[keep]) ** 2).sum() / ((w @ x) ** 2).sum())
    err = refit_relative_error(w, gram, keep, got, cross=cross, target_gram=target_gram)
    assert err == pytest.approx(explicit, rel=1e-8)
    # without the cross moment it fits W X̃ instead: a different answer
    assert not torch.allclose(refit_columns(w, gram, keep, 1e-12), got)


def test_refit_with_cross_equal_to_the_gram_is_the_unpaired_refit():
    w, x, _ = _pair(6, 10, 80, 2)
    gram = x @ x.T
    keep = _keep(10, 6, 2)
    torch.testing.assert_close(refit_columns(w, gram, keep, 1e-3, cross=gram), refit_columns(w, gram, keep, 1e-3))
    new = refit_columns(w, gram, keep, 1e-3)
    assert refit_relative_error(w, gram, keep, new, cross=gram, target_gram=gram) == pytest.approx(
        refit_relative_error(w, gram, keep, new), rel=1e-8, abs=1e-14)


# ---------------------------------------------------------------------------------------------------------
# statistics and the loop
# ---------------------------------------------------------------------------------------------------------

def test_input_stats_pair_update_sums_the_cross_moment():
    g = torch.Generator().manual_seed(6)
    xs, xr = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    stats = InputStats(4, paired=True)
    stats.update_pair(xs[:1], xr[:1])
    stats.update_pair(xs[1:], xr[1:])
    fs, fr = xs.reshape(-1, 4).double(), xr.reshape(-1, 4).double()
    float32 = dict(rtol=1e-5, atol=1e-6)  # the products are float32 (``InputStats._product``)
    torch.testing.assert_close(stats.gram, fs.T @ fs, **float32)
    torch.testing.assert_close(stats.cross, fs.T @ fr, **float32)
    torch.testing.assert_close(stats.target_gram, fr.T @ fr, **float32)
    torch.testing.assert_close(stats.mean, fs.mean(dim=0))
    assert stats.n_tokens == 10
    assert InputStats(4).cross is None
    with pytest.raises(ValueError, match="paired"):
        InputStats(4).update_pair(xs, xr)


def test_own_moments_index_every_moment_like_the_gram():
    stats = InputStats(5, paired=True)
    stats.update_pair(torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64))
    module = torch.nn.Linear(3, 2)
    module.register_buffer("input_index", torch.tensor([4, 0, 2]))
    gram, cross, target = own_moments(module, stats)
    index = torch.tensor([4, 0, 2])
    torch.testing.assert_close(gram, stats.gram[index][:, index])
    torch.testing.assert_close(cross, stats.cross[index][:, index])
    torch.testing.assert_close(target, stats.target_gram[index][:, index])
    assert own_moments(torch.nn.Linear(5, 2), InputStats(5))[1:] == (None, None)


def _loop_stats(model, calib, propagation, change_block_0: bool):
    adapter = get_adapter(model)
    blocks = list(adapter.blocks(model))
    seen = {}
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, calib, batch_size=4)

        def visit(v):
            seen[v.index] = (v.stats, v.shifted_inputs)
            if v.index == 0 and change_block_0:
                v.block.mlp.down_proj.weight.data.mul_(0.5)
                return v.block
            return None

        block_loop(blocks, inputs, range(len(blocks)), visit, adapter=adapter, with_stats=lambda i: i >= 1,
                   propagation=propagation)
    return seen


def test_paired_stats_without_pruning_are_one_stream():
    seen = _loop_stats(make_tiny_model("llama"), make_calib(), "paired", change_block_0=False)
    assert len(seen) == 6
    for index, (stats, _) in seen.items():
        if index == 0:
            continue
        for name, st in stats.items():
            assert st.cross is not None and st.n_tokens == 8 * 32
            assert torch.equal(st.cross, st.gram), (index, name)
            assert torch.equal(st.target_gram, st.gram), (index, name)


def test_paired_stats_pair_the_accumulated_inputs_with_the_identical_ones():
    calib = make_calib()
    paired = _loop_stats(make_tiny_model("llama"), calib, "paired", change_block_0=True)
    accumulated = _loop_stats(make_tiny_model("llama"), calib, "accumulated", change_block_0=True)
    identical = _loop_stats(make_tiny_model("llama"), calib, "identical", change_block_0=True)
    for index in (1, 3, 5):
        for name, st in paired[index][0].items():
            torch.testing.assert_close(st.gram, accumulated[index][0][name].gram, rtol=1e-10, atol=1e-8)
            torch.testing.assert_close(st.target_gram, identical[index][0][name].gram, rtol=1e-10, atol=1e-8)
            assert not torch.allclose(st.cross, st.gram)
    assert paired[0][1] is not None and identical[0][1] is None


def test_collect_block_stats_is_untouched_by_pairing():
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    with torch.no_grad(), collect_block_stats(block, adapter) as stats:
        block.mlp.down_proj(torch.randn(2, 3, 128))
    assert stats["mlp.down_proj"].cross is None and stats["mlp.down_proj"].n_tokens == 6


# ---------------------------------------------------------------------------------------------------------
# COMP end to end
# ---------------------------------------------------------------------------------------------------------

def test_prune_block_reports_the_explicit_paired_errors_including_coupled_rows():
    """Every dense's reported errors are ‖W_rows X − W_rows diag(m) X̃‖² / ‖W_rows X‖² on the real activations,
    also for gate/up whose rows die with down's removed inputs (their b and ‖WX‖² are recomputed for them)."""
    model = make_tiny_model("llama")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[2]
    with calibration_context(model):
        inputs = capture_block_inputs(model, adapter, make_calib(), batch_size=4)
        kwargs = [inputs.kwargs_for(adapter.blocks(model)[0], b) for b in range(len(inputs.hidden))]
        g = torch.Generator().manual_seed(7)
        reference = inputs.hidden
        shifted = [h + 0.3 * h.std() * torch.randn(h.shape, generator=g) for h in reference]
        seen: dict[str, list[torch.Tensor]] = {}
        handles = [adapter.dense(block, d.name).register_forward_pre_hook(
            lambda _m, args, name=d.name: seen.setdefault(name, []).append(args[0].detach()))
            for d in adapter.denses]
        run = lambda hidden: (lambda b: block(hidden[b], **kwargs[b])[0])  # noqa: E731
        stats, _, _ = collect_paired_block_stats(block, adapter, run(reference), run(shifted), len(reference))
        for h in handles:
            h.remove()
        cfg = CompConfig(ratio=0.3, dense_kinds=("down", "o"), damp=1e-10, inputs="paired", refit="never")
        _, reports = prune_block(block, adapter, stats, 0.3, cfg, layer_index=2, apply=False)
    by_name = {r.name: r for r in reports}
    down = by_name["mlp.down_proj"]
    assert down.n_removed > 0
    rows = torch.tensor(sorted(set(range(128)) - set(down.pruned_index.tolist())))
    for r in reports:
        if r.n_removed == 0 and r.name not in ("mlp.gate_proj", "mlp.up_proj"):
            continue
        flat = [torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[r.name][i::2]]).double().T for i in (0, 1)]
        x, x_tilde = flat  # (d_in, N): reference batches come first in every pair
        w = adapter.dense(block, r.name).weight.detach().double()
        if r.name in ("mlp.gate_proj", "mlp.up_proj"):
            w = w[rows]
        plain = torch.ones(r.d_in, dtype=STAT_DTYPE)
        plain[r.pruned_index] = 0.0
        tuned = plain.clone()
        if r.mask is not None:
            tuned[plain.bool()] = r.mask.double()
        for mask, reported in ((plain, r.error_no_tuning), (tuned, r.error_tuned)):
            explicit = float(((w @ x - w @ (mask[:, None] * x_tilde)) ** 2).sum() / ((w @ x) ** 2).sum())
            assert reported == pytest.approx(explicit, rel=1e-4), (r.name, reported, explicit)


def _signature(plan) -> list[tuple]:
    return [(r.layer, r.name, r.n_removed, tuple(r.pruned_index.tolist())) for r in plan.dense_reports]


@pytest.mark.parametrize("refit", ["never", "always"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_paired_comp_prunes_to_the_ratio_and_analyze_predicts_it(arch, refit):
    cfg = CompConfig(ratio=0.3, remove_layers=1, inputs="paired", dense_kinds=None, refit=refit)
    model = make_tiny_model(arch)
    plan = analyze(model, make_calib(), cfg)
    pruned, result = prune(model, make_calib(), cfg)
    assert abs(result.realised_ratio - 0.3) <= 0.01
    assert result.params_after == count_parameters(pruned) == result.plan.planned_params_after
    assert _signature(plan) == _signature(result.plan)
    assert plan.planned_params_after == result.params_after
    cut = [r for r in result.plan.dense_reports if r.n_removed > 0]
    assert cut and all(r.compensation == ("refit" if refit == "always" else "mask") for r in cut)
    for r in cut:
        assert r.error_tuned <= r.error_no_tuning + 1e-12, (r.layer, r.name, r.error_tuned, r.error_no_tuning)
    # the paired fit differs from both other modes (its target is the unpruned stream's)
    for other in ("identical", "accumulated"):
        _, res = prune(model, make_calib(), CompConfig(ratio=0.3, remove_layers=1, inputs=other, dense_kinds=None,
                                                        refit=refit))
        assert [r.error_tuned for r in res.plan.dense_reports] != [r.error_tuned for r in result.plan.dense_reports]


def test_paired_is_a_valid_input_mode_everywhere():
    assert CompConfig(inputs="paired").inputs == "paired"
    with pytest.raises(ValueError, match="inputs"):
        CompConfig(inputs="pairs")
    args = build_parser().parse_args(["prune", "--inputs", "paired"])
    assert args.inputs == "paired"

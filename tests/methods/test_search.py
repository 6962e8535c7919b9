"""The searched per-layer allocation (``methods.search``) through real methods on tiny random models.

Exact checks: the level total never moves; one level per layer reproduces the method's one-shot prune on the
same calibration; each database variant equals pruning that layer alone at that level; on a 4-layer model
with 3 levels per layer the search finds the brute-force optimum of its own fitness; the same seed gives the
same allocation; the result never scores worse than the one-shot allocation; the fitness is the KL divergence.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import random

import pytest
import torch
from torch.nn import functional as F

from comp_core.math.evolution import evolve
from comp_core.methods import get_method, make_settings, prune_with
from comp_core.methods.base import Run
from comp_core.methods.search.fitness import Reference, StagedKL, mean_kl, minibatch, token_kl
from comp_core.models.adapters import get_adapter
from comp_core.methods.search.run import prepare_search, split_holdout
from comp_core.runtime import count_parameters

from tests.helpers import ARCHS, make_calib, make_tiny_model
from tests.models.test_families import FAMILIES, make_family

SEARCHABLE = ["comp", "comp-neurons", "wanda-sp", "wanda-sp+mask", "magnitude-sp+mask", "flap", "wanda", "sparsegpt"]


def ratio_settings(name: str) -> dict:
    return {"sparsity": "0.5"} if get_method(name).kind == "unstructured" else {"ratio": 0.2}


def prepared(name: str, model, samples, **overrides):
    settings = make_settings(name, allocation="search", **ratio_settings(name), **overrides)
    calibration, held = split_holdout(samples, settings.search_holdout)
    run = Run.begin(model, inplace=False)
    with run.calibration():
        prep = prepare_search(get_method(name).method.search_setup(settings), run, calibration, held, settings)
    return run, prep, settings, calibration


def test_registry_says_which_methods_search():
    assert all(get_method(n).method.searchable for n in SEARCHABLE)
    for name in ("shortgpt", "comp+nm"):
        assert not get_method(name).method.searchable
    with pytest.raises(ValueError, match="allocation"):
        make_settings("shortgpt", allocation="search")
    with pytest.raises(ValueError, match="allocation must be one of"):
        make_settings("comp", allocation="best")
    with pytest.raises(ValueError, match="removes whole layers only"):
        make_settings("comp-layers", allocation="search")
    with pytest.raises(ValueError, match="2:4"):
        prune_with("wanda", make_tiny_model("llama"), make_calib(), sparsity="2:4", allocation="search")


@pytest.mark.parametrize("name", SEARCHABLE)
def test_search_keeps_the_budget_and_never_loses_to_the_one_shot_allocation(name):
    model, samples = make_tiny_model("llama"), make_calib()
    pruned, result = prune_with(name, model, samples, allocation="search", search_generations=4,
                                **ratio_settings(name))
    record = result.plan.search
    assert sum(record.levels) == 0  # the nominal parameter total is the one-shot total, exactly
    assert record.final_kl <= record.start_kl
    assert record.improved == (record.final_kl < record.start_kl)
    assert len(record.fitness) == record.generations + 1 and record.evaluations > record.generations
    assert record.database_mb > 0 and record.holdout == 2
    chosen = record.searched if record.improved else record.one_shot
    assert result.plan.layer_ratios == pytest.approx(chosen)
    if get_method(name).kind == "unstructured":
        assert result.extra["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert count_parameters(pruned) == count_parameters(model)
    else:
        assert result.realised_ratio == pytest.approx(0.2, abs=0.01)
    with torch.no_grad():  # the pruned model runs
        assert torch.isfinite(pruned(input_ids=samples[:1]).logits).all()


@pytest.mark.parametrize("name", ["comp", "wanda-sp+mask", "flap", "sparsegpt"])
def test_one_level_per_layer_is_the_one_shot_prune_on_the_same_calibration(name):
    model, samples = make_tiny_model("llama"), make_calib()
    searched, result = prune_with(name, model, samples, allocation="search", search_levels=0,
                                  **ratio_settings(name))
    assert result.plan.search.levels == [0] * len(result.plan.search.layers)
    calibration, _ = split_holdout(samples, make_settings(name).search_holdout)
    one_shot, _ = prune_with(name, model, calibration, inputs="identical", **ratio_settings(name))
    a, b = searched.state_dict(), one_shot.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["comp", "wanda-sp+mask", "flap"])
def test_a_database_variant_is_that_layer_pruned_alone_at_that_level(name):
    model, samples = make_tiny_model("llama"), make_calib()
    run, prep, settings, calibration = prepared(name, model, samples, search_levels=2, protected=())
    n_layers = len(run.blocks)
    checked = 0
    for layer in prep.layers[:3]:
        for level in (min(-1, prep.grid.high[prep.layers.index(layer)]), 1):
            k = prep.layers.index(layer)
            if not prep.grid.low[k] <= level <= prep.grid.high[k]:
                continue
            variant = prep.database[(layer, level)]
            removed = prep.space.one_shot[layer] + level * prep.unit
            if name == "flap":  # FLAP's ratio is net of the output biases its compensation adds
                original = run.blocks[layer].state_dict()
                removed -= sum(t.numel() for k, t in variant.block.state_dict().items() if k not in original)
            alone, _ = prune_with(name, model, calibration, ratio=removed / run.params_before, inputs="identical",
                                  protected=tuple(i for i in range(n_layers) if i != layer))
            expected = alone.model.layers[layer].state_dict()
            got = variant.block.state_dict()
            assert got.keys() == expected.keys()
            for key in got:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=f"{layer}/{level}/{key}")
            checked += 1
    assert checked >= 3


def test_variants_share_what_pruning_left_unchanged():
    run, prep, _, _ = prepared("comp", make_tiny_model("llama"), make_calib(), search_levels=1)
    variant = prep.database[(prep.layers[0], 0)]
    original = run.blocks[prep.layers[0]]
    # COMP's default prunes the inputs of o_proj and down_proj: q, k and the norms are the original's tensors
    assert variant.block.self_attn.q_proj.weight is original.self_attn.q_proj.weight
    assert variant.block.input_layernorm.weight is original.input_layernorm.weight
    shared = {id(p) for p in original.parameters()}
    own = [(n, p) for n, p in variant.block.named_parameters() if id(p) not in shared]
    assert {n for n, _ in own} >= {"self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"}
    assert variant.nbytes == sum(p.numel() * p.element_size() for _, p in own)
    assert variant.nbytes < sum(p.numel() * p.element_size() for p in variant.block.parameters())


def test_on_four_layers_with_three_levels_it_finds_the_brute_force_optimum():
    model = make_tiny_model("llama", num_hidden_layers=4)
    samples = make_calib()
    # every stage reads all held-out tokens (2 × 32 < 256): the staged fitness is the full one, deterministic
    run, prep, settings, _ = prepared("wanda-sp+mask", model, samples, search_levels=1, search_step=0.04)
    assert prep.grid.low == (-1,) * 4 and prep.grid.high == (1,) * 4
    candidates = [c for c in itertools.product((-1, 0, 1), repeat=4) if sum(c) == 0]
    with run.calibration():
        scores = {c: prep.fitness.full(c) for c in candidates}
        best = min(scores, key=scores.get)
        result = evolve(prep.grid, prep.fitness, settings.search_budget())
    assert len(candidates) == 19
    assert result.levels == best
    assert result.history[-1] == pytest.approx(scores[best], rel=1e-6)


def test_the_same_seed_gives_the_same_allocation():
    model, samples = make_tiny_model("qwen2"), make_calib()
    runs = [prune_with("wanda-sp+mask", model, samples, ratio=0.2, allocation="search", search_generations=3,
                       search_seed=5)[1].plan.search for _ in range(2)]
    assert runs[0].levels == runs[1].levels and runs[0].fitness == runs[1].fitness


def test_fitness_is_the_kl_divergence_to_the_original():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    logp = F.log_softmax(p_logits, -1)
    kl, n = token_kl(logp, q_logits)
    by_hand = (logp.exp() * (logp - F.log_softmax(q_logits, -1))).sum()
    assert n == 10 and kl == pytest.approx(float(by_hand), rel=1e-5)
    model, samples = make_tiny_model("llama"), make_calib()
    reference = Reference.of(model, samples[:3])
    assert reference.logp.shape == (3, samples.shape[1] - 1, model.config.vocab_size)
    batch = [(s, samples.shape[1]) for s in range(3)]
    assert mean_kl(model, reference, batch) == pytest.approx(0.0, abs=1e-4)  # float16 reference
    other = make_tiny_model("llama", seed=1)
    assert mean_kl(other, reference, batch) > 1e-3


def test_minibatches_take_whole_sequences_until_the_budget():
    import random

    batch = minibatch(5, 32, 70, random.Random(0))
    assert [length for _, length in batch] == [32, 32, 6]
    assert len({s for s, _ in batch}) == 3
    assert sum(length for _, length in minibatch(2, 32, 1000, random.Random(0))) == 64


def test_holdout_is_at_most_a_quarter_of_the_calibration():
    samples = torch.zeros(10, 4, dtype=torch.long)
    calibration, held = split_holdout(samples, 8)
    assert held.shape[0] == 2 and calibration.shape[0] == 8
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(samples[:1], 8)


@pytest.mark.parametrize("rescale", [False, True])
def test_a_searched_comp_that_removes_layers_keeps_them_removed_and_rescaled(rescale):
    model, samples = make_tiny_model("llama"), make_calib()
    overrides = {"ratio": 0.3, "remove_layers": 1, "layer_rescale": rescale}
    searched, result = prune_with("comp", model, samples, allocation="search", search_levels=0, **overrides)
    calibration, _ = split_holdout(samples, make_settings("comp").search_holdout)
    one_shot, expected = prune_with("comp", model, calibration, **overrides)
    assert result.plan.removed_layers == expected.plan.removed_layers and len(result.plan.removed_layers) == 1
    assert result.plan.layer_scales == pytest.approx(expected.plan.layer_scales)
    assert bool(result.plan.layer_scales) == rescale
    with torch.no_grad():  # the scales folded before the database equal the scales folded after pruning
        a, b = searched(input_ids=samples[:2]).logits, one_shot(input_ids=samples[:2]).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("setting, value, says", [
    ("inputs", "paired", "paired inputs need the pruned stream"),
    ("granularity", "layers", "nothing to search"),
    ("score", "fisher", "Fisher score"),
    ("remove_layers", "auto", "give remove_layers a number"),
])
def test_comp_refuses_a_search_it_cannot_run(setting, value, says):
    make_settings("comp", **{setting: value})  # fine with the one-shot rule
    with pytest.raises(ValueError, match=says):
        make_settings("comp", allocation="search", **{setting: value})


def _variants_of(blocks, n: int, seed: int) -> list:
    """``n`` copies of every block with small random changes: each a different module, as database variants are."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for block in blocks:
        copies = []
        for _ in range(n):
            twin = copy.deepcopy(block)
            with torch.no_grad():
                for p in twin.parameters():
                    p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
            copies.append(twin)
        out.append(copies)
    return out


@pytest.mark.parametrize("arch", ARCHS + list(FAMILIES))
def test_the_prefix_cache_gives_the_scores_of_whole_forwards(arch):
    """Candidates scored with the prefix cache (blocks shared with an earlier candidate replayed) get the
    scores whole forwards give, on every family (Gemma's loop reads its blocks' ``attention_type``)."""
    model = make_family(arch) if arch in FAMILIES else make_tiny_model(arch)
    adapter = get_adapter(model)
    container = adapter.blocks(model)
    originals = list(container)
    variants = _variants_of(originals, 2, seed=1)
    reference = Reference.of(model, make_calib(seed=4)[:6, :24])

    def assemble(levels):
        for position, level in enumerate(levels):
            container[position] = originals[position] if level == 0 else variants[position][level - 1]

    rng = random.Random(0)
    n = len(originals)
    calls = [([tuple(rng.choice((0, 0, 1, 2)) if i >= n // 2 or rng.random() < 0.2 else 0 for i in range(n))
               for _ in range(5)], stage) for stage in (0, 1, 0, 1, 1)]
    scores = {}
    for cached in (False, True):
        fitness = StagedKL(model, reference, assemble, [30, 60], seed=3, container=container if cached else None,
                           offspring=5)
        scores[cached] = [fitness(candidates, stage) for candidates, stage in calls]
        if cached:
            assert fitness.replayed_share > 0.2
    for got, want in zip(scores[True], scores[False]):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assemble((0,) * n)
    assert all(a is b for a, b in zip(container, originals))  # no stand-in left behind


def test_a_search_with_the_prefix_cache_is_the_search_without_it():
    model, samples = make_tiny_model("llama"), make_calib()
    run, prep, settings, _ = prepared("comp", model, samples, search_levels=2)
    budget = settings.search_budget()
    results = []
    for container in (None, run.adapter.blocks(run.model)):
        fitness = StagedKL(run.model, prep.reference, prep.assemble, [t for _, t in budget.stages],
                           settings.search_seed, container=container, offspring=budget.offspring)
        results.append(evolve(prep.grid, fitness, dataclasses.replace(budget, generations=6), fixed_last_stage=True))
    assert results[0].levels == results[1].levels
    assert results[1].history == pytest.approx(results[0].history, rel=1e-6)

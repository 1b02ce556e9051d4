"""Gradient-based rank allocation: the rounding, the probe, the rebuild."""

import math
import random

import pytest
import torch

from lora_from_scratch.adapters import adapter_layers, add_adapters, adapters_disabled
from lora_from_scratch.lora import LoRALinear
from lora_from_scratch.rank_allocation import (GradNormProbe, allocate_ranks, layer_rank_caps, rebuild_adapters,
                                               remove_adapters, share_spread, variant_ranks)


def test_exactly_proportional_on_a_hand_made_profile():
    assert allocate_ranks([1, 2, 3, 2], 16) == [2, 4, 6, 4]
    assert allocate_ranks([0.5, 0.25, 0.25], 8) == [4, 2, 2]


def test_largest_remainder_by_hand():
    # quotas 10 * (0.45, 0.35, 0.2) = 4.5, 3.5, 2.0: floors 4, 3, 2 and one
    # unit left, which goes to the larger fraction; a tie goes to the earlier layer
    assert allocate_ranks([0.45, 0.35, 0.2], 10) == [5, 3, 2]
    assert allocate_ranks([1, 1, 1], 10) == [4, 3, 3]


def test_zero_importance_and_floor():
    assert allocate_ranks([0, 0, 0, 0], 8) == [2, 2, 2, 2]  # no signal: equal
    # a layer with no importance keeps min_rank; the others share the rest in proportion
    assert allocate_ranks([0, 1, 3], 9) == [1, 2, 6]
    assert allocate_ranks([1e-6, 1, 1], 4, min_rank=1) == [1, 2, 1]  # equal fractions: earlier first
    assert allocate_ranks([0, 1], 6, min_rank=2) == [2, 4]


def test_cap_moves_the_excess_to_other_layers():
    assert allocate_ranks([100, 1], 100, max_rank=64) == [64, 36]
    assert allocate_ranks([100, 1, 1], 66, max_rank=64) == [64, 1, 1]


def test_random_profiles_sum_to_budget_within_bounds():
    rng = random.Random(0)
    for _ in range(200):
        L = rng.randint(1, 12)
        w = [rng.random() ** 3 if rng.random() > 0.2 else 0.0 for _ in range(L)]
        lo = rng.randint(1, 3)
        caps = [rng.randint(lo, 40) for _ in range(L)]
        budget = rng.randint(L * lo, sum(caps))
        r = allocate_ranks(w, budget, lo, caps)
        assert sum(r) == budget and all(lo <= x <= c for x, c in zip(r, caps))
        # rounding moves no layer more than one unit from its share, when no bound binds
        if sum(w) > 0 and all(lo < budget * x / sum(w) < c for x, c in zip(w, caps)):
            assert all(abs(x - budget * v / sum(w)) < 1 for x, v in zip(r, w))


def test_allocation_errors():
    with pytest.raises(ValueError, match="below 3 layers"):
        allocate_ranks([1, 1, 1], 2)
    with pytest.raises(ValueError, match=">= 0"):
        allocate_ranks([1, -0.1], 4)
    with pytest.raises(ValueError, match=">= 0"):
        allocate_ranks([1, float("nan")], 4)
    with pytest.raises(ValueError, match="min_rank"):
        allocate_ranks([1, 1], 4, min_rank=0)
    with pytest.raises(ValueError, match="empty"):
        allocate_ranks([], 4)
    with pytest.raises(ValueError, match="exceeds"):
        allocate_ranks([1, 1], 9, max_rank=4)
    with pytest.raises(TypeError, match="budget"):
        allocate_ranks([1, 1], 4.0)
    with pytest.raises(ValueError, match="unknown rank allocation"):
        variant_ranks("magic", ["a"], 4)


def test_share_spread():
    assert share_spread([0.2, 0.3, 0.5]) == pytest.approx(2.5)
    assert share_spread([0.0, 1.0]) == math.inf


def _lora_model(tiny_model, rank=4):
    model = tiny_model()
    add_adapters(model, lambda lin: LoRALinear(lin, rank, 2.0 * rank))
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 48, (4, 10), generator=g)


def test_probe_matches_grad_norms_of_each_step(tiny_model):
    model = _lora_model(tiny_model)
    with torch.no_grad():  # B != 0 so that A gets gradient too
        for _, m in adapter_layers(model):
            m.lora_B.normal_(0, 0.1)
    probe = GradNormProbe(model)
    expected = {n: 0.0 for n, _ in adapter_layers(model)}
    for step in range(3):
        ids = _batch(step)
        model.zero_grad(set_to_none=True)
        loss = model(ids).logsumexp(-1).mean() * (step + 1)
        loss.backward()
        probe.end_step()
        for n, m in adapter_layers(model):  # the oracle: .grad after backward
            expected[n] += math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m.adapter_parameters().values()))
    norms = probe.mean_norms()
    assert probe.steps == 3
    for n in expected:
        assert norms[n] == pytest.approx(expected[n] / 3, rel=1e-5)
    assert sum(probe.shares().values()) == pytest.approx(1.0)
    probe.remove()
    model(_batch()).sum().backward()
    assert probe.mean_norms() == norms  # hooks are off


def test_rebuild_at_per_layer_ranks_equals_base(tiny_model):
    model = _lora_model(tiny_model)
    base = tiny_model()
    ids = _batch()
    with torch.no_grad():  # trained-looking adapters: the model differs from its base
        for _, m in adapter_layers(model):
            m.lora_B.normal_(0, 0.5)
    assert not torch.allclose(model(ids), base(ids), atol=1e-4)
    names = [n for n, _ in adapter_layers(model)]
    shares = {n: i + 1.0 for i, n in enumerate(names)}
    ranks = variant_ranks("gradient", names, rank=4, shares=shares, max_rank=layer_rank_caps(model))
    assert sum(ranks.values()) == 4 * len(names) and ranks[names[-1]] > ranks[names[0]]
    rebuild_adapters(model, ranks, lambda lin, r: LoRALinear(lin, r, 8.0))
    got = dict(adapter_layers(model))
    assert [got[n].r for n in names] == [ranks[n] for n in names]
    assert torch.equal(model(ids), base(ids))  # B = 0: the base function, exactly
    with adapters_disabled(model):
        assert torch.equal(model(ids), base(ids))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    remove_adapters(model)
    assert not adapter_layers(model) and torch.equal(model(ids), base(ids))


def test_variants_share_the_budget(tiny_model):
    names = [f"l{i}" for i in range(6)]
    for v in ("uniform", "random"):
        r = variant_ranks(v, names, rank=4, seed=3)
        assert sum(r.values()) == 24 and min(r.values()) >= 1
    assert set(variant_ranks("uniform", names, rank=4).values()) == {4}
    assert variant_ranks("random", names, 4, seed=3) == variant_ranks("random", names, 4, seed=3)
    assert variant_ranks("random", names, 4, seed=3) != variant_ranks("random", names, 4, seed=4)
    reduced = variant_ranks("gradient", names, 4, budget=round(0.7 * 24), shares=dict.fromkeys(names, 1.0))
    assert sum(reduced.values()) == 17
    with pytest.raises(ValueError, match="exactly the model's adapters"):
        rebuild_adapters(_lora_model(tiny_model), {"nope": 1}, lambda lin, r: LoRALinear(lin, r, 1.0))


def test_probe_and_rebuild_with_the_shared_loop(tiny_model):
    from lora_from_scratch.data import train_batches
    from lora_from_scratch.rank_allocation import probe_and_rebuild
    from lora_from_scratch.tasks import Task
    from lora_from_scratch.tokenizer import Tokenizer
    from lora_from_scratch.train import TrainConfig, sft_loss

    model, base = _lora_model(tiny_model), tiny_model()
    batches = train_batches(Task("add", 1), Tokenizer(), 16, seed=0)
    info = probe_and_rebuild(model, sft_loss, batches, TrainConfig(steps=3, progress=False), "gradient", 4,
                             lambda lin, r: LoRALinear(lin, r, 8.0), budget=20)
    assert info["rank_budget"] == 20 and sum(info["ranks"].values()) == 20
    assert sum(info["probe_shares"].values()) == pytest.approx(1.0)
    assert info["share_spread_before"] >= 1.0
    ids = _batch()
    assert torch.equal(model(ids), base(ids))
    assert all(not p._backward_hooks for p in model.parameters())  # the probe took its hooks off
    probe = GradNormProbe(model, max_steps=1)
    for step in range(3):
        model(ids).sum().backward()
        probe.end_step()
    assert probe.steps == 1

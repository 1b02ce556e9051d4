"""LoRA, DyLoRA and MatryoshkaLoRA against their oracles."""

import math

import pytest
import torch
import torch.nn as nn

from lora_from_scratch.adapters import AdapterLayer, adapters_disabled, add_adapters, load_adapters, \
    merge_adapters, save_adapters, trainable_parameters, unmerge_adapters
from lora_from_scratch.dylora import DyLoRALinear, with_rank_sampling
from lora_from_scratch.lora import LoRALinear, evaluate_ranks, lora_linear, lora_scale, set_adapter_rank
from lora_from_scratch.matryoshka import MatryoshkaLoRALinear, aurac, default_train_ranks, matryoshka_P
from lora_from_scratch.data import train_batches
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer
from lora_from_scratch.train import TrainConfig, sft_loss, train

KINDS = {
    "lora": lambda lin, r, alpha: LoRALinear(lin, r, alpha),
    "dylora": lambda lin, r, alpha: DyLoRALinear(lin, r, alpha),
    "matryoshka": lambda lin, r, alpha: MatryoshkaLoRALinear(lin, r, alpha),
}


def _linear(i=12, o=10, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def _trained(layer):
    """Give B nonzero values, as after training."""
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("kind", KINDS)
def test_output_equals_base_at_init(kind):
    lin = _linear()
    x = torch.randn(4, 3, 12)
    expected = lin(x)
    layer = KINDS[kind](lin, 4, 8.0)
    assert torch.equal(layer(x), expected)
    assert (layer.lora_B == 0).all() and layer.lora_A.abs().max() <= 1 / math.sqrt(12)
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (10, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_and_merge_is_idempotent(kind):
    layer = _trained(KINDS[kind](_linear(), 4, 8.0))
    x = torch.randn(5, 12)
    w0 = layer.base.weight.clone()
    y = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-5)
    assert torch.allclose(layer.base.weight, w0 + layer.delta_weight(), atol=1e-6)
    layer.merge()  # a second merge changes nothing
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert torch.allclose(layer.base.weight, w0, atol=1e-6)
    assert torch.allclose(layer(x), y, atol=1e-6)


def test_delta_weight_is_the_scaled_product():
    layer = _trained(LoRALinear(_linear(), 4, 6.0))
    assert layer.scaling == 1.5
    assert torch.allclose(layer.delta_weight(), 1.5 * layer.lora_B @ layer.lora_A)
    x = torch.randn(3, 12)
    assert torch.allclose(layer(x), layer.base(x) + x @ layer.delta_weight().T, atol=1e-6)


def test_hand_written_backward_matches_autograd():
    x, W, b = (torch.randn(3, 4, 5, dtype=torch.double, requires_grad=True),
               torch.randn(6, 5, dtype=torch.double, requires_grad=True), torch.randn(6, dtype=torch.double))
    A, B = torch.randn(2, 5, dtype=torch.double, requires_grad=True), torch.randn(6, 2, dtype=torch.double,
                                                                                 requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, W, A, B: lora_linear(x, W, b, A, B, 0.7), (x, W, A, B))
    P = torch.tensor([1.5, 0.5], dtype=torch.double)  # a per-component scale vector
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear(x, W, None, A, B, P), (x, A, B))


def test_scale_rules():
    assert lora_scale(4, 8, "lora") == 2.0
    assert lora_scale(4, 8, "rslora") == 4.0
    assert lora_scale(4, 8, "none") == 1.0
    with pytest.raises(ValueError, match="unknown scale rule 'rs'"):
        lora_scale(4, 8, "rs")
    with pytest.raises(ValueError, match="unknown scale rule"):
        LoRALinear(_linear(), 4, 8, scale="bogus")


@pytest.mark.parametrize("r", [0, -1, 11, 2.5, True])
def test_bad_rank_is_rejected(r):
    with pytest.raises(ValueError, match=r"1\.\.10"):
        LoRALinear(_linear(12, 10), r, 8)


def test_bad_sub_rank_and_dropout():
    layer = LoRALinear(_linear(), 4, 8)
    for bad in (0, 5, -1):
        with pytest.raises(ValueError, match=r"sub-rank must be an int in 1\.\.4"):
            layer.set_rank(bad)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(_linear(), 4, 8, dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(3, 3, 1), 2, 2)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.set_rank(2)


@pytest.mark.parametrize("kind", ["lora", "dylora", "matryoshka"])
def test_sub_rank_equals_a_fresh_lora_from_the_first_components(kind):
    layer = _trained(KINDS[kind](_linear(), 6, 12.0))
    x = torch.randn(5, 12)
    for r in (1, 3, 6):
        layer.set_rank(r)
        fresh = LoRALinear(layer.base, r, 12.0)
        with torch.no_grad():
            fresh.lora_A.copy_(layer.lora_A[:r])
            fresh.lora_B.copy_(layer.lora_B[:, :r])
        assert torch.allclose(layer(x), fresh(x), atol=1e-6)
        assert fresh.scaling == 12.0 / r


def test_dropout_path_keeps_the_base_exact_and_trains():
    layer = _trained(LoRALinear(_linear(), 4, 8, dropout=0.5))
    x = torch.randn(8, 12)
    layer.eval()
    assert torch.allclose(layer(x), layer.base(x) + x @ layer.delta_weight().T, atol=1e-6)
    layer.train()
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.base.weight.grad is None


# ----- model-level helpers ---------------------------------------------------
def test_add_adapters_targets_and_freezing(tiny_model):
    m = tiny_model(n_layer=2)
    total = sum(p.numel() for p in m.parameters())
    names = add_adapters(m, lambda lin: LoRALinear(lin, 2, 4), ("q_proj", "v_proj"))
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert trainable_parameters(m) == 4 * 2 * (32 + 32)
    assert all(("lora_" in n) == p.requires_grad for n, p in m.named_parameters())
    assert sum(p.numel() for p in m.parameters()) == total + trainable_parameters(m)
    m2 = tiny_model()
    assert len(add_adapters(m2, lambda lin: LoRALinear(lin, 2, 4), "all-linear")) == 6
    m3 = tiny_model()
    assert add_adapters(m3, lambda lin: LoRALinear(lin, 2, 4), "blocks.0.mlp.up_proj") == ["blocks.0.mlp.up_proj"]


def test_add_adapters_errors(tiny_model):
    m = tiny_model()
    with pytest.raises(ValueError, match=r"\['qkv'\] match no nn.Linear.*'q_proj'"):
        add_adapters(m, lambda lin: LoRALinear(lin, 2, 4), ["q_proj", "qkv"])
    with pytest.raises(ValueError, match="targets is empty"):
        add_adapters(m, lambda lin: LoRALinear(lin, 2, 4), [])
    with pytest.raises(TypeError, match="AdapterLayer"):
        add_adapters(m, lambda lin: lin, "q_proj")
    m = tiny_model()
    add_adapters(m, lambda lin: LoRALinear(lin, 2, 4), "q_proj")
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(m, lambda lin: LoRALinear(lin, 2, 4), "v_proj")


def test_only_adapter_parameters_change_after_a_training_step(tiny_model):
    m = tiny_model()
    add_adapters(m, lambda lin: LoRALinear(lin, 4, 8), "all-linear")
    before = {n: p.clone() for n, p in m.named_parameters()}
    train(m, sft_loss, train_batches(Task("sub", 2), Tokenizer(), 16, 0), TrainConfig(steps=2, progress=False))
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_" in n), n


def test_adapters_disabled_gives_the_base_model(tiny_model):
    base = tiny_model()
    ids = torch.randint(3, 40, (2, 6))
    expected = base(ids)
    m = tiny_model()
    add_adapters(m, lambda lin: _trained(LoRALinear(lin, 4, 8)), "all-linear")
    adapted = m(ids)
    assert not torch.allclose(adapted, expected, atol=1e-4)
    with adapters_disabled(m):
        assert torch.allclose(m(ids), expected, atol=1e-6)
        with adapters_disabled(m):  # blocks nest
            pass
        assert torch.allclose(m(ids), expected, atol=1e-6)  # still the base after the inner block
    assert torch.allclose(m(ids), adapted)
    merge_adapters(m)  # also when merged: unmerge inside, merge again after
    with adapters_disabled(m):
        assert torch.allclose(m(ids), expected, atol=1e-5)
    assert torch.allclose(m(ids), adapted, atol=1e-5)
    unmerge_adapters(m)
    assert not any(l.merged for l in m.modules() if isinstance(l, AdapterLayer))


def test_save_and_load_adapters(tiny_model, tmp_path):
    m = tiny_model()
    add_adapters(m, lambda lin: _trained(LoRALinear(lin, 4, 8)), ("q_proj", "up_proj"))
    save_adapters(m, tmp_path / "a.pt", note=1)
    m2 = tiny_model()
    add_adapters(m2, lambda lin: LoRALinear(lin, 4, 8), ("q_proj", "up_proj"))
    assert load_adapters(m2, tmp_path / "a.pt") == {"note": 1}
    ids = torch.randint(3, 40, (2, 6))
    assert torch.equal(m(ids), m2(ids))
    m3 = tiny_model()
    add_adapters(m3, lambda lin: LoRALinear(lin, 2, 8), ("q_proj", "up_proj"))
    with pytest.raises(ValueError, match=r"q_proj was saved as .*'r': 4.*this model's is .*'r': 2"):
        load_adapters(m3, tmp_path / "a.pt")
    m4 = tiny_model()
    add_adapters(m4, lambda lin: LoRALinear(lin, 4, 8), "q_proj")
    with pytest.raises(ValueError, match="does not fit"):
        load_adapters(m4, tmp_path / "a.pt")
    # same shapes, other settings: a different function, so refused
    for other in (lambda lin: LoRALinear(lin, 4, 16), lambda lin: LoRALinear(lin, 4, 8, scale="rslora"),
                  lambda lin: MatryoshkaLoRALinear(lin, 4, 8)):
        m5 = tiny_model()
        add_adapters(m5, other, ("q_proj", "up_proj"))
        with pytest.raises(ValueError, match="was saved as"):
            load_adapters(m5, tmp_path / "a.pt")


def test_evaluate_ranks_restores_ranks(tiny_model):
    m = tiny_model()
    add_adapters(m, lambda lin: MatryoshkaLoRALinear(lin, 4, 8), "all-linear")
    task = Task("add", 1)
    out = evaluate_ranks(m, task, [1, 2, 4])
    assert set(out) == {1, 2, 4} and all(0 <= v <= 1 for v in out.values())
    assert all(l.rank is None for l in m.modules() if isinstance(l, MatryoshkaLoRALinear))
    with pytest.raises(ValueError, match="no rank-based adapters"):
        set_adapter_rank(tiny_model(), 2)


# ----- DyLoRA -----------------------------------------------------------------
@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_gradient_reaches_only_the_trained_components(frozen):
    layer = _trained(DyLoRALinear(_linear(), 6, 12.0, frozen=frozen))
    layer.set_rank(4)
    layer(torch.randn(5, 12)).pow(2).sum().backward()
    rows_with_grad = (layer.lora_A.grad.abs().sum(1) > 0).nonzero().flatten().tolist()
    cols_with_grad = (layer.lora_B.grad.abs().sum(0) > 0).nonzero().flatten().tolist()
    expected = [3] if frozen else [0, 1, 2, 3]
    assert rows_with_grad == expected and cols_with_grad == expected
    assert layer.scaling == 3.0  # c(4) = 12 / 4


def test_dylora_forward_at_rank_b_uses_scale_c_b():
    layer = _trained(DyLoRALinear(_linear(), 6, 12.0))
    x = torch.randn(3, 12)
    layer.set_rank(2)
    expected = layer.base(x) + (12.0 / 2) * x @ layer.lora_A[:2].T @ layer.lora_B[:, :2].T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_dylora_sampling_wrapper(tiny_model):
    m = tiny_model()
    add_adapters(m, lambda lin: DyLoRALinear(lin, 4, 8, ranks=[1, 4]), "all-linear")
    seen = []

    def spy(model, batch):
        seen.append({l.rank for l in model.modules() if isinstance(l, DyLoRALinear)})
        return sft_loss(model, batch)

    res = train(m, with_rank_sampling(spy), train_batches(Task("sub", 2), Tokenizer(), 8, 0),
                TrainConfig(steps=20, progress=False))
    assert all(len(s) == 1 for s in seen)  # one rank per step, shared by every layer
    assert {s.pop() for s in seen} == {1, 4}
    assert all(l.rank == 4 for l in m.modules() if isinstance(l, DyLoRALinear))  # back to full rank
    assert len(res.losses) == 20
    with pytest.raises(ValueError, match="within 1..4"):
        DyLoRALinear(_linear(), 4, 8, ranks=[2, 5])
    plain = tiny_model()
    add_adapters(plain, lambda lin: LoRALinear(lin, 2, 4), "q_proj")
    with pytest.raises(ValueError, match="DyLoRALinear"):
        with_rank_sampling(sft_loss)(plain, None)


# ----- MatryoshkaLoRA ---------------------------------------------------------
def test_matryoshka_P_closed_form_and_worked_values():
    assert matryoshka_P(8, range(1, 9), "none").tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
    P = matryoshka_P(8, [2, 8], "rslora", alpha=1.0)
    expected = [1 / math.sqrt(2) + 1 / math.sqrt(8)] * 2 + [1 / math.sqrt(8)] * 6
    assert torch.allclose(P, torch.tensor(expected))
    assert torch.allclose(P, torch.tensor([1.0607, 1.0607] + [0.3536] * 6), atol=1e-4)
    for S, scale, alpha in [([1, 2, 4, 8], "lora", 16.0), ([3, 5], "lora", 2.0), ([1, 8], "rslora", 4.0)]:
        P = matryoshka_P(8, S, scale, alpha)
        for i in range(1, 9):  # P_i = sum of c(s) over s in S with s >= i
            assert P[i - 1].item() == pytest.approx(sum(lora_scale(s, alpha, scale) for s in S if s >= i), rel=1e-6)
        assert (P[:-1] >= P[1:]).all()  # non-increasing
    assert default_train_ranks(8) == [1, 2, 4, 8] and default_train_ranks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="within 1..8"):
        matryoshka_P(8, [0, 4])
    with pytest.raises(ValueError, match="within 1..8"):
        matryoshka_P(8, [])


def test_matryoshka_with_only_the_full_rank_is_lora():
    lin = _linear()
    mat = _trained(MatryoshkaLoRALinear(lin, 4, 8.0, train_ranks=[4]))
    lora = LoRALinear(lin, 4, 8.0)
    with torch.no_grad():
        lora.lora_A.copy_(mat.lora_A)
        lora.lora_B.copy_(mat.lora_B)
    x = torch.randn(6, 12)
    assert torch.allclose(mat.P, torch.full((4,), 2.0))
    assert torch.allclose(mat(x), lora(x), atol=1e-6)
    assert torch.allclose(mat.delta_weight(), lora.delta_weight(), atol=1e-6)


def test_matryoshka_forward_is_the_sum_of_nested_loras():
    S = [1, 2, 4, 6]
    layer = _trained(MatryoshkaLoRALinear(_linear(), 6, 6.0, train_ranks=S))
    x = torch.randn(4, 12)
    A, B = layer.lora_A, layer.lora_B
    nested = sum(lora_scale(s, 6.0) * x @ A[:s].T @ B[:, :s].T for s in S)
    assert torch.allclose(layer(x), layer.base(x) + nested, atol=1e-5)
    # inference at a sub-rank drops P: plain c(r) B[:, :r] A[:r]
    layer.set_rank(2)
    assert torch.allclose(layer(x), layer.base(x) + 3.0 * x @ A[:2].T @ B[:, :2].T, atol=1e-6)
    layer.set_rank(None)
    assert torch.allclose(layer(x), layer.base(x) + nested, atol=1e-5)
    # every component gets gradient in one step (DyLoRA trains one per step)
    layer(x).sum().backward()
    assert (layer.lora_A.grad.abs().sum(1) > 0).all()


def test_matryoshka_random_P_is_dylora_on_average():
    S, alpha = [1, 2, 4, 8], 8.0
    P = matryoshka_P(8, S, "lora", alpha)
    expectation = sum(lora_scale(b, alpha) * torch.cat([torch.ones(b), torch.zeros(8 - b)]) for b in S) / len(S)
    assert torch.allclose(expectation, P / len(S))


def test_aurac_worked_example_and_edge_cases():
    ranks, acc = [1, 2, 4, 8, 16, 32], [10, 20, 30, 40, 50, 60]
    assert aurac(ranks, acc) == pytest.approx(35.0)
    assert aurac(ranks, acc, x="linear") == pytest.approx(46.6129, abs=1e-4)
    assert aurac([8], [77.0]) == 77.0
    assert aurac([4, 1, 2], [30, 10, 20]) == pytest.approx(20.0)  # order does not matter
    with pytest.raises(ValueError, match="as many"):
        aurac([1, 2], [1.0])
    with pytest.raises(ValueError, match="x must be"):
        aurac([1, 2], [1, 2], x="log10")
    with pytest.raises(ValueError, match="distinct"):
        aurac([2, 2], [1, 2])


def test_adapters_refuse_another_base_unless_asked(tiny_model, tmp_path):
    m = tiny_model(seed=0)
    add_adapters(m, lambda lin: _trained(LoRALinear(lin, 4, 8)), "q_proj")
    save_adapters(m, tmp_path / "a.pt")
    other = tiny_model(seed=1)  # another base, same shapes
    add_adapters(other, lambda lin: LoRALinear(lin, 4, 8), "q_proj")
    with pytest.raises(ValueError, match="another base model"):
        load_adapters(other, tmp_path / "a.pt")
    load_adapters(other, tmp_path / "a.pt", check_base=False)
    assert torch.equal(other.blocks[0].attn.q_proj.lora_B, m.blocks[0].attn.q_proj.lora_B)
    # a merge and an unmerge leave float rounding in the base weights: still the same base
    merge_adapters(m)
    unmerge_adapters(m)
    save_adapters(m, tmp_path / "b.pt")
    same = tiny_model(seed=0)
    add_adapters(same, lambda lin: LoRALinear(lin, 4, 8), "q_proj")
    load_adapters(same, tmp_path / "b.pt")
    merge_adapters(m)  # saved while merged: the signature is of the base without the update
    save_adapters(m, tmp_path / "c.pt")
    load_adapters(same, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="another base model"):
        load_adapters(other, tmp_path / "c.pt")


def test_failed_add_adapters_leaves_model_alone(tiny_model):
    fresh = tiny_model()
    # q_proj (32->32) takes rank 4; up_proj (32->128) takes at most 32, so 40 fails after q_proj was built
    with pytest.raises(ValueError, match=r"1\.\.32"):
        add_adapters(fresh, lambda lin: LoRALinear(lin, 4 if lin.out_features == 32 else 40, 8), ("q_proj", "up_proj"))
    fresh2 = tiny_model()
    with pytest.raises(ValueError, match="ranks"):  # DyLoRA checks its rank set after wrapping the layer
        add_adapters(fresh2, lambda lin: DyLoRALinear(lin, 4, 8, ranks=[9]), "all-linear")
    for m in (fresh, fresh2):
        assert all(p.requires_grad for p in m.parameters())  # untouched: nothing frozen, nothing swapped
        assert not any(isinstance(x, AdapterLayer) for x in m.modules())


def test_add_adapters_keeps_the_adapters_own_frozen_parameters(tiny_model):
    def lora_fa(lin):  # LoRA-FA style: A stays at its random init, only B trains
        layer = LoRALinear(lin, 4, 8)
        layer.lora_A.requires_grad_(False)
        return layer
    m = tiny_model()
    add_adapters(m, lora_fa, "q_proj")
    layer = m.blocks[0].attn.q_proj
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad and not layer.base.weight.requires_grad


def test_lora_output_can_be_modified_in_place():
    layer = _trained(LoRALinear(_linear(), 4, 8))
    x = torch.randn(2, 3, 12)
    y = layer(x)
    expected = y.detach() + 1
    y.add_(1)
    assert torch.equal(y.detach(), expected)
    with pytest.raises(ValueError, match="constant"):
        lora_linear(x, layer.base.weight, None, layer.lora_A, layer.lora_B, torch.ones(4, requires_grad=True))

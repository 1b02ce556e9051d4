"""GraLoRA and hybrid GraLoRA against their oracles: LoRA at k = 1, the
per-block formula, dense algebra, and autograd."""

import math

import pytest
import torch
import torch.nn as nn

from lora_from_scratch.adapters import adapters_disabled, add_adapters, load_adapters, save_adapters, \
    trainable_parameters
from lora_from_scratch.data import train_batches
from lora_from_scratch.gralora import GraLoRALinear, gralora_linear
from lora_from_scratch.lora import LoRALinear
from lora_from_scratch.methods import get_method
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer
from lora_from_scratch.train import TrainConfig, sft_loss, train


def _linear(i=12, o=8, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(i, o).to(dtype)


def _trained(layer, seed=1):
    """Random values in every adapter factor, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _dense_from_blocks(layer):
    """dW assembled from block_delta(i, j), plus the hybrid branch."""
    k = layer.k
    dW = torch.cat([torch.cat([layer.block_delta(i, j) for j in range(k)], 1) for i in range(k)], 0)
    if layer.hybrid_r:
        dW = dW + layer.scaling * layer.hybrid_B @ layer.hybrid_A
    return dW


def test_k1_without_hybrid_is_lora():
    lin = _linear()
    g = _trained(GraLoRALinear(lin, 4, 6.0, k=1))
    lora = LoRALinear(nn.Linear(12, 8), 4, 6.0)
    lora.base.load_state_dict(lin.state_dict())
    with torch.no_grad():  # PEFT layouts: gralora_A[0] = A^T (in, r), gralora_B[0] = B^T (r, out)
        lora.lora_A.copy_(g.gralora_A[0].T)
        lora.lora_B.copy_(g.gralora_B[0].T)
    assert g.scaling == lora.scaling == 1.5
    x = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_lora = g(x), lora(x2)
    assert torch.allclose(y, y_lora, atol=1e-6)
    assert torch.allclose(g.delta_weight(), lora.delta_weight(), atol=1e-6)
    (y * y).sum().backward()
    (y_lora * y_lora).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(g.gralora_A.grad[0].T, lora.lora_A.grad, atol=1e-4)
    assert torch.allclose(g.gralora_B.grad[0].T, lora.lora_B.grad, atol=1e-4)


@pytest.mark.parametrize("r,k,hybrid_r", [(4, 2, 0), (8, 4, 0), (4, 2, 3)])
def test_shapes_parameter_count_and_init(r, k, hybrid_r):
    lin = _linear(16, 8)
    x = torch.randn(4, 3, 16)
    expected = lin(x)
    g = GraLoRALinear(lin, r, 10.0, k=k, hybrid_r=hybrid_r)
    assert g.gralora_A.shape == (k, 16 // k, r) and g.gralora_B.shape == (k, r, 8 // k)
    assert sum(p.numel() for p in g.adapter_parameters().values()) == (r + hybrid_r) * (16 + 8)
    assert g.scaling == 10.0 / (r + hybrid_r)
    assert (g.gralora_B == 0).all() and g.gralora_A.abs().max() <= 1 / math.sqrt(16 // k)
    if hybrid_r:
        assert g.hybrid_A.shape == (hybrid_r, 16) and g.hybrid_B.shape == (8, hybrid_r)
        assert (g.hybrid_B == 0).all()
    assert torch.allclose(g(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(7,), (2, 5), (2, 3, 4)])
@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_forward_equals_base_plus_x_dW(shape, hybrid_r):
    r, k = (6, 2) if hybrid_r else (8, 4)
    g = _trained(GraLoRALinear(_linear(12, 8, dtype=torch.double), r, 3.0, k=k, hybrid_r=hybrid_r))
    x = torch.randn(*shape, 12, dtype=torch.double)
    expected = g.base(x) + x @ g.delta_weight().T
    assert g(x).shape == (*shape, 8)
    assert torch.allclose(g(x), expected, atol=1e-12)  # the hand-written fast path
    assert torch.allclose(g.adapter_output(x, g.base(x)), expected, atol=1e-12)  # the readable one


def test_vectorised_delta_weight_equals_the_per_block_reference():
    for hybrid_r in (0, 3):
        g = _trained(GraLoRALinear(_linear(24, 16, dtype=torch.double), 8, 5.0, k=4, hybrid_r=hybrid_r))
        assert torch.allclose(g.delta_weight(), _dense_from_blocks(g), atol=1e-12)


def test_block_delta_reads_pefts_layout():
    """Block (i, j) uses columns i*r/k.. of gralora_A[j] and rows j*r/k.. of gralora_B[i]."""
    g = GraLoRALinear(_linear(12, 8), 4, 4.0, k=2)
    with torch.no_grad():
        g.gralora_A.zero_()
        g.gralora_B.zero_()
        g.gralora_A[1][:, 0:2] = 1.0  # A_01 (input block 1, for output block 0)
        g.gralora_B[0][2:4] = 1.0  # B_01 (output block 0, from input block 1)
    dW = g.delta_weight()
    assert (dW[:4, 6:] != 0).all() and (dW[4:] == 0).all() and (dW[:, :6] == 0).all()
    assert torch.equal(dW[:4, 6:], g.block_delta(0, 1))


@pytest.mark.parametrize("r,k,hybrid_r,expected", [(4, 2, 0, 8), (2, 1, 0, 2), (4, 2, 3, 11), (8, 4, 0, 16),
                                                   (2, 2, 1, 5)])
def test_rank_of_the_update(r, k, hybrid_r, expected):
    g = _trained(GraLoRALinear(_linear(32, 16, dtype=torch.double), r, 1.0, k=k, hybrid_r=hybrid_r))
    assert expected == min(k * r + hybrid_r, 32, 16)
    assert torch.linalg.matrix_rank(g.delta_weight()).item() == expected


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_merged_equals_unmerged_and_merge_is_idempotent(hybrid_r):
    g = _trained(GraLoRALinear(_linear(), 4, 8.0, k=2, hybrid_r=hybrid_r))
    x = torch.randn(5, 12)
    w0 = g.base.weight.clone()
    y = g(x)
    g.merge()
    g.merge()  # a second merge changes nothing
    assert torch.allclose(g(x), y, atol=1e-5)
    assert torch.allclose(g.base.weight, w0 + g.delta_weight(), atol=1e-6)
    g.unmerge()
    g.unmerge()
    assert torch.allclose(g.base.weight, w0, atol=1e-6)
    assert torch.allclose(g(x), y, atol=1e-6)


def test_hand_written_backward_matches_autograd():
    torch.manual_seed(0)
    d = dict(dtype=torch.double, requires_grad=True)
    x, W, b = torch.randn(2, 3, 12, **d), torch.randn(8, 12, **d), torch.randn(8, **d)
    A, B = torch.randn(2, 6, 4, **d), torch.randn(2, 4, 4, **d)
    hA, hB = torch.randn(3, 12, **d), torch.randn(8, 3, **d)
    assert torch.autograd.gradcheck(lambda *t: gralora_linear(*t, None, None, 0.7), (x, W, b, A, B))
    assert torch.autograd.gradcheck(lambda x, A, B, hA, hB: gralora_linear(x, W, None, A, B, hA, hB, 0.7),
                                    (x, A, B, hA, hB))


def test_gradients_stay_in_their_blocks():
    """A loss that reads output block i moves only B_i*; an outlier input
    channel in block j adds gradient only to A_j* (GraLoRA), but to every
    column of LoRA's B and all of its A."""
    torch.manual_seed(0)
    k, r = 2, 4
    g = _trained(GraLoRALinear(_linear(12, 8), r, 4.0, k=k))
    x = torch.randn(16, 12)
    y = g(x)
    y[:, :4].sum().backward()  # output block 0 only
    assert (g.gralora_B.grad[0] != 0).any() and (g.gralora_B.grad[1] == 0).all()
    # A_ij with i = 1 (columns 2:4 of every gralora_A[j]) serves output block 1: no gradient
    assert (g.gralora_A.grad[:, :, 2:] == 0).all() and (g.gralora_A.grad[:, :, :2] != 0).all()

    def grads(layer, x):
        layer.zero_grad()
        (layer(x) * torch.linspace(-1, 1, 8)).sum().backward()  # a loss linear in the output
        return {n: p.grad.clone() for n, p in layer.adapter_parameters().items()}

    outlier = torch.zeros(16, 12)
    outlier[:, 7] = 100.0  # channel 7 lies in input block 1 (channels 6..11)
    clean, noisy = grads(g, x), grads(g, x + outlier)
    extra = {n: noisy[n] - clean[n] for n in clean}  # the outlier's own contribution
    assert (extra["gralora_A"][0] == 0).all() and (extra["gralora_A"][1] != 0).any()
    # B_ij with j = 0 (rows 0:2 of every gralora_B[i]) reads input block 0 only
    assert (extra["gralora_B"][:, :2] == 0).all() and (extra["gralora_B"][:, 2:] != 0).all()
    lora = _trained(LoRALinear(g.base, r, 4.0))
    clean, noisy = grads(lora, x), grads(lora, x + outlier)
    assert ((noisy["lora_B"] - clean["lora_B"]) != 0).all()  # every column of B feels the outlier


def test_training_through_a_model_saving_and_loading(tiny_model, tmp_path):
    m = tiny_model()  # 1 block: q, k, v, o (32->32), up (32->128), down (128->32)
    add_adapters(m, lambda lin: GraLoRALinear(lin, 4, 8.0, k=2, hybrid_r=2), "all-linear")
    assert trainable_parameters(m) == 4 * 6 * (32 + 32) + 2 * 6 * (32 + 128)
    before = {n: p.clone() for n, p in m.named_parameters()}
    train(m, sft_loss, train_batches(Task("sub", 2), Tokenizer(), 16, 0), TrainConfig(steps=2, progress=False))
    for n, p in m.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == any(s in n for s in ("gralora_", "hybrid_")), n
    ids = torch.randint(3, 40, (2, 6))
    adapted = m(ids)
    base = tiny_model()
    with adapters_disabled(m):
        assert torch.allclose(m(ids), base(ids), atol=1e-6)
    path = tmp_path / "gralora.pt"
    save_adapters(m, path)
    fresh = tiny_model()
    add_adapters(fresh, lambda lin: GraLoRALinear(lin, 4, 8.0, k=2, hybrid_r=2), "all-linear")
    load_adapters(fresh, path)
    assert torch.allclose(fresh(ids), adapted, atol=1e-6)
    other_k = tiny_model()  # same parameter names, other settings: refused by the saved config
    add_adapters(other_k, lambda lin: GraLoRALinear(lin, 4, 8.0, k=4, hybrid_r=2), "all-linear")
    with pytest.raises(ValueError, match="'k': 2"):
        load_adapters(other_k, path)


def test_registry_builds_gralora():
    spec = get_method("gralora")
    opts = spec.make_options({"k": 2, "hybrid_r": 1})
    layer = spec.build(4, 8.0, "lora", opts)(_linear())
    assert isinstance(layer, GraLoRALinear) and (layer.k, layer.hybrid_r, layer.r) == (2, 1, 4)
    assert layer.adapter_config() == {"type": "GraLoRALinear", "r": 4, "alpha": 8.0, "k": 2, "hybrid_r": 1,
                                      "scale": "lora"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=4, k=0), r"k .*>= 1, got 0"),
    (dict(r=4, k=1.5), r"k .*got 1.5"),
    (dict(r=0, k=2), r"rank r must be an int >= 1, got 0"),
    (dict(r=4, k=2, hybrid_r=-1), r"hybrid_r must be an int >= 0, got -1"),
    (dict(r=3, k=2), r"r divisible by k.*r=3, k=2"),
    (dict(r=6, k=3, in_=12, out=10), r"12->10 layer and k=3"),
    (dict(r=5, k=5, in_=10, out=12), r"10->12 layer and k=5"),
    (dict(r=4, k=2, hybrid_r=9), r"hybrid_r must be at most min\(in, out\) = 8, got 9"),
    (dict(r=4, k=2, dropout=1.0), r"dropout"),
    (dict(r=4, k=2, scale="bogus"), r"unknown scale rule"),
])
def test_bad_settings_are_refused_before_the_base_is_touched(kwargs, match):
    lin = _linear(kwargs.pop("in_", 12), kwargs.pop("out", 8))
    r, k = kwargs.pop("r"), kwargs.pop("k")
    with pytest.raises(ValueError, match=match):
        GraLoRALinear(lin, r, 8.0, k=k, **kwargs)
    assert lin.weight.requires_grad  # still as it was: not frozen by a failed construction
    with pytest.raises(TypeError, match="nn.Linear"):
        GraLoRALinear(nn.Conv1d(4, 4, 1), 2, 2.0, k=1)


def test_dropout_path_trains_and_keeps_eval_exact():
    g = _trained(GraLoRALinear(_linear(), 4, 8.0, k=2, hybrid_r=1, dropout=0.5))
    x = torch.randn(6, 12)
    g.eval()
    assert torch.allclose(g(x), g.base(x) + x @ g.delta_weight().T, atol=1e-5)
    g.train()
    g(x).sum().backward()
    assert g.gralora_A.grad is not None and g.hybrid_A.grad is not None and g.base.weight.grad is None


def test_cli_finetune_with_gralora(tmp_path, capsys):
    import json

    from lora_from_scratch.__main__ import main
    small = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--quiet", "--device", "cpu"]
    ck, out = tmp_path / "base.pt", tmp_path / "ft.json"
    assert main(["pretrain", "--task", "add", "--digits", "1", "--steps", "5", "--batch-size", "16", *small,
                 "--out", str(ck)]) == 0
    assert main(["finetune", "--method", "gralora", "--rank", "4", "--gralora-k", "2", "--hybrid-r", "2",
                 "--task", "sub", "--digits", "1", "--steps", "3", "--batch-size", "16", "--base", str(ck),
                 "--quiet", "--device", "cpu", "--metrics-out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["method"] == "gralora" and m["options"] == {"k": 2, "hybrid_r": 2} and m["steps"] == 3
    assert m["trainable_parameters"] == 4 * 6 * (32 + 32) + 2 * 6 * (32 + 128)
    assert main(["finetune", "--method", "gralora", "--rank", "4", "--gralora-k", "3", "--base", str(ck),
                 "--steps", "1", "--quiet", "--device", "cpu"]) == 2
    assert "r divisible by k (each block gets rank r/k), got r=4, k=3" in capsys.readouterr().err


def test_fast_path_equals_readable_path_for_awkward_inputs():
    """Non-contiguous input, and the stride-0 gradient that sum().backward() sends."""
    g = _trained(GraLoRALinear(_linear(), 4, 8.0, k=2, hybrid_r=1))
    x = torch.randn(12, 2, 3).permute(1, 2, 0).requires_grad_()  # (2, 3, 12), not contiguous
    grads = []
    for forward in (g, lambda t: g.adapter_output(t, g.base(t))):
        x.grad = None
        g.zero_grad()
        forward(x).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in g.adapter_parameters().values()])
    for fast, readable in zip(*grads):
        assert torch.allclose(fast, readable, atol=1e-5)

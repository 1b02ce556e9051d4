"""The pieces benchmarks/rank_curves.py adds to the library: the nested-sum
control and the update-size measure, against direct computations."""

import importlib.util
from pathlib import Path

import torch

from lora_from_scratch.adapters import add_adapters, adapter_layers
from lora_from_scratch.data import encode_batch
from lora_from_scratch.lora import LoRALinear
from lora_from_scratch.matryoshka import MatryoshkaOptions
from lora_from_scratch.tasks import Task
from lora_from_scratch.train import sft_loss

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("rank_curves", REPO / "benchmarks" / "rank_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(tiny_model):
    model = tiny_model()
    torch.manual_seed(1)
    add_adapters(model, lambda lin: LoRALinear(lin, 4, 1.0, scale="rslora"))
    with torch.no_grad():
        for _, m in adapter_layers(model):
            m.lora_B.normal_(std=0.2)
    return model


def test_nested_sum_is_the_sum_of_each_rank_loss(tiny_model, tok):
    rc = _bench()
    model = _model(tiny_model)
    batch = encode_batch(Task("add", 1).sample_train(8, seed=0), tok)
    loss, _ = rc.with_nested_sum(sft_loss, MatryoshkaOptions(train_ranks=(1, 2, 4)))(model, batch)
    expected = 0.0
    for s in (1, 2, 4):
        for _, m in adapter_layers(model):
            m.set_rank(s)
        expected += sft_loss(model, batch)[0].item()
    for _, m in adapter_layers(model):
        m.set_rank(None)
    assert abs(loss.item() - expected) < 1e-5
    assert all(m.rank == 4 for _, m in adapter_layers(model))  # back to full rank
    loss.backward()  # the graph kept each rank's factors
    assert all(m.lora_A.grad is not None for _, m in adapter_layers(model))


def test_update_size_is_adapter_over_base_output(tiny_model):
    rc = _bench()
    model = _model(tiny_model)
    task = Task("add", 1)
    sizes = rc.update_size(model, task, 4)
    assert set(sizes) == {n for n, _ in adapter_layers(model)} and all(v > 0 for v in sizes.values())
    for _, m in adapter_layers(model):
        m.lora_B.data.zero_()
    assert all(v == 0 for v in rc.update_size(model, task, 2).values())  # B = 0: no update
    assert all(m.rank == 4 for _, m in adapter_layers(model))  # ranks restored


def test_matryoshka_defaults_to_the_reference_code_scale():
    from lora_from_scratch.recipes import FinetuneConfig
    mat, lora = FinetuneConfig(method="matryoshka", rank=8), FinetuneConfig(method="lora", rank=8)
    assert (mat.scale, mat.alpha) == ("rslora", 1.0)  # c(s) = 1/sqrt(s), as IST-DASLab/MatryoshkaLoRA
    assert (lora.scale, lora.alpha) == ("lora", 16.0)

import json

import pytest
import torch

from lora_from_scratch.checkpoint import atomic_save, atomic_write, load_model, safe_load, save_model, write_json
from lora_from_scratch.data import train_batches
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer
from lora_from_scratch.train import TrainConfig, evaluate, lr_at, sft_loss, train


def _run(model, steps, data_seed=0, loss_fn=sft_loss, eval_fn=None, **kw):
    task = Task("add", 2)
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup_steps=5, progress=False, **kw)
    return train(model, loss_fn, train_batches(task, Tokenizer(), 32, seed=data_seed), cfg, eval_fn=eval_fn)


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_loss_decreases_on_a_tiny_run(tiny_model):
    res = _run(tiny_model(), 60)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < 0.75 * first, (first, last)


def test_same_seed_gives_identical_weights(tiny_model):
    a, b = tiny_model(seed=1, dropout=0.1), tiny_model(seed=1, dropout=0.1)
    _run(a, 15, seed=4)
    _run(b, 15, seed=4)
    assert _same(a, b)
    c = tiny_model(seed=1, dropout=0.1)
    _run(c, 15, seed=5)  # other dropout masks
    assert not _same(a, c)
    d = tiny_model(seed=1, dropout=0.1)
    _run(d, 15, seed=4, data_seed=1)  # other problems
    assert not _same(a, d)


def _crash_at(step):
    """An sft_loss that dies at ``step``, like a killed job."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        if calls["n"] == step:
            raise KeyboardInterrupt
        calls["n"] += 1
        return sft_loss(model, batch)
    return loss_fn


def test_resume_continues_exactly(tiny_model, tmp_path):
    straight = tiny_model(seed=2, dropout=0.1)  # dropout: the RNG state must resume too
    _run(straight, 20)
    ck = str(tmp_path / "run.pt")
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model(seed=2, dropout=0.1), 20, loss_fn=_crash_at(13), checkpoint_path=ck, checkpoint_every=5)
    assert safe_load(ck)["step"] == 10
    resumed = tiny_model(seed=99, dropout=0.1)  # other weights: everything must come from the checkpoint
    res = _run(resumed, 20, checkpoint_path=ck, resume=True)
    assert res.steps == 20 and len(res.losses) == 10
    assert _same(straight, resumed)
    assert safe_load(ck)["step"] == 20


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model, tmp_path):
    ck = tmp_path / "ck.pt"
    calls = {"n": 0}

    def exploding(model, batch):
        loss, m = sft_loss(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 6 else loss), m

    with pytest.raises(FloatingPointError, match=r"nan at step 6.*ck.pt"):
        _run(tiny_model(), 20, loss_fn=exploding, checkpoint_path=str(ck), checkpoint_every=5)
    assert safe_load(ck)["step"] == 5  # the good one, untouched


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(50, TrainConfig(steps=100, lr=2.0, schedule="constant")) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainConfig(resume=True)


def test_nothing_to_train_is_an_error(tiny_model):
    m = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        _run(m, 1)


def test_evaluate_is_exact_match(tiny_model):
    m = tiny_model()
    task = Task("add", 2)
    acc = evaluate(m, task, task.test_set()[:20])
    assert 0.0 <= acc <= 1.0
    assert acc == 0.0  # a random model does not add


def test_model_checkpoint_round_trip_and_errors(tiny_model, tmp_path):
    m = tiny_model()
    save_model(m, tmp_path / "m.pt", note="hi")
    m2, meta = load_model(tmp_path / "m.pt")
    assert meta == {"note": "hi"}
    assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_model(tmp_path / "corrupt.pt")
    atomic_save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a TinyGPT checkpoint"):
        load_model(tmp_path / "other.pt")
    # a checkpoint whose tensors do not fit its config
    ck = safe_load(tmp_path / "m.pt")
    ck["model"]["wte.weight"] = torch.zeros(3, 3)
    atomic_save(ck, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"wrong shape wte.weight"):
        load_model(tmp_path / "shape.pt")
    assert not list(tmp_path.glob("*.tmp"))  # no half-written files left behind


def test_resume_with_other_schedule_settings_is_refused(tiny_model, tmp_path):
    ck = str(tmp_path / "run.pt")
    _run(tiny_model(), 4, checkpoint_path=ck)
    with pytest.raises(ValueError, match=r"steps=4 \(now 8\)"):
        _run(tiny_model(), 8, checkpoint_path=ck, resume=True)


def test_bad_train_config_and_empty_eval(tiny_model):
    with pytest.raises(ValueError, match="log_every"):
        TrainConfig(log_every=0)
    with pytest.raises(ValueError, match="at least one problem"):
        evaluate(tiny_model(), Task("add", 2), [])


def test_batches_may_be_an_iterable(tiny_model):
    get = train_batches(Task("add", 2), Tokenizer(), 16, seed=0)
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    cfg = TrainConfig(steps=5, progress=False)
    ra = train(a, sft_loss, get, cfg)
    rb = train(b, sft_loss, [get(s) for s in range(5)], cfg)
    assert ra.losses == rb.losses and _same(a, b)
    assert len(rb.metrics) == 5


def test_resume_into_other_adapters_is_refused(tiny_model, tmp_path):
    from lora_from_scratch.adapters import add_adapters
    from lora_from_scratch.lora import LoRALinear
    from lora_from_scratch.matryoshka import MatryoshkaLoRALinear
    ck = str(tmp_path / "run.pt")
    a = tiny_model()
    add_adapters(a, lambda lin: LoRALinear(lin, 4, 8), "q_proj")
    _run(a, 3, checkpoint_path=ck)
    b = tiny_model()
    add_adapters(b, lambda lin: MatryoshkaLoRALinear(lin, 4, 1, scale="rslora"), "q_proj")  # same names, shapes
    with pytest.raises(ValueError, match="other adapters"):
        _run(b, 3, checkpoint_path=ck, resume=True)


def test_evaluate_gives_custom_problems_room_for_their_answers(tiny_model):
    from lora_from_scratch.tasks import Problem
    m = tiny_model()
    calls = []
    original = m.generate
    m.generate = lambda prompts, n, **kw: calls.append(n) or original(prompts, n, **kw)
    evaluate(m, Task("add", 1), [Problem("123+456=", "9750")])  # a 1-digit task, 4-digit answers
    assert calls == [5]


def test_stop_metric_stops_at_the_first_evaluation_that_reaches_it(tiny_model, tmp_path):
    scores = iter([0.2, 0.7, 0.95, 1.0])  # what eval_fn reports at steps 3, 6, 9, 12

    def eval_fn(m):
        return {"solved": next(scores)}
    ck = str(tmp_path / "run.pt")
    straight = tiny_model(seed=4)
    res = _run(straight, 30, eval_every=3, stop_metric="solved", stop_value=0.9, checkpoint_path=ck,
               eval_fn=eval_fn)
    assert res.stopped_early and res.steps == 9 and len(res.losses) == 9
    assert [s for s, _ in res.evals] == [3, 6, 9] and res.final == {"solved": 0.95}
    assert safe_load(ck)["step"] == 9  # the stopping step is checkpointed ...
    again = _run(tiny_model(seed=99), 30, eval_every=3, stop_metric="solved", stop_value=0.9, checkpoint_path=ck,
                 resume=True, eval_fn=lambda m: {"solved": 0.0})
    assert again.stopped_early and again.steps == 9 and not again.losses  # ... and a resume does not go on
    with pytest.raises(ValueError, match="stop_value"):  # a stricter goal is another run, not a resume
        _run(tiny_model(), 30, eval_every=3, stop_metric="solved", stop_value=0.99, checkpoint_path=ck,
             resume=True, eval_fn=eval_fn)
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(stop_metric="solved")
    with pytest.raises(ValueError, match="eval_fn"):
        _run(tiny_model(), 6, eval_every=3, stop_metric="solved")
    with pytest.raises(ValueError, match="not among"):
        _run(tiny_model(), 6, eval_every=3, stop_metric="solved", eval_fn=lambda m: {"acc": 1.0})


def test_pretrain_stops_once_a_training_sample_is_solved(monkeypatch):
    from lora_from_scratch import recipes
    seen = []
    real = recipes.evaluate

    def fake_evaluate(model, task, problems=None, **kw):  # "solved" whenever scored on the training sample
        seen.append(problems)
        return 1.0 if problems is not None else real(model, task)
    monkeypatch.setattr(recipes, "evaluate", fake_evaluate)
    small = dict(task="add", digits=1, steps=40, n_layer=1, n_embd=32, n_head=2, progress=False)
    _, m = recipes.pretrain(recipes.PretrainConfig(stop_when_solved=True, eval_every=10, **small))
    assert m["stopped_early"] and m["steps"] == 10 and m["max_steps"] == 40
    sample = seen[0]
    assert len(sample) == recipes.VALID_SIZE
    test = {p.prompt for p in Task("add", 1).test_set()}
    assert not {p.prompt for p in sample} & test  # the stopping rule never looks at the test set
    assert [e[0] for e in m["evals"]] == [10]  # the test-set curve asked for by eval_every
    seen.clear()
    _, m = recipes.pretrain(recipes.PretrainConfig(stop_when_solved=False, **small))
    assert not m["stopped_early"] and m["steps"] == 40 and seen == [None]  # one test evaluation, at the end
    # the check interval decides where a run stops, so it is part of the cache name
    key = recipes.PretrainConfig(digits=3).cache_key
    assert key() == recipes.PretrainConfig(digits=3, eval_every=recipes.CHECK_EVERY).cache_key()
    assert key() != recipes.PretrainConfig(digits=3, eval_every=70).cache_key()
    assert recipes.PretrainConfig(digits=2).cache_key() == recipes.PretrainConfig(digits=2, eval_every=70).cache_key()


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json(target, {"a": 1})  # creates the folder
    with pytest.raises(TypeError):
        write_json(target, {"a": object()})  # not JSON-able: fails halfway
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write('{"a": ')
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert not list(target.parent.glob("*.tmp"))

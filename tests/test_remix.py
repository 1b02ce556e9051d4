"""ReMix (constant weights, RLOO router) and the learned-router baseline (MixLoRA)."""

import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_from_scratch.remix as remix
from lora_from_scratch.lora import LoRALinear
from lora_from_scratch.mixlora import MixLoRALinear, MixLoRAOptions, with_balance_loss
from lora_from_scratch.mixture import effective_support_size
from lora_from_scratch.remix import ReMixLinear, ReMixOptions, rloo_loss, sample_selection, selection_log_prob

DRAW = remix.draw  # the real one, for tests that patch it
REPO = Path(__file__).resolve().parent.parent


def closed_form_Q(q, sel):
    """prod_j q_{i_j} / (1 - sum_{j' < j} q_{i_j'}) for one ordered selection."""
    out, used = 1.0, 0.0
    for i in sel:
        out = out * q[i] / (1 - used)
        used = used + q[i]
    return out


def remix_layer(n, k, r=2, d=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = ReMixLinear(nn.Linear(d, d).to(dtype), n, k, r)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would make every selection give the same output
        layer.router.weight.normal_()
    return layer


# ----- the selection distribution Q -----------------------------------------
@pytest.mark.parametrize("n,k", [(4, 2), (5, 3), (3, 3)])
def test_Q_sums_to_one_and_matches_closed_form(n, k):
    logits = torch.randn(n, dtype=torch.float64)
    q = logits.softmax(-1)
    tuples = list(itertools.permutations(range(n), k))
    log_q = selection_log_prob(logits.expand(len(tuples), n), torch.tensor(tuples))
    assert torch.allclose(log_q.exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12)
    for sel, lq in zip(tuples, log_q):
        assert math.isclose(lq.exp().item(), closed_form_Q(q, sel).item(), rel_tol=1e-10)


def test_log_Q_stays_accurate_when_one_lora_holds_almost_all_of_q():
    # q_0 = 1 - 7e-13 rounds to 1 in float32, so the mass left after drawing LoRA 0,
    # computed as 1 - q_0, would be 0 and log Q infinite (1 - q_0 in float64 fails the
    # same way once q_0 is within 1e-16 of 1). Summed over the LoRAs not drawn, it is
    # 7e-13, and the second draw is 1 in 7.
    logits = torch.tensor([[30.0, 0, 0, 0, 0, 0, 0, 0]])
    lq = selection_log_prob(logits, torch.tensor([[0, 3]]))
    assert lq.dtype == torch.float32 and math.isclose(lq.item(), -math.log(7), rel_tol=1e-5)
    # draw's gradient, in float32, the same way: slot 2 draws from the 7 LoRAs left
    hits = F.one_hot(torch.tensor([[0, 3]]), 8).float().permute(1, 2, 0)  # (2, 8, 1)
    _, _, grad = remix.draw(logits.t(), 2, hits)
    l64 = logits.double().requires_grad_()
    expect, = torch.autograd.grad(selection_log_prob(l64, torch.tensor([[0, 3]])).sum(), l64)
    assert torch.allclose(grad.t().double(), expect, atol=1e-6) and abs(grad[3, 0].item() - 6 / 7) < 1e-6


def log_Q_by_autograd(logits, sel):
    """An independent oracle: log Q from the product formula with plain torch
    ops (differentiable by autograd), for (N, n) logits and (N, k) selections."""
    q = logits.softmax(-1)
    out = []
    for t in range(len(sel)):
        lq, used = 0.0, torch.zeros((), dtype=logits.dtype)
        for i in sel[t].tolist():
            lq = lq + q[t, i].log() - torch.log(1 - used)  # the naive form: fine in float64
            used = used + q[t, i]
        out.append(lq)
    return torch.stack(out)


@pytest.mark.parametrize("n,k", [(4, 2), (5, 3), (3, 1), (3, 3)])
def test_log_Q_and_the_closed_form_gradient_of_draw_match_autograd(n, k):
    torch.manual_seed(n + k)
    logits = torch.randn(7, n, dtype=torch.float64, requires_grad=True)
    sel = sample_selection(logits, k)  # (7, k)
    lq, ref = selection_log_prob(logits, sel), log_Q_by_autograd(logits, sel)
    assert torch.allclose(lq, ref, atol=1e-12)
    w = torch.randn(7, dtype=torch.float64)  # any upstream gradient
    expect, = torch.autograd.grad((w * ref).sum(), logits)
    assert torch.allclose(torch.autograd.grad((w * lq).sum(), logits)[0], expect, atol=1e-12)
    hits = F.one_hot(sel, n).double().permute(1, 2, 0)  # (k, n, 7): the same selection, as draw's one-hots
    same, gates, grad = remix.draw(logits.detach().t(), k, hits)  # scores the given hits
    assert same is hits and torch.equal(gates, hits.sum(0))
    assert torch.allclose(grad.t() * w[:, None], expect, atol=1e-12)


def test_score_function_term_has_the_reinforce_gradient():
    # records of layers with different token counts and pool shapes, each a
    # forward over M = 2 stacked copies (copy-major along N): the gradient is
    # sum_m adv_m grad log Q_m, with log Q_m summed over layers and copy m's tokens
    torch.manual_seed(0)
    a = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)  # n = 5, N = 2 x 3
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)  # n = 5, N = 2 x 2
    c = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # n = 3, N = 2 x 2
    draws = [(lg, *remix.draw(lg.detach(), k)[::2]) for lg, k in ((a, 2), (b, 2), (c, 3))]  # logits, hits, grad
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    term = remix.score_function_term([(lg, grad) for lg, _, grad in draws], adv)
    log_q = [selection_log_prob(lg.t(), hits.argmax(1).t()).view(2, -1).sum(1) for lg, hits, _ in draws]  # (2,) each
    expect = torch.autograd.grad((adv * sum(log_q)).sum(), (a, b, c))
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(torch.autograd.grad(term, (a, b, c)), expect))
    with pytest.raises(ValueError, match="stacked copies"):
        remix.score_function_term([(a, draws[0][2])], torch.zeros(4, dtype=torch.float64))  # 6 tokens, 4 copies


def test_draw_takes_k_distinct_loras_even_when_one_holds_all_of_q():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    logits[2, :10] = 500.0  # for 10 tokens, LoRA 2 leads by far more than float32's exp range
    hits, gates, grad = remix.draw(logits, 3)  # (3, 6, 50), (6, 50), (6, 50)
    assert torch.equal(hits.sum(1), torch.ones(3, 50))  # each slot draws exactly one LoRA
    assert torch.equal(gates.amax(0), torch.ones(50)) and torch.equal(gates.sum(0), torch.full((50,), 3.0))  # 3 distinct
    assert torch.equal(hits[0, 2, :10], torch.ones(10))  # the dominant LoRA comes first
    assert torch.isfinite(grad).all()


def test_sampling_frequencies_match_Q():
    torch.manual_seed(0)
    n, k, draws = 4, 2, 40_000
    logits = torch.tensor([1.0, 0.2, -0.5, 0.6])
    idx = sample_selection(logits.expand(draws, n), k)  # (draws, k)
    assert all(len(set(row)) == k for row in idx[:100].tolist())  # without replacement
    counts = torch.bincount(idx[:, 0] * n + idx[:, 1], minlength=n * n).double() / draws
    q = logits.double().softmax(-1)
    for a, b in itertools.permutations(range(n), 2):  # sd of each frequency is under 0.0025
        assert abs(counts[a * n + b].item() - closed_form_Q(q, (a, b)).item()) < 0.01


# ----- RLOO is exactly unbiased ----------------------------------------------
def forced_draws(monkeypatch, draws):
    """Make the layers' draws return ``draws`` (a list of (N, k) index tensors), in order."""
    queue = list(draws)

    def forced(logits, k, hits=None):  # score the forced selection instead of drawing one
        return DRAW(logits, k, F.one_hot(queue.pop(0), logits.shape[0]).to(logits.dtype).permute(1, 2, 0))
    monkeypatch.setattr(remix, "draw", forced)
    return queue


@pytest.mark.parametrize("n,k,tokens,layers,M", [(4, 2, 1, 1, 2), (3, 2, 1, 1, 3), (3, 1, 2, 1, 2),
                                                 (3, 1, 1, 2, 2)])
def test_rloo_gradient_is_exactly_unbiased(monkeypatch, n, k, tokens, layers, M):
    """E over all M-tuples of selections of the RLOO surrogate's gradient ==
    the autograd gradient of the exact expected loss sum_J Q(J) L(J), for
    every parameter (routers and LoRAs), in float64."""
    d = 5
    mods = [remix_layer(n, k, d=d, seed=s) for s in range(layers)]
    model = nn.Sequential(*[m for layer in mods for m in (layer, nn.Tanh())])
    model.train()
    torch.manual_seed(10)
    x, target = torch.randn(tokens, d, dtype=torch.float64), torch.randn(tokens, d, dtype=torch.float64)

    def loss_fn(model, batch):
        return ((model(batch) - target) ** 2).sum(), {}

    # every joint selection J: one ordered k-tuple per (layer, token)
    per_site = list(itertools.permutations(range(n), k))
    joint = list(itertools.product(per_site, repeat=layers * tokens))

    def draws_of(J):  # the index tensor each layer's draw returns, layer by layer
        return [torch.tensor(J[l * tokens:(l + 1) * tokens]) for l in range(layers)]

    # Oracle: E[L] = sum_J Q(J) L(J), Q from the closed form on the router logits
    inputs = []  # each ReMix layer's input; its router reads it detached
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0]))) for m in mods]
    expected, probs = 0.0, []
    for J in joint:
        inputs.clear()
        forced_draws(monkeypatch, draws_of(J))
        L, _ = loss_fn(model, x)
        Q = 1.0
        for l, (mod, inp) in enumerate(inputs):
            lg = mod.router(inp.detach())  # (tokens, n)
            for t in range(tokens):
                Q = Q * closed_form_Q(lg[t].softmax(-1), J[l * tokens + t])
        probs.append(Q.detach())
        expected = expected + Q * L
    for h in hooks:
        h.remove()
    assert math.isclose(sum(p.item() for p in probs), 1.0, rel_tol=1e-12)
    params = [p for p in model.parameters() if p.requires_grad]
    exact = torch.autograd.grad(expected, params)

    # RLOO: the surrogate's gradient for every M-tuple of joint selections, weighted by its probability
    surrogate = rloo_loss(loss_fn, M)
    mean = [torch.zeros_like(p) for p in params]
    for tup in itertools.product(range(len(joint)), repeat=M):
        forced_draws(monkeypatch, [t for j in tup for t in draws_of(joint[j])])
        loss, _ = surrogate(model, x)
        weight = math.prod(probs[j] for j in tup)
        for acc, g in zip(mean, torch.autograd.grad(loss, params)):
            acc += weight * g
    for p, e, g in zip(params, exact, mean):
        assert torch.allclose(g, e, atol=1e-6, rtol=0), (p.shape, (g - e).abs().max())
    router_grad = exact[[i for i, p in enumerate(params) if p is mods[0].router.weight][0]]
    assert router_grad.abs().max() > 1e-3  # the router has something to learn: the test can fail


def _remix_gpt(tiny_model):
    from lora_from_scratch.recipes import adapt
    model = tiny_model(n_layer=2).double()
    adapt(model, "remix", 2, 4.0, "lora", {"experts": 4, "active": 2, "selections": 3})
    with torch.no_grad():  # B != 0, or every selection gives the base model and the same loss
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    return model.train()


def _sft_batch():
    from lora_from_scratch.data import train_batches
    from lora_from_scratch.tasks import Task
    from lora_from_scratch.tokenizer import Tokenizer
    return train_batches(Task("sub", 2), Tokenizer(), 6, 0)(0)


def _grpo_objective_and_batch():
    from lora_from_scratch.grpo import GRPOConfig, GRPOObjective, rl_batches
    from lora_from_scratch.tasks import Task

    class FirstCharDigit(Task):  # a reward an untrained model sometimes earns
        def reward(self, prediction, answer):
            return float(prediction[:1].isdigit())

    obj = GRPOObjective(GRPOConfig(group_size=4, log_kl=False), FirstCharDigit("add", 1))
    return obj, rl_batches(obj.task, 8, seed=2)(0)


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_stacked_copies_equal_separate_calls_with_the_same_selections(monkeypatch, tiny_model, objective):
    """rloo_loss with a loss that takes ``copies`` runs the M selections as M
    stacked copies in one pass. Replaying the very same selections through M
    separate calls (the plain path) gives the same surrogate value, metrics
    and gradient of every parameter: stacking changes the speed, not the math."""
    from lora_from_scratch.train import sft_loss
    model, M = _remix_gpt(tiny_model), 3
    if objective == "sft":
        loss_fn, batch = sft_loss, _sft_batch()
    else:
        loss_fn, batch = _grpo_objective_and_batch()
        torch.manual_seed(0)
        loss_fn.rollouts(model, batch)  # sampled once, reused by both paths
    assert remix.takes_copies(loss_fn) and not remix.takes_copies(lambda m, b: loss_fn(m, b))
    params = [p for p in model.parameters() if p.requires_grad]

    drawn = []  # the drawn (N, k) indices, layer by layer

    def recording(logits, k, hits=None):
        out = DRAW(logits, k, hits)
        drawn.append(out[0].argmax(1).t())
        return out
    monkeypatch.setattr(remix, "draw", recording)
    torch.manual_seed(1)
    stacked, m_stacked = rloo_loss(loss_fn, M)(model, batch)
    g_stacked = torch.autograd.grad(stacked, params)
    assert len(drawn) == 2 * 6  # one draw per ReMix layer (2 blocks x 6 linears), all copies at once

    # the same selections, copy by copy: copy m is rows m N .. (m+1) N - 1 of every draw
    forced_draws(monkeypatch, [d.view(M, -1, d.shape[-1])[m] for m in range(M) for d in drawn])
    plain, m_plain = rloo_loss(lambda m, b: loss_fn(m, b), M)(model, batch)
    g_plain = torch.autograd.grad(plain, params)
    assert torch.allclose(stacked, plain, atol=1e-12, rtol=0)
    assert m_stacked.keys() == m_plain.keys()
    assert objective == "grpo" or m_stacked["loss_spread"] > 0  # GRPO's loss value ignores the routing at mu = 1
    routing = ("ess_min", "ess_mean", "router_ess_min", "router_ess_mean", "max_weight")  # of the last forward:
    same = [key for key in m_plain if key not in routing]  # all M copies when stacked, the last one otherwise
    assert "loss_spread" in same and all(math.isclose(m_stacked[key], m_plain[key], rel_tol=1e-9) for key in same)
    routers = [g for p, g in zip(params, g_stacked) if p is model.blocks[0].attn.q_proj.router.weight]
    assert routers and routers[0].abs().max() > 1e-6  # the router term is in the comparison
    for p, a, b in zip(params, g_stacked, g_plain):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), (p.shape, (a - b).abs().max())


def test_takes_copies_reads_the_callable_itself():
    import functools

    from lora_from_scratch.train import sft_loss
    assert remix.takes_copies(sft_loss) and remix.takes_copies(functools.partial(sft_loss))
    wrapped = functools.wraps(sft_loss)(lambda model, batch: sft_loss(model, batch))
    assert not remix.takes_copies(wrapped)  # its own signature has no copies, whatever it wraps


def test_a_stacked_loss_that_ran_one_copy_is_caught():
    layer = remix_layer(4, 2)

    def unstacked(model, batch, copies=None):  # right shapes returned, but the model saw one copy
        loss = model(batch).sum()
        return torch.stack([loss] * copies), [{}] * copies

    with pytest.raises(ValueError, match="stacked copies"):
        rloo_loss(unstacked, 2)(nn.Sequential(layer), torch.randn(3, 5, dtype=torch.float64))


def test_stacked_loss_must_return_one_loss_per_copy():
    layer = remix_layer(4, 2)

    def bad(model, batch, copies=None):
        return model(batch).sum(), [{}] * (copies or 1)

    with pytest.raises(ValueError, match="must return a"):
        rloo_loss(bad, 2)(nn.Sequential(layer), torch.randn(3, 5, dtype=torch.float64))


def test_equal_losses_give_the_router_zero_gradient():
    layer = remix_layer(4, 2)
    with torch.no_grad():
        layer.lora_B.zero_()  # every selection gives the base output, so all M losses are equal
    x = torch.randn(7, 5, dtype=torch.float64)
    loss, metrics = rloo_loss(lambda m, b: (m(b).square().sum(), {}), 4)(nn.Sequential(layer), x)
    loss.backward()
    assert metrics["loss_spread"] == 0.0
    assert torch.equal(layer.router.weight.grad, torch.zeros_like(layer.router.weight))


def test_plain_loss_gives_the_router_no_gradient():
    layer = remix_layer(4, 2)
    layer.train()
    layer(torch.randn(7, 5, dtype=torch.float64)).square().sum().backward()
    assert layer.router.weight.grad is None and layer.lora_B.grad is not None


def test_rloo_value_is_the_mean_loss_and_metrics(monkeypatch):
    layer = remix_layer(4, 2)
    x = torch.randn(3, 5, dtype=torch.float64)
    sels = [torch.tensor([[0, 1]] * 3), torch.tensor([[2, 3]] * 3), torch.tensor([[1, 3]] * 3)]
    forced_draws(monkeypatch, sels)
    loss, metrics = rloo_loss(lambda m, b: (m(b).sum(), {"extra": 1.0}), 3)(nn.Sequential(layer), x)
    layer.eval()
    singles = []
    for s in sels:  # the same selections, without the router term
        g = torch.zeros(3, 4, dtype=torch.float64).scatter_(-1, s, 1.0)
        A, B = layer.pool()
        h = (x @ A.T).unflatten(-1, (4, 2)) * (layer.omega * g).unsqueeze(-1)
        singles.append((layer.base(x) + h.flatten(-2) @ B.T).sum())
    assert torch.allclose(loss, torch.stack(singles).mean())
    assert math.isclose(metrics["loss_spread"], (max(singles) - min(singles)).item(), rel_tol=1e-9)
    assert metrics["extra"] == 1.0 and metrics["ess_min"] == metrics["ess_mean"] == 2.0
    assert layer.record is None  # recording ends with the call


# ----- the layer ---------------------------------------------------------------
def test_k_equals_n_is_a_fixed_rank_nr_lora():
    n, r, d = 3, 2, 6
    mix = remix_layer(n, n, r=r, d=d)
    lora = LoRALinear(mix.base, n * r, alpha=2.0)  # c = 2 / (n r) = omega
    with torch.no_grad():
        lora.lora_A.copy_(mix.lora_A.flatten(0, 1))
        lora.lora_B.copy_(mix.lora_B.permute(1, 0, 2).flatten(1))
    x = torch.randn(4, 3, d, dtype=torch.float64)
    for mode in (True, False):
        mix.train(mode)
        assert torch.allclose(mix(x), lora(x), atol=1e-12)
    assert torch.allclose(mix.delta_weight(), lora.delta_weight(), atol=1e-12)
    before = mix(x)
    mix.merge()
    assert torch.allclose(mix(x), before, atol=1e-12)


def test_eval_is_the_deterministic_top_k():
    layer = remix_layer(6, 2).eval()
    x = torch.randn(9, 5, dtype=torch.float64)
    g = torch.zeros(9, 6, dtype=torch.float64).scatter_(-1, layer.router(x).topk(2, -1).indices, 1.0)
    A, B = layer.pool()
    h = (x @ A.T).unflatten(-1, (6, 2)) * (layer.omega * g).unsqueeze(-1)
    expected = layer.base(x) + h.flatten(-2) @ B.T
    assert torch.equal(layer(x), layer(x))
    assert torch.allclose(layer(x), expected, atol=1e-12)
    with torch.no_grad():  # generate's path (_ReMixLinearFn.compute, no autograd node)
        assert torch.allclose(layer(x.view(3, 3, 5)), expected.view(3, 3, 5), atol=1e-12)
        no_bias = ReMixLinear(nn.Linear(5, 5, bias=False).double(), 6, 2, 2).eval()
        for name in ("base.weight", "lora_A", "lora_B", "router.weight"):
            no_bias.get_parameter(name).copy_(layer.get_parameter(name))
        assert torch.allclose(no_bias(x), expected - layer.base.bias, atol=1e-12)
    layer.train()  # training draws: some token's output differs from the top-k one
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), expected)


def test_forward_equals_adapter_output():
    layer = remix_layer(5, 2).eval()  # the fused forward vs the plain-autograd adapter_output
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    assert torch.allclose(layer(x), layer.adapter_output(x, layer.base(x)), atol=1e-12)


def test_written_out_backward_matches_finite_differences():
    """_ReMixLinearFn's backward against gradcheck: y in every input but the
    router, the logits in the router's weight P. Eval mode, so the gates
    are the top-k and do not move under gradcheck's small steps."""
    layer = remix_layer(4, 2, d=5).eval()
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    W, b, P, A, B = (t.detach().clone().requires_grad_() for t in
                     (layer.base.weight, layer.base.bias, layer.router.weight, layer.lora_A, layer.lora_B))

    def fn(*args):
        return remix._ReMixLinearFn.apply(*args, layer)

    assert torch.autograd.gradcheck(lambda x, W, b, A, B: fn(x, W, b, P.detach(), A, B)[0], (x, W, b, A, B))
    assert torch.autograd.gradcheck(lambda P: fn(x.detach(), W, b, P, A, B)[1], (P,))
    # the router reads x detached: a gradient on the logits reaches P, not x
    y, logits, _, _ = fn(x, W, b, P, A, B)
    logits.sum().backward()
    assert x.grad is None and P.grad is not None and A.grad is None
    out = layer.train()(x)  # a fresh tensor, not a view: the caller may change it in place
    out.add_(1.0).sum().backward()
    assert x.grad is not None


def test_zero_B_gives_the_base_output_for_every_selection():
    torch.manual_seed(0)
    layer = ReMixLinear(nn.Linear(5, 7), 4, 2, 2).train()
    x = torch.randn(20, 5)
    for _ in range(5):
        assert torch.equal(layer(x), layer.base(x))


def test_effective_support_size():
    assert torch.allclose(effective_support_size(torch.eye(5)), torch.ones(5))
    assert math.isclose(effective_support_size(torch.ones(6)).item(), 6.0, rel_tol=1e-6)
    assert math.isclose(effective_support_size(torch.tensor([0.0, 3.0, 3.0])).item(), 2.0, rel_tol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        effective_support_size(torch.tensor([1.0, -1.0]))


def test_remix_logs_ess_k_and_router_ess():
    layer = remix_layer(5, 3).train()
    layer(torch.randn(11, 5, dtype=torch.float64))
    stats = layer.routing_stats()
    assert math.isclose(stats["ess"], 3.0, rel_tol=1e-6) and math.isclose(stats["max_weight"], 1 / 3, rel_tol=1e-6)
    assert 1.0 <= stats["router_ess"] <= 5.0


# ----- the learned-router baseline -------------------------------------------
def test_mixlora_weights_renormalise_over_the_k_and_train_the_router():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(5, 5).double(), 6, 3, 2).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 5, dtype=torch.float64)
    w = layer.gates(layer.router(x)) / layer.k  # (8, 6)
    assert torch.allclose(w.sum(-1), torch.ones(8, dtype=torch.float64))
    assert ((w > 0).sum(-1) == 3).all()
    top = layer.router(x).softmax(-1).topk(3, -1)
    assert torch.allclose(w.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))
    layer(x).square().sum().backward()  # a plain loss trains this router
    assert layer.router.weight.grad.abs().max() > 0


def test_mixlora_uniform_weights_equal_remix():
    remix_l = remix_layer(4, 2).eval()
    mix = MixLoRALinear(remix_l.base, 4, 2, 2).eval()
    with torch.no_grad():
        mix.lora_A.copy_(remix_l.lora_A)
        mix.lora_B.copy_(remix_l.lora_B)
        for m in (mix, remix_l):  # q uniform: MixLoRA's k weights are 1/k each, times k omega
            m.router.weight.zero_()
    x = torch.randn(6, 5, dtype=torch.float64)
    assert torch.allclose(mix(x), remix_l(x), atol=1e-12)
    assert not torch.allclose(mix(x), mix.base(x))


def test_balance_loss_wrapper():
    torch.manual_seed(0)
    layer = MixLoRALinear(nn.Linear(5, 5).double(), 4, 2, 2)
    model = nn.Sequential(layer).train()
    x = torch.randn(50, 5, dtype=torch.float64)
    loss, metrics = with_balance_loss(lambda m, b: (m(b).sum(), {}), coef=0.5)(model, x)
    q = layer.router(x).softmax(-1)
    f = torch.bincount(q.topk(2, -1).indices.flatten(), minlength=4).double() / (50 * 2)
    balance = 4 * (f * q.mean(0)).sum()
    assert math.isclose(metrics["balance"], balance.item(), rel_tol=1e-9)
    assert torch.allclose(loss, model(x).sum() + 0.5 * balance)
    assert layer.record is None


# ----- bad input -------------------------------------------------------------------
def test_errors():
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="at most n"):
        ReMixLinear(lin, 2, 3, 2)
    with pytest.raises(ValueError, match="k \\(active\\)"):
        ReMixLinear(lin, 2, 0, 2)
    with pytest.raises(ValueError, match="omega"):
        ReMixLinear(lin, 4, 2, 2, omega="none")
    with pytest.raises(ValueError, match="M >= 2"):
        rloo_loss(lambda m, b: (m(b), {}), 1)
    with pytest.raises(ValueError, match="k in 1..n = 1..4"):
        sample_selection(torch.zeros(3, 4), 5)
    with pytest.raises(ValueError, match=r"shape \(k, n, N\) = \(2, 4, 3\)"):
        remix.draw(torch.zeros(4, 3), 2, torch.zeros(3, 4, 3))  # 3 slots of one-hots for k = 2
    with pytest.raises(ValueError, match="dtype torch.float32"):
        remix.draw(torch.zeros(4, 3), 2, torch.zeros(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="selections"):
        ReMixOptions(selections=1)
    with pytest.raises(ValueError, match="at most n"):
        MixLoRAOptions(experts=2, active=3)
    assert lin.weight.requires_grad  # a refused layer left its base alone
    layer = ReMixLinear(lin, 4, 2, 2)
    with pytest.raises(ValueError, match="k == n"):
        layer.merge()
    with pytest.raises(ValueError, match="ReMixLinear"):
        rloo_loss(lambda m, b: (m(b).sum(), {}), 2)(nn.Linear(2, 2), torch.randn(1, 2))


def test_finetune_through_the_method_table(tiny_model):
    from lora_from_scratch.recipes import FinetuneConfig, PretrainConfig, finetune
    base = tiny_model()
    for method, opts in (("remix", {"experts": 4, "active": 2, "selections": 2}),
                         ("mixlora", {"experts": 4, "active": 2})):
        cfg = FinetuneConfig(method=method, rank=2, options=opts, task="add", digits=1, steps=3, batch_size=8,
                             base=PretrainConfig(digits=1), progress=False)
        model, metrics = finetune(cfg, base_model=base)
        assert len(metrics["routing_by_layer"]) == 6 and metrics["steps"] == 3
        assert metrics["train_log"][-1]["step"] == 3 and "ess_min" in metrics["train_log"][-1]
        layers = [m for m in model.modules() if hasattr(m, "router")]
        assert metrics["trainable_parameters"] == sum(  # n LoRAs (r (in + out) each) and an (n, in) router
            m.n * (m.r * (m.in_features + m.out_features) + m.in_features) for m in layers)
    with pytest.raises(ValueError, match="--omega"):
        finetune(FinetuneConfig(method="remix", scale="rslora", steps=1, progress=False), base_model=base)


def test_cli_flags(tiny_model, tmp_path, capsys):
    from lora_from_scratch.__main__ import main
    from lora_from_scratch.checkpoint import save_model
    ck, out = tmp_path / "base.pt", tmp_path / "m.json"
    save_model(tiny_model(), ck)
    common = ["--base", str(ck), "--task", "add", "--digits", "1", "--steps", "2", "--batch-size", "8",
              "--quiet", "--device", "cpu"]
    assert main(["finetune", "--method", "remix", "--experts", "4", "--active", "2", "--rank", "2",
                 "--selections", "3", "--omega", "rslora", *common, "--metrics-out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["options"] == {"experts": 4, "active": 2, "selections": 3, "omega": "rslora"}
    assert m["train_log"][-1]["ess_min"] == 2.0 and "loss_spread" in m["train_log"][-1]
    assert main(["finetune", "--method", "remix", "--selections", "1", *common]) == 2
    assert main(["finetune", "--method", "mixlora", "--selections", "2", *common]) == 2
    err = capsys.readouterr().err
    assert "M) must be an int >= 2" in err and "--selections is an option of --method remix" in err


def test_benchmark_joins_speed_runs_into_one_table(tmp_path):
    spec = importlib.util.spec_from_file_location("remix_vs_mixlora", REPO / "benchmarks" / "remix_vs_mixlora.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = {"threads": 1, "speed_reps": 3, "batch_size": 8, "task": "sub", "digits": "2", "experts": 8,
                "active": 2, "rank": 4}
    files = []
    for i, ratio in enumerate((2.5, 2.8, 2.6)):  # remix M=2 step ratios: 1.25, 1.40, 1.30 per M
        speed = {"lora r=kr": {"step_ratio": 1.0, "eval_ratio": 1.0, "step_ms": 10.0 + i, "eval_ms": 4.0},
                 "remix M=2": {"step_ratio": ratio, "eval_ratio": 1.3, "step_ms": 30.0, "eval_ms": 5.0}}
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps({"settings": settings, "rows": {}, "speed": speed}))
    out_json, out_txt = tmp_path / "runs.json", tmp_path / "runs.txt"
    res = bench.main(["--from-json", ",".join(map(str, files)), "--json", str(out_json), "--txt", str(out_txt)])
    assert len(res["runs"]) == 3 and len(json.loads(out_json.read_text())["runs"]) == 3
    text = out_txt.read_text()
    assert "| 2 | 1 | 11.0 | 1.40 | 1.30x |" in text
    assert "remix M=2, step time per M: min 1.25, median 1.30, max 1.40 over 3 runs" in text
    trained = tmp_path / "trained.json"  # a run with training rows cannot join a speed table
    trained.write_text(json.dumps({"settings": settings, "rows": {"lora r=kr": []}, "speed": {}}))
    with pytest.raises(SystemExit):
        bench.main(["--from-json", f"{files[0]},{trained}", "--json", str(out_json), "--txt", str(out_txt)])
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0", "--speed-only"])

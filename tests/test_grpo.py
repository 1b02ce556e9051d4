import pytest
import torch

from lora_from_scratch.adapters import adapter_layers, adapters_disabled
from lora_from_scratch.grpo import (GRPOConfig, GRPOObjective, aggregate, group_advantages, grpo_loss, k3_kl,
                                    rl_batches, sample_rollouts, token_logprobs)
from lora_from_scratch.methods import METHODS
from lora_from_scratch.model import GPTConfig, TinyGPT
from lora_from_scratch.recipes import adapt
from lora_from_scratch.rl import RLConfig
from lora_from_scratch.tasks import Task
from lora_from_scratch.train import TrainConfig, train


class FirstCharDigit(Task):
    """A toy reward an untrained model earns about one time in five: its
    completion starts with a digit. Groups then hold both rewards."""

    def reward(self, prediction, answer):
        return float(prediction[:1].isdigit())


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))


def lora_model(seed=0, nonzero=True):
    model = tiny(seed)
    adapt(model, "lora", 4, 8.0, "lora")
    if nonzero:  # B = 0 at init: give the adapters a function of their own
        with torch.no_grad():
            for _, m in adapter_layers(model):
                m.lora_B.normal_(0, 0.3)
    return model


def rollouts(model, task=None, n_prompts=4, G=4, temperature=1.0, seed=0, **kw):
    task = task or FirstCharDigit("wordprob", 1)  # prompts of different lengths: left padding is exercised
    gen = torch.Generator().manual_seed(seed)
    return sample_rollouts(model, task.sample_train(n_prompts, seed=seed), task, group_size=G,
                           temperature=temperature, generator=gen, **kw)


# ----- advantages --------------------------------------------------------------
def test_advantages_zero_for_equal_rewards_and_never_nan():
    adv = group_advantages(torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]), 4)
    assert torch.equal(adv, torch.zeros(8))


def test_advantages_sum_to_zero_shift_and_scale_invariant():
    r = torch.rand(24, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(r, 6)
    assert torch.allclose(adv.view(4, 6).sum(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(group_advantages(r + 3.0, 6), adv, atol=1e-5)
    assert torch.allclose(group_advantages(r * 7.0, 6, eps=0.0), group_advantages(r, 6, eps=0.0), atol=1e-5)
    std = r.view(4, 6).std(1, keepdim=True)  # Bessel's correction
    assert torch.allclose(adv, ((r.view(4, 6) - r.view(4, 6).mean(1, keepdim=True)) / (std + 1e-4)).view(-1))
    none = group_advantages(r * 7.0, 6, scale="none")
    assert torch.allclose(none, 7.0 * group_advantages(r, 6, scale="none"), atol=1e-5)


# ----- k3 ----------------------------------------------------------------------
def test_k3_nonnegative_zero_when_equal_and_unbiased():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert bool((k3_kl(a, b) >= 0).all())
    assert torch.equal(k3_kl(a, a), torch.zeros(1000))
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    mc = float(k3_kl(p.log()[x], q.log()[x]).mean())
    assert mc == pytest.approx(exact, rel=0.03)


# ----- the loss -------------------------------------------------------------------
def lengths_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


def test_aggregations_agree_on_equal_lengths_and_weight_tokens_otherwise():
    g = torch.Generator().manual_seed(1)
    per = torch.randn(4, 6, generator=g)
    same = lengths_mask([6, 6, 6, 6], 6)
    vals = [aggregate(per, same, t, max_new_tokens=6) for t in ("grpo", "dapo", "dr_grpo")]
    assert torch.allclose(vals[0], vals[1]) and torch.allclose(vals[0], vals[2])
    lens = [1, 3, 6, 2]
    mask = lengths_mask(lens, 6)
    for loss_type, weight in [("grpo", lambda n: 1 / (4 * n)), ("dapo", lambda n: 1 / sum(lens)),
                              ("dr_grpo", lambda n: 1 / (4 * 8))]:
        x = per.clone().requires_grad_()
        aggregate(x, mask, loss_type, max_new_tokens=8).backward()
        want = torch.stack([torch.full((6,), weight(n)) for n in lens]) * mask
        assert torch.allclose(x.grad, want), loss_type
    junk = per.masked_fill(mask == 0, float("nan"))  # padded tokens contribute nothing, not even a NaN
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        assert torch.equal(aggregate(junk, mask, loss_type, 8), aggregate(per * mask, mask, loss_type, 8))


@pytest.mark.parametrize("adv_sign", [1.0, -1.0])
def test_clipping_zeroes_the_gradient_exactly_where_clipped(adv_sign):
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.5, 0.9, 1.1, 1.5]])  # below 1-eps, inside, inside, above 1+eps
    logp = ratios.log().requires_grad_()
    A = torch.tensor([adv_sign])
    grpo_loss(logp, old, None, A, torch.ones(1, 4), eps_low=0.2, eps_high=0.2).backward()
    g = logp.grad[0]
    clipped = [3] if adv_sign > 0 else [0]  # A > 0 is clipped above, A < 0 below
    for t in range(4):
        if t in clipped:
            assert g[t] == 0.0
        else:  # d/dlogp of -rho A / 4 = -rho A / 4
            assert float(g[t]) == pytest.approx(-float(ratios[0, t]) * adv_sign / 4)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_mu1_gradient_is_the_advantage_weighted_policy_gradient(beta):
    model = lora_model()
    obj = GRPOObjective(GRPOConfig(group_size=4, beta=beta), FirstCharDigit("wordprob", 1))
    batch = rl_batches(obj.task, 4, seed=3)(0)
    loss, metrics = obj(model, batch)
    assert metrics["clip_frac"] == 0.0  # the ratio is exactly 1
    ro = obj.ro
    assert ro.advantages.abs().sum() > 0, "the test needs groups with mixed rewards"
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    # REINFORCE with the group advantage, per-token mean per completion, plus
    # the KL's gradient beta (1 - pi_ref/pi) per token
    logp = token_logprobs(model, ro)
    m = ro.completion_mask.float()
    weight = -ro.advantages[:, None] + (beta * (1 - torch.exp(ro.ref_logp - logp.detach())) if beta else 0.0)
    surrogate = ((weight * logp * m).sum(1) / m.sum(1)).mean()
    want = torch.autograd.grad(surrogate, params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ----- rollouts ---------------------------------------------------------------------
def test_rollout_logprobs_equal_a_fresh_forward_pass():
    model = lora_model()
    ro = rollouts(model, temperature=0.7)
    assert ro.input_ids.shape[0] == 16 and ro.attention_mask[:, 0].min() == 0  # some prompts are left-padded
    fresh = token_logprobs(model, ro)
    assert torch.allclose(fresh, ro.old_logp, atol=1e-5)
    m = ro.completion_mask
    assert torch.equal(fresh * (1 - m), torch.zeros_like(fresh))  # nothing off the completion
    # the completion mask ends at the first <eos>, which it includes
    for row, cm in zip(ro.input_ids.tolist(), m.tolist()):
        new = row[ro.prompt_len:]
        n = sum(cm)
        assert cm[ro.prompt_len:] == [1] * n + [0] * (len(new) - n)
        assert 2 not in new[:n - 1]
        assert n == len(new) or new[n - 1] == 2


def test_reference_inside_adapters_disabled_equals_the_base_model():
    model = lora_model()
    base = tiny()  # same seed: the weights under the adapters
    ro = rollouts(model, with_ref=True)
    assert torch.allclose(ro.ref_logp, token_logprobs(base, ro), atol=1e-6)
    assert not torch.allclose(ro.ref_logp, ro.old_logp, atol=1e-3)  # the adapters do change the policy
    with adapters_disabled(model):
        pass
    assert torch.allclose(token_logprobs(model, ro), ro.old_logp, atol=1e-5)  # switched back on


def test_full_finetuning_keeps_a_frozen_copy_as_reference():
    model = tiny()
    obj = GRPOObjective(GRPOConfig(group_size=4, beta=0.1), FirstCharDigit("add", 1))
    res = train(model, obj, rl_batches(obj.task, 4, seed=1), TrainConfig(steps=2, lr=1e-2, progress=False))
    assert obj.reference is not model and not any(p.requires_grad for p in obj.reference.parameters())
    ro = obj.ro
    assert torch.allclose(ro.ref_logp, token_logprobs(tiny(), ro), atol=1e-6)  # pi_0, not the trained model
    assert res.metrics[-1]["kl"] > 0


def test_rollouts_are_reused_for_mu_inner_steps_and_repeated_calls():
    model = lora_model(nonzero=False)
    obj = GRPOObjective(GRPOConfig(group_size=4, mu=2), FirstCharDigit("add", 1))
    get = rl_batches(obj.task, 4, mu=2, seed=0)
    assert get(0)["rollout_id"] == get(1)["rollout_id"] != get(2)["rollout_id"]
    obj(model, get(0))
    first = obj.ro
    obj(model, get(0))  # a second call on the same batch (e.g. a wrapper that calls M times)
    assert obj.ro is first
    assert obj.ro.advantages.abs().sum() > 0
    train(model, obj, get, TrainConfig(steps=2, lr=3e-2, progress=False))
    assert obj.ro is first  # the second inner step still uses the rollouts of step 0
    # the old log-probs stay those of the sampling policy; the model has moved
    assert not torch.allclose(token_logprobs(model, first), first.old_logp, atol=1e-4)
    obj(model, get(2))
    assert obj.ro is not first


@pytest.mark.parametrize("method", list(METHODS))
def test_one_grpo_step_with_every_adapter_type(method):
    model = tiny()
    wrap = adapt(model, method, 4, 8.0, "lora")
    obj = GRPOObjective(GRPOConfig(group_size=4, beta=0.04), FirstCharDigit("add", 1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = train(model, wrap(obj), rl_batches(obj.task, 8, seed=2), TrainConfig(steps=1, lr=1e-2, progress=False))
    assert obj.ro.advantages.abs().sum() > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert {"reward", "kl", "clip_frac", "length"} <= set(res.metrics[0])


# ----- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(group_size=1), "group_size"), (dict(beta=-0.1), "beta"), (dict(loss_type="ppo"), "loss_type"),
    (dict(temperature=0.0), "temperature"), (dict(mu=0), "mu"), (dict(scale="batch"), "scale"),
    (dict(eps_low=1.0), "eps_low"),
])
def test_bad_settings_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kw)
    with pytest.raises(ValueError, match=match):
        RLConfig(**{ {"scale": "adv_scale"}.get(k, k): v for k, v in kw.items()})


def test_bad_inputs_to_the_functions_raise():
    with pytest.raises(ValueError, match="does not divide"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(10), 1)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="beta"):
        grpo_loss(x, x, None, torch.zeros(2), x, beta=-1.0)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(x, x, None, torch.zeros(2), x, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(x, x, None, torch.zeros(2), x, loss_type="sum")
    with pytest.raises(ValueError, match="max_new_tokens"):
        grpo_loss(x, x, None, torch.zeros(2), x, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(x, x, None, torch.zeros(3), x)
    with pytest.raises(ValueError, match="temperature"):
        rollouts(tiny(), temperature=0.0)
    with pytest.raises(ValueError, match="algo"):
        RLConfig(algo="ppo")
    with pytest.raises(ValueError, match="rollout_id"):
        GRPOObjective(GRPOConfig(), Task("add", 1))(tiny(), {"problems": []})


def test_remix_router_learns_under_grpo_at_one_inner_step():
    """At mu = 1 GRPO's loss value is -mean(A) whatever the routing (the ratio
    is exactly 1), so RLOO comparing loss values would give ReMix's router
    no gradient. The objective reports the policy-gradient surrogate -A logp
    as ``selection_loss``; it depends on the routing, and the router learns."""
    model = tiny()
    wrap = adapt(model, "remix", 2, 4.0, "lora", {"experts": 4, "active": 2, "selections": 2})
    with torch.no_grad():  # B != 0, or every routing gives the base model
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    obj = GRPOObjective(GRPOConfig(group_size=4, log_kl=False), FirstCharDigit("add", 1))
    batch = rl_batches(obj.task, 8, seed=2)(0)
    torch.manual_seed(0)
    plain = [obj(model, batch) for _ in range(3)]  # three routings of the same rollouts
    assert obj.ro.advantages.abs().sum() > 0
    assert len({round(float(loss.detach()), 6) for loss, _ in plain}) == 1  # the loss value ignores the routing
    assert len({round(m["selection_loss"], 6) for _, m in plain}) > 1  # the surrogate does not
    loss, _ = wrap(obj)(model, batch)
    loss.backward()
    routers = [p.grad for n, p in model.named_parameters() if "router" in n]
    assert routers and all(g is not None for g in routers)
    assert sum(float(g.abs().sum()) for g in routers) > 0


@pytest.mark.parametrize("kw, match", [
    (dict(rank=2.5), "rank"), (dict(scale="bogus"), "scale"), (dict(alpha=float("nan")), "alpha"),
    (dict(method="dylora", options={"train_ranks": (1, 99)}), "train_ranks"),
    (dict(method="lora", options={"unfrozen": True}), "no option"),
])
def test_rl_config_checks_the_adapter_settings_as_finetune_does(kw, match):
    from lora_from_scratch.recipes import FinetuneConfig
    with pytest.raises((ValueError, TypeError), match=match):
        RLConfig(**kw)
    with pytest.raises((ValueError, TypeError), match=match):
        FinetuneConfig(**kw)

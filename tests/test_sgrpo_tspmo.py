"""S-GRPO's token selection and loss; T-SPMO's prefix-tree advantages and loss."""

import random

import pytest
import torch

from lora_from_scratch.sgrpo import select_tokens
from lora_from_scratch.tspmo import gradient_fraction, tspmo_advantages, tspmo_token_advantages


# ----- S-GRPO selection ----------------------------------------------------------
def _ragged_mask(lengths, T=12):
    return torch.tensor([[1] * n + [0] * (T - n) for n in lengths])


def test_selection_keeps_first_alpha_and_respects_cap():
    mask = _ragged_mask([12, 7, 3, 1, 0, 10] * 20)
    g = torch.Generator().manual_seed(0)
    for alpha, p, k in [(0, 0.3, None), (2, 0.5, 4), (3, 0.0, None), (5, 1.0, 3), (0, 1.0, 1)]:
        keep = select_tokens(mask, alpha, p, k, generator=g)
        assert keep.dtype == torch.bool and not (keep & ~mask.bool()).any()  # only real tokens
        lengths = mask.sum(1)
        always = alpha if k is None else min(alpha, k)
        first = torch.arange(12)[None] < torch.minimum(lengths, torch.tensor(always))[:, None]
        assert (keep[first]).all()  # the first alpha tokens (within the cap) are always kept
        if k is not None:
            assert int(keep.sum(1).max()) <= k
        if p == 0.0:
            assert torch.equal(keep, first)


def test_selection_p_one_no_cap_keeps_everything_and_rate_follows_p():
    mask = _ragged_mask([12, 5, 9, 1] * 50)
    assert torch.equal(select_tokens(mask, 0, 1.0, None), mask.bool())
    keep = select_tokens(mask, 1, 0.3, None, generator=torch.Generator().manual_seed(1))
    later = mask.bool() & (mask.cumsum(1) > 1)  # tokens after the first
    rate = keep[later].float().mean().item()
    assert 0.25 < rate < 0.35  # ~1500 draws at p = 0.3: 5 standard deviations is 0.06


def test_selection_is_seeded():
    mask = _ragged_mask([12, 7] * 8)
    a = select_tokens(mask, 1, 0.5, generator=torch.Generator().manual_seed(5))
    b = select_tokens(mask, 1, 0.5, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    c = select_tokens(mask, 1, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, b) and torch.equal(c, select_tokens(mask, 1, 0.5))


@pytest.mark.parametrize("kw, match", [(dict(p=1.5), "p"), (dict(p=-0.1), "p"), (dict(k=0), "k"),
                                       (dict(alpha=-1), "alpha"), (dict(alpha=1.5), "alpha")])
def test_selection_errors(kw, match):
    args = dict(alpha=1, p=0.5, k=None) | kw
    with pytest.raises(ValueError, match=match):
        select_tokens(_ragged_mask([3]), **args)


# ----- T-SPMO advantages ---------------------------------------------------------
def test_identical_completions_give_no_pairs():
    assert tspmo_advantages([[4, 5, 2]] * 4, [1.0, 1.0, 1.0, 1.0]) == {}
    assert tspmo_advantages([[4, 5, 2]] * 3, [1.0, 0.0, 0.5]) == {}  # one path: every edge A = 0


def test_unbranched_shared_prefix_gets_zero_advantage():
    adv = tspmo_advantages([[5, 6, 7, 2], [5, 6, 8, 2]], [1.0, 0.0])
    assert adv == {((5, 6), 7): 0.5, ((5, 6), 8): -0.5}  # (5, 6) and the tails after the branch: 0


def test_hand_built_group():
    comps = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8, 9]]
    rewards = [1.0, 0.0, 1.0, 0.0]
    # root mean 1/2; through 1: {1, 0, 1} -> 2/3; through 7: 0; through 1,2: {1, 0} -> 1/2; through 1,5: 1
    want = {((), 1): 2 / 3 - 1 / 2, ((), 7): 0 - 1 / 2, ((1,), 2): 1 / 2 - 2 / 3, ((1,), 5): 1 - 2 / 3,
            ((1, 2), 3): 1 - 1 / 2, ((1, 2), 4): 0 - 1 / 2}
    got = tspmo_advantages(comps, rewards)
    assert got.keys() == want.keys()
    assert all(got[key] == pytest.approx(want[key]) for key in want)


def test_tree_matches_brute_force_definition():
    rng = random.Random(0)
    for _ in range(50):
        G = rng.randint(2, 6)
        comps = [[rng.randint(3, 5) for _ in range(rng.randint(1, 4))] for _ in range(G)]
        rewards = [float(rng.randint(0, 2)) for _ in range(G)]

        def mean_from(prefix):
            rs = [r for c, r in zip(comps, rewards) if tuple(c[:len(prefix)]) == prefix]
            return sum(rs) / len(rs)

        want = {}
        for c in comps:
            for t in range(len(c)):
                p = tuple(c[:t])
                a = mean_from(p + (c[t],)) - mean_from(p)
                if abs(a) > 1e-9:
                    want[(p, c[t])] = a
        got = tspmo_advantages(comps, rewards)
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want)


def test_token_advantages_place_each_pair_once():
    # two groups of 3; padding after each completion; group 2 all equal reward
    tokens = torch.tensor([[5, 6, 2, 0], [5, 7, 2, 0], [5, 7, 2, 0],
                           [4, 4, 4, 2], [4, 4, 2, 0], [9, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0],
                         [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = tspmo_token_advantages(tokens, mask, rewards, group_size=3)
    want = torch.zeros(6, 4)
    want[0, 1] = 1 - 1 / 3  # (5,) -> 6
    want[1, 1] = 0 - 1 / 3  # (5,) -> 7, placed at its first completion only
    assert torch.allclose(adv, want)
    assert gradient_fraction(adv, mask) == pytest.approx(2 / 18)
    with pytest.raises(ValueError, match="divides"):
        tspmo_token_advantages(tokens, mask, rewards, group_size=4)
    with pytest.raises(ValueError, match="rewards"):
        tspmo_advantages([[1]], [1.0, 2.0])


# ----- the objectives on real rollouts ----------------------------------------------
from lora_from_scratch.adapters import adapter_layers  # noqa: E402
from lora_from_scratch.grpo import GRPOConfig, GRPOObjective, token_logprobs  # noqa: E402
from lora_from_scratch.model import GPTConfig, TinyGPT  # noqa: E402
from lora_from_scratch.recipes import adapt  # noqa: E402
from lora_from_scratch.sgrpo import SGRPOConfig, SGRPOObjective, selected_token_logprobs, sgrpo_loss  # noqa: E402
from lora_from_scratch.tasks import Task  # noqa: E402
from lora_from_scratch.tspmo import TSPMOObjective, tspmo_loss  # noqa: E402


class StartsWithDigit(Task):
    """A reward an untrained model earns now and then, so groups are mixed."""

    def reward(self, prediction, answer):
        return float(prediction[:1].isdigit())


def _lora_model(seed=0):
    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(n_layer=1, n_embd=32, n_head=2))
    adapt(model, "lora", 4, 8.0, "lora")
    with torch.no_grad():  # B != 0: the adapters have a function of their own
        for _, m in adapter_layers(model):
            m.lora_B.normal_(0, 0.3)
    return model


def _objective_and_batch(cls, cfg, seed=0):
    task = StartsWithDigit("wordprob", 1)  # prompts of different lengths: left padding is exercised
    obj = cls(cfg, task, seed=seed)
    batch = {"problems": task.sample_train(4, seed=seed), "rollout_id": 0}
    return obj, batch


def _mixed_rewards(obj, model, batch, seed=0):
    """Sample, then replace the rewards by a fixed mixed pattern (so every group teaches)."""
    ro = obj.rollouts(model, batch)
    g = torch.Generator().manual_seed(seed)
    ro.rewards = torch.randint(0, 2, ro.rewards.shape, generator=g).float()
    ro.rewards[::ro.group_size] = 1 - ro.rewards[1::ro.group_size]  # each group has both rewards
    ro.advantages = obj.advantages(ro.rewards, ro.group_size)
    return ro


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("extra", [dict(), dict(beta=0.1), dict(beta=0.1, mu=2, loss_type="dapo")])
def test_sgrpo_keeping_everything_is_grpo(extra):
    results = []
    for cls, cfg in [(GRPOObjective, GRPOConfig(group_size=4, **extra)),
                     (SGRPOObjective, SGRPOConfig(group_size=4, keep_first=0, keep_prob=1.0, keep_max=None, **extra))]:
        model = _lora_model()
        obj, batch = _objective_and_batch(cls, cfg)
        _mixed_rewards(obj, model, batch)
        if extra.get("mu", 1) > 1:  # an inner step: the policy moved since sampling
            obj.ro.old_logp = obj.ro.old_logp + 0.05 * torch.randn(obj.ro.old_logp.shape) * obj.ro.completion_mask
        loss, metrics = obj(model, batch)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    assert any(a.abs().sum() > 0 for a in g0)


def test_sgrpo_gradient_is_the_mean_over_kept_tokens():
    # mu = 1, beta = 0: d loss / d logp_t = -A_i / (N |K_i|) on kept tokens, 0 elsewhere
    g = torch.Generator().manual_seed(0)
    N, T = 6, 7
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in (7, 5, 3, 1, 6, 2)])
    keep = select_tokens(mask, 1, 0.4, 3, generator=g)
    logp = (-torch.rand(N, T, generator=g)).requires_grad_()
    A = torch.randn(N, generator=g)
    sgrpo_loss(logp, logp.detach(), None, A, mask, keep).backward()
    want = -A[:, None] / (N * keep.sum(1, keepdim=True).clamp(min=1)) * keep
    assert torch.allclose(logp.grad, want, atol=1e-7)


def test_selected_logprobs_equal_the_full_pass_where_needed():
    model = _lora_model()
    obj, batch = _objective_and_batch(GRPOObjective, GRPOConfig(group_size=4))
    ro = obj.rollouts(model, batch)
    need = select_tokens(ro.completion_mask, 1, 0.5, 2, generator=torch.Generator().manual_seed(1))
    need[3] = False  # a row with nothing needed is skipped
    full = token_logprobs(model, ro) * need
    part = selected_token_logprobs(model, ro, need)
    assert torch.allclose(full, part, atol=1e-5)
    weights = torch.randn(need.shape)
    (full * weights).sum().backward()
    g_full = _grads(model)
    model.zero_grad()
    (part * weights).sum().backward()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, _grads(model)))


def test_tspmo_loss_gradient_and_objective():
    # mu = 1, beta = 0: d loss / d logp = -A(p, v) / n_pairs on the placed pairs
    adv = torch.zeros(3, 4)
    adv[0, 1], adv[2, 3], adv[1, 0] = 0.5, -0.25, 1.0
    logp = (-torch.rand(3, 4)).requires_grad_()
    tspmo_loss(logp, logp.detach(), None, adv).backward()
    assert torch.allclose(logp.grad, -adv / 3)

    model = _lora_model()
    obj, batch = _objective_and_batch(TSPMOObjective, GRPOConfig(group_size=4))
    ro = _mixed_rewards(obj, model, batch)
    loss, metrics = obj(model, batch)
    token_adv = tspmo_token_advantages(ro.input_ids, ro.completion_mask, ro.rewards, ro.group_size)
    full = token_logprobs(model, ro)
    assert torch.allclose(loss, tspmo_loss(full, full.detach(), None, token_adv), atol=1e-6)
    assert 0 < metrics["grad_frac"] == pytest.approx(gradient_fraction(token_adv, ro.completion_mask))
    assert metrics["grad_frac"] < 1


def test_sgrpo_selection_is_fixed_per_batch_of_rollouts_and_seeded():
    model = _lora_model()
    obj, batch = _objective_and_batch(SGRPOObjective, SGRPOConfig(group_size=4, keep_prob=0.3))
    ro = obj.rollouts(model, batch)
    first = obj.needed(ro).clone()
    assert torch.equal(obj.needed(ro), first)  # mu inner steps see the same selection
    other, _ = _objective_and_batch(SGRPOObjective, SGRPOConfig(group_size=4, keep_prob=0.3))
    other.rollout_id = obj.rollout_id
    assert torch.equal(other.needed(ro), first)  # same seed, same rollout id: same draw
    with pytest.raises(ValueError, match="keep prob|p \\(keep"):
        SGRPOConfig(keep_prob=2.0)


def test_rl_cli_sgrpo_tspmo_and_rank_allocation(tmp_path):
    import json

    from lora_from_scratch.__main__ import main
    from lora_from_scratch.checkpoint import save_model

    torch.manual_seed(0)
    base = tmp_path / "base.pt"
    save_model(TinyGPT(GPTConfig(n_layer=1, n_embd=32, n_head=2)), base)
    common = ["rl", "--base", str(base), "--task", "add", "--digits", "1", "--steps", "2", "--prompts", "2",
              "--group-size", "2", "--rank", "2", "--eval-every", "0", "--quiet", "--device", "cpu"]
    out = tmp_path / "m.json"
    assert main(common + ["--algo", "sgrpo", "--keep-prob", "0.3", "--keep-max", "2", "--metrics-out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["algo"] == "sgrpo" and m["config"]["algo_options"] == {"keep_prob": 0.3, "keep_max": 2}
    assert main(common + ["--algo", "tspmo", "--rank-allocation", "gradient", "--rank-budget", "9",
                          "--rank-warmup", "2", "--metrics-out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["algo"] == "tspmo" and sum(m["ranks"].values()) == 9 and len(m["ranks"]) == 6
    assert m["share_spread_before"] >= 1 and "share_spread_after" in m
    assert main(common + ["--algo", "grpo", "--keep-prob", "0.3"]) == 2  # an sgrpo flag on grpo: refused
    assert main(common + ["--algo", "grpo", "--rank-allocation", "random", "--rank-budget", "5"]) == 2  # < 6 layers

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
        first = torch.arange(12)[None] < torch.minimum(lengths, torch.tensor(alpha if k is None else min(alpha, k)))[:, None]
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


# ----- the tutorial's exercises, checked against their solutions ------------------
def run_exercise_checks(tutorial: str, solution: str, pairs: dict):
    """Run the tutorial's last python block (the exercises: stubs and
    check_... functions), then each check on the solution's function."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    blocks = re.findall(r"^```python\n(.*?)^```", (root / "tutorials" / tutorial).read_text(), re.S | re.M)
    namespace = {"__name__": "exercises"}
    exec(compile(blocks[-1], tutorial, "exec"), namespace)
    spec = importlib.util.spec_from_file_location("solution", root / "tutorials" / "solutions" / solution)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for check, fn in pairs.items():
        namespace[check](getattr(module, fn))


def test_tutorial_07_exercise_solutions():
    run_exercise_checks("07_sgrpo_tspmo.md", "07_sgrpo_tspmo.py",
                        {"check_pair_advantage": "pair_advantage", "check_expected_kept": "expected_kept"})

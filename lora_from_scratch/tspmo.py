"""T-SPMO: token-level prefix matching (Lee and Tong, arXiv 2504.20834).

GRPO gives every token of a completion the same advantage, so the tokens
all completions of a group share (the first digit that every sample gets
right, say) are pushed up for the right answers and down for the wrong ones
alike: noise. T-SPMO credits the tokens where completions part ways.

Prefix tree. The G completions of one prompt form a tree: a node is a
prefix ``p`` (a tuple of token ids, the empty prefix at the root), and the
edge ``p -> p + (v,)`` is taking token ``v`` after ``p``. Each node keeps
the number of completions through it and the sum of their rewards, so

    A(p, v) = mean reward of the completions that start with p + (v,)
            - mean reward of the completions that start with p

is how much choosing ``v`` after ``p`` changed the expected reward. Where
the tree does not branch, the two sets are the same and ``A = 0``: shared,
unbranched prefixes get no gradient; only branching tokens learn.

Loss over the distinct pairs with ``A != 0`` (the same pair in several
completions of a group is one pair: ``log pi(v | prompt, p)`` is the same
there), normalised by their count:

    loss = -(1 / n_pairs) * sum over pairs of A(p, v) * log pi(v | prompt, p)

written, like GRPO's, as a clipped ratio ``rho = pi / pi_old`` (equal to
the line above in value of the gradient when ``mu = 1``, where rho = 1)
plus ``beta`` times the k3 KL on the same tokens. A pair is trained at the
first completion (lowest row) of its group that contains it.

Shapes: ``tokens``, ``mask`` (B, T) with B = prompts * G, groups
consecutive; ``rewards`` (B,). What the paper leaves open and we chose: the
count that normalises is over the whole batch (all groups together); pairs
whose advantage is within 1e-9 of zero count as zero (float rounding of
equal means); a completion cut at the token limit without <eos> is a prefix
like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .grpo import GRPOConfig, Rollouts, k3_kl
from .sgrpo import SelectiveObjective

ZERO = 1e-9  # |A| at or below this is zero (rounding of equal means)


@dataclass
class PrefixNode:
    count: int = 0  # completions through this prefix
    reward_sum: float = 0.0  # sum of their rewards
    children: dict = field(default_factory=dict)  # next token id -> PrefixNode

    @property
    def mean(self) -> float:
        return self.reward_sum / self.count


def prefix_tree(completions, rewards) -> PrefixNode:
    """The root of the group's prefix tree (see the module docstring)."""
    completions = [[int(t) for t in c] for c in completions]
    rewards = [float(r) for r in (rewards.tolist() if torch.is_tensor(rewards) else rewards)]
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards")
    if not completions:
        raise ValueError("a group needs at least one completion")
    root = PrefixNode()
    for c, r in zip(completions, rewards):
        node = root
        node.count += 1
        node.reward_sum += r
        for v in c:  # walk down, creating nodes on the way
            node = node.children.setdefault(v, PrefixNode())
            node.count += 1
            node.reward_sum += r
    return root


def tspmo_advantages(completions, rewards) -> dict[tuple[tuple[int, ...], int], float]:
    """``{(prefix, next token): A(prefix, next token)}`` for the pairs of one
    group whose advantage is non-zero."""
    out = {}
    stack = [((), prefix_tree(completions, rewards))]
    while stack:  # depth-first over the tree
        prefix, node = stack.pop()
        for v, child in node.children.items():
            a = child.mean - node.mean
            if abs(a) > ZERO:
                out[(prefix, v)] = a
            stack.append((prefix + (v,), child))
    return out


def tspmo_token_advantages(tokens: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """(B, T) advantages with each distinct non-zero pair of a group placed
    once, at the first completion that contains it; 0 everywhere else.
    ``mask`` marks the completion tokens (1) and the padding after them (0)."""
    B, T = tokens.shape
    if tuple(mask.shape) != (B, T) or tuple(rewards.shape) != (B,):
        raise ValueError(f"need tokens and mask (B, T) and rewards (B,), got {tuple(tokens.shape)}, "
                         f"{tuple(mask.shape)}, {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or B % group_size:
        raise ValueError(f"group_size must be an int >= 1 that divides the batch of {B}, got {group_size!r}")
    adv = torch.zeros(B, T, dtype=torch.float32)
    keep = mask.bool().cpu()
    ids, rew = tokens.cpu(), rewards.detach().float().cpu()
    for g in range(0, B, group_size):
        rows = range(g, g + group_size)
        cols = [keep[i].nonzero().flatten().tolist() for i in rows]  # positions of each completion's tokens
        comps = [ids[i, c].tolist() for i, c in zip(rows, cols)]
        pairs = tspmo_advantages(comps, rew[g:g + group_size])
        placed = set()
        for i, comp, c in zip(rows, comps, cols):
            for t, v in enumerate(comp):
                key = (tuple(comp[:t]), v)
                if key in pairs and key not in placed:
                    adv[i, c[t]] = pairs[key]
                    placed.add(key)
    return adv.to(tokens.device)


def tspmo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
               token_adv: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2,
               beta: float = 0.0) -> torch.Tensor:
    """The clipped T-SPMO loss over the tokens with a non-zero advantage,
    normalised by their count (0, with a gradient path, when there are none)."""
    if not (logp.shape == old_logp.shape == token_adv.shape):
        raise ValueError(f"logp, old_logp and token_adv must have one shape, got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(token_adv.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    picked = (token_adv != 0).to(logp.dtype)  # (B, T): the pairs
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    A = token_adv.to(logp.dtype)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        per_token = per_token + beta * k3_kl(logp, ref_logp.detach())
    return (per_token * picked).sum() / picked.sum().clamp(min=1)


def gradient_fraction(token_adv: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the completion tokens that get a gradient under T-SPMO."""
    n = float(mask.sum())
    return float((token_adv != 0).sum()) / n if n else 0.0


class TSPMOObjective(SelectiveObjective):
    """T-SPMO for the shared loop: ``--algo tspmo`` (GRPO's settings; the
    group advantages are replaced by the prefix-tree ones)."""

    config_class = GRPOConfig

    def token_advantages(self, ro: Rollouts) -> torch.Tensor:
        if getattr(self, "_adv_for", None) is not ro:  # once per batch of rollouts
            self._adv = tspmo_token_advantages(ro.input_ids, ro.completion_mask, ro.rewards, ro.group_size)
            self._adv_for = ro
        return self._adv

    def needed(self, ro: Rollouts) -> torch.Tensor:
        return self.token_advantages(ro) != 0

    def weighted(self, ro: Rollouts) -> torch.Tensor:
        return self.needed(ro)

    def loss(self, logp, old_logp, ro: Rollouts) -> torch.Tensor:
        c = self.cfg
        return tspmo_loss(logp, old_logp, ro.ref_logp, self.token_advantages(ro), eps_low=c.eps_low,
                          eps_high=c.eps_high, beta=c.beta)

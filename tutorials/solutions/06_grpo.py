"""Solutions to the exercises of tutorial 06 (GRPO).

Each definition below replaces the stub of the same name in an exercise
block of tutorials/06_grpo.md; the test suite runs each block's checks
against it.
"""

import torch


# Exercise 1: group advantages
def my_advantages(rewards: torch.Tensor, G: int) -> torch.Tensor:
    r = rewards.float().view(-1, G)  # (B, G): one row per prompt
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).view(-1)


# Exercise 2: the clipped surrogate with a KL term
def my_per_token_loss(logp, old_logp, ref_logp, adv, eps_low=0.2, eps_high=0.2, beta=0.04):
    A = adv[:, None]  # (N, 1): the same advantage for every token of a completion
    rho = (logp - old_logp).exp()
    surrogate = torch.min(rho * A, rho.clamp(1 - eps_low, 1 + eps_high) * A)
    d = ref_logp - logp
    return -surrogate + beta * (d.exp() - d - 1)


# Exercise 3: the length bias, measured
def token_weights(n: int, m: int) -> tuple[float, float]:
    return 1 / (2 * n), 1 / (n + m)

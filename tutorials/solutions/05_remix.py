"""Solutions to the exercises of tutorial 05 (ReMix).

Each definition below replaces the stub of the same name in an exercise
block of tutorials/05_remix.md; the exercise checks run against it.
"""

import torch


# Exercise 1: the effective support size
def ess(weights: torch.Tensor) -> torch.Tensor:
    pi = weights / weights.sum(-1, keepdim=True)  # each row sums to 1
    return 1.0 / (pi * pi).sum(-1)


# Exercise 2: the probability of an ordered selection
def ordered_selection_prob(q: torch.Tensor, sel: tuple) -> torch.Tensor:
    prob, used = torch.ones((), dtype=q.dtype), torch.zeros((), dtype=q.dtype)
    for i in sel:  # draw i from what is left: q_i / (1 - mass already drawn)
        prob = prob * q[i] / (1 - used)
        used = used + q[i]
    return prob


# Exercise 3: the RLOO router gradient
def rloo_estimate(losses: torch.Tensor, grad_log_q: torch.Tensor) -> torch.Tensor:
    M = losses.shape[0]
    adv = losses - losses.mean()  # (M,): L_m - mean L = (M-1)/M (L_m - mean of the others)
    return (adv[:, None] * grad_log_q).sum(0) / (M - 1)

"""Solutions to the exercises of tutorial 08 (rank allocation)."""

import math


# Exercise 1: Largest remainder on its own
def largest_remainder(quotas, budget):
    """Floors, then one unit each to the largest fractional parts (ties: the earlier layer)."""
    ranks = [math.floor(q + 1e-9) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - ranks[i]), i))
    for i in order[:budget - sum(ranks)]:
        ranks[i] += 1
    return ranks


# Exercise 2: A rank budget is not a parameter budget
def lora_parameter_count(ranks, shapes):
    """A rank-r LoRA on an in -> out layer: A is (r, in), B is (out, r)."""
    return sum(r * (n_in + n_out) for r, (n_in, n_out) in zip(ranks, shapes))

"""Solutions to the exercises of tutorial 03 (MatryoshkaLoRA).

Each definition below replaces the stub of the same name in an exercise
block of tutorials/03_matryoshka_lora.md; tests/test_exercises.py runs each
block's checks against it.
"""

import math

import torch


# Exercise 1: P from its definition
def my_matryoshka_P(max_rank: int, train_ranks, alpha: float = 1.0) -> torch.Tensor:
    P = torch.zeros(max_rank)
    for i in range(1, max_rank + 1):  # component i (1-based) belongs to every nested LoRA of rank s >= i
        P[i - 1] = sum(alpha / s for s in train_ranks if s >= i)
    return P


# Exercise 2: AURAC
def my_aurac(ranks, accuracies) -> float:
    pairs = sorted(zip(ranks, accuracies))
    if len(pairs) == 1:
        return float(pairs[0][1])
    xs = [math.log2(r) for r, _ in pairs]
    ys = [float(a) for _, a in pairs]
    area = sum((xs[k + 1] - xs[k]) * (ys[k] + ys[k + 1]) / 2 for k in range(len(xs) - 1))  # trapezoids
    return area / (xs[-1] - xs[0])  # divided by the x range: back in accuracy units

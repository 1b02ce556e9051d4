"""Solutions to the exercises of tutorial 02 (DyLoRA).

Each definition below replaces the stub of the same name in an exercise
block of tutorials/02_dylora.md; tests/test_exercises.py runs each block's
checks against it.
"""

import torch


# Exercise 1: the rank-b truncation
def truncated_delta(A, B, b: int, alpha: float) -> torch.Tensor:
    return (alpha / b) * B[:, :b] @ A[:b]  # c(b) B[:, :b] A[:b], (out, in)


# Exercise 2: frozen mode, only component b learns
def frozen_factors(A, B, b: int):
    A_b = torch.cat([A[:b - 1].detach(), A[b - 1:b]], 0)  # (b, in): rows 1..b-1 carry no gradient
    B_b = torch.cat([B[:, :b - 1].detach(), B[:, b - 1:b]], 1)  # (out, b)
    return A_b, B_b

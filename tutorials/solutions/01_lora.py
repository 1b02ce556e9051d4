"""Solutions to the exercises of tutorial 01 (LoRA).

Each definition below replaces the stub of the same name in an exercise
block of tutorials/01_lora.md; tests/test_exercises.py runs each block's
checks against it.
"""

import torch
import torch.nn as nn


# Exercise 1: the LoRA layer's forward and merge
class MyLoRALinear(nn.Module):
    """y = W x + b + (alpha / r) * B A x, with W and b frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        self.merged = False

    def forward(self, x):  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y  # the update is inside base.weight already
        return y + self.scale * (x @ self.lora_A.T) @ self.lora_B.T  # (..., r) then (..., out)

    def merge(self):
        with torch.no_grad():
            self.base.weight += self.scale * self.lora_B @ self.lora_A  # (out, in)
        self.merged = True


# Exercise 2: the backward pass by hand
def lora_grads(x, W, A, B, s, g):
    h = x @ A.T  # (N, r)
    gh = (g @ B) * s  # (N, r): dL/dh, with the scale
    dx = g @ W + gh @ A  # (N, in): through the frozen weight and through the branch
    dA = gh.T @ x  # (r, in)
    dB = s * g.T @ h  # (out, r)
    return dx, dA, dB


# Exercise 3: count the trainable parameters before adding the adapters
def lora_parameter_count(n_layer: int, n_embd: int, r: int, targets) -> int:
    shapes = {"q_proj": (n_embd, n_embd), "k_proj": (n_embd, n_embd), "v_proj": (n_embd, n_embd),
              "o_proj": (n_embd, n_embd), "up_proj": (n_embd, 4 * n_embd), "down_proj": (4 * n_embd, n_embd)}
    names = shapes if targets == "all-linear" else targets
    return n_layer * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)  # r * (in + out) per layer

"""MatryoshkaLoRA (Modoranu, Safaryan, Alistarh 2026; code IST-DASLab/MatryoshkaLoRA).

LoRA at maximum rank R with a fixed diagonal ``P`` (R,) between B and A:

    training forward:   y = W x + b + B diag(P) A x
    P_i = sum over s in S with s >= i of c(s)        (S: training ranks)

Why this P: ``B diag(P) A = sum_{s in S} c(s) B[:, :s] A[:s]``, the sum of
every nested LoRA in S. One forward pass therefore trains all the sub-ranks
at once, every step (DyLoRA trains one sampled rank per step). Component i
is shared by every nested LoRA of rank >= i, which is why P is
non-increasing: P_1 = sum_s c(s), and P_i = 0 for i > max S.

Inference at sub-rank r' does not use P: it is the plain LoRA
``c(r') B[:, :r'] A[:r'] x`` (``set_rank(r')``; ``set_rank(None)`` returns
to the training forward). Beware: a fresh layer is at ``rank=None``, and
stays there in ``eval()`` mode, so ``evaluate``, ``merge`` and
``delta_weight`` use the training function B diag(P) A, which is none of
the nested LoRAs. Call ``set_rank(r)`` (or ``evaluate_ranks``) to get the
rank-r model the method promises. Special cases: S = {R} gives P = c(R) I, plain
LoRA; a random P_t = c(b) diag(1_b, 0) with b ~ Uniform(S) is non-frozen
DyLoRA, whose average is P / |S|.

AURAC (``aurac``) scores a whole rank-accuracy curve with one number: the
trapezoid area under accuracy against log2(rank) (or rank), divided by the
x range, so it stays in the units of accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapters import int_list, option
from .lora import LoRALinear, lora_scale
from .validate import check_int, check_ranks


@dataclass
class MatryoshkaOptions:
    """MatryoshkaLoRA's own settings (besides rank, alpha and scale)."""
    train_ranks: tuple | None = option(None, "the nested ranks S trained at once, e.g. 2,8 "
                                       "(default 1, 2, 4, ..., R)", parse=int_list)

    def __post_init__(self):
        if self.train_ranks is not None:
            self.train_ranks = check_ranks("train_ranks", self.train_ranks)


def default_train_ranks(max_rank: int) -> list[int]:
    """{1, 2, 4, ..., R}: powers of two up to R, and R itself."""
    ranks = [2**i for i in range(max_rank.bit_length()) if 2**i <= max_rank]
    return ranks if ranks[-1] == max_rank else ranks + [max_rank]


def matryoshka_P(max_rank: int, train_ranks=None, scale: str = "lora", alpha: float = 1.0) -> torch.Tensor:
    """The diagonal P (max_rank,): P_i = sum of c(s) over training ranks s >= i."""
    max_rank = check_int("max_rank", max_rank, 1)
    S = default_train_ranks(max_rank) if train_ranks is None else \
        list(check_ranks("train_ranks", train_ranks, 1, max_rank))
    P = torch.zeros(max_rank, dtype=torch.float64)
    for s in S:  # each nested LoRA of rank s adds c(s) to its first s components
        P[:s] += lora_scale(s, alpha, scale)
    return P.float()


class MatryoshkaLoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, train_ranks=None, scale: str = "lora",
                 dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout=dropout, scale=scale)
        self.train_ranks = default_train_ranks(r) if train_ranks is None else \
            list(check_ranks("train_ranks", train_ranks, 1, r))
        # fixed, derived from (r, S, c): a buffer, not saved with the weights
        self.register_buffer("P", matryoshka_P(r, self.train_ranks, scale, alpha).to(base.weight), persistent=False)
        self.rank = None  # None: the training forward with P; an int: sub-rank inference

    def extra_repr(self) -> str:
        return super().extra_repr() + f", train_ranks={self.train_ranks}"

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "train_ranks": list(self.train_ranks)}

    @property
    def scaling(self):
        """The P vector in the training forward, c(rank) at a sub-rank."""
        return self.P if self.rank is None else lora_scale(self.rank, self.alpha, self.scale_rule)

    def set_rank(self, r: int | None) -> None:
        super().set_rank(r)
        if r is None:
            self.rank = None  # back to the training forward

    def factors(self):
        if self.rank is None:
            return self.lora_A, self.lora_B, self.P
        return super().factors()


def aurac(ranks, accuracies, x: str = "log2") -> float:
    """Area under the rank-accuracy curve, divided by the x range.

    ``sum_k (x_{k+1} - x_k)(a_k + a_{k+1}) / 2 / (x_m - x_1)`` with
    x = log2(rank) (default) or x = rank. One rank: its accuracy.
    """
    ranks, accuracies = list(ranks), [float(a) for a in accuracies]
    if len(ranks) != len(accuracies) or not ranks:
        raise ValueError(f"need as many accuracies as ranks (and at least one), got {len(ranks)} and {len(accuracies)}")
    if x not in ("log2", "linear"):
        raise ValueError(f"x must be 'log2' or 'linear', got {x!r}")
    pairs = sorted(zip(ranks, accuracies))
    rs = [r for r, _ in pairs]
    if rs[0] <= 0 or len(set(rs)) != len(rs):
        raise ValueError(f"ranks must be positive and distinct, got {ranks!r}")
    if len(pairs) == 1:
        return pairs[0][1]
    xs = [math.log2(r) if x == "log2" else float(r) for r in rs]
    area = sum((xs[k + 1] - xs[k]) * (pairs[k][1] + pairs[k + 1][1]) / 2 for k in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])

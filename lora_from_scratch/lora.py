"""LoRA: Low-Rank Adaptation (Hu et al. 2021, arXiv 2106.09685).

A frozen linear layer ``y = W x + b`` (W: out x in) learns a change of rank
at most R instead of a full (out x in) update:

    y = W x + b + c(R) * B A dropout(x)        A: (R, in), B: (out, R)

so it trains R * (in + out) numbers instead of in * out. ``A`` starts
random and ``B`` at zero: the adapted model starts out exactly equal to the
base model, and the first gradient step moves B (A's gradient is zero while
B is zero). Hu et al. draw A from a Gaussian; we use kaiming-uniform
(entries within 1/sqrt(in)), as loralib and HF PEFT do.

Scale ``c(r)`` (``lora_scale``), the rule every rank-based adapter shares;
a sub-rank r' always uses c(r'):
    "lora"   alpha / r         Hu et al.: with Adam, alpha acts like the
                               learning rate, so it need not be retuned
                               when r changes
    "rslora" alpha / sqrt(r)   rank-stabilised (Kalajdzievski 2023): keeps
                               learning stable as r grows (alpha/r shrinks
                               large ranks' updates until they learn slowly)
    "none"   1

Sub-rank evaluation: ``set_rank(r')`` uses the first r' rows of A, the first
r' columns of B and scale c(r'), i.e. the rank-r' LoRA hiding inside the
rank-R one. Plain LoRA never trains those truncations; DyLoRA and
MatryoshkaLoRA do.

Merge: ``W <- W + c(R) B A``; unmerge subtracts it again.
Parameter names and layouts (``lora_A`` (R, in), ``lora_B`` (out, R)) are HF
PEFT's, so weights can be exchanged one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import AdapterLayer, adapter_layers
# The model-level helpers live in adapters.py (every adapter shares them);
# they are importable from here too, where LoRA's users look for them first.
from .adapters import adapters_disabled, add_adapters, merge_adapters, trainable_parameters  # noqa: F401
from .adapters import load_adapters, save_adapters, unmerge_adapters  # noqa: F401
from .train import evaluate
from .validate import check_float, check_int, check_probability, check_ranks

SCALE_RULES = ("lora", "rslora", "none")


def lora_scale(rank: int, alpha: float, rule: str = "lora") -> float:
    """c(rank): the factor in front of B A for a rank-``rank`` adapter."""
    rank = check_int("rank", rank, 1)
    if rule in ("lora", "rslora"):
        alpha = check_float("alpha", alpha, positive=True)
    if rule == "lora":
        return alpha / rank
    if rule == "rslora":
        return alpha / math.sqrt(rank)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown scale rule {rule!r}; expected one of {SCALE_RULES}")


def check_rank(r, base: nn.Linear) -> None:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
    limit = min(base.in_features, base.out_features)
    if isinstance(r, bool) or not hasattr(r, "__index__") or not 1 <= int(r) <= limit:  # numpy ints are fine
        raise ValueError(f"rank must be an int in 1..min(in, out) = 1..{limit} for a "
                         f"{base.in_features}->{base.out_features} layer, got {r!r}")


class LoRALinear(AdapterLayer):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, scale: str = "lora"):
        # check everything before super().__init__ freezes the base layer
        check_rank(r, base)
        r = int(r)  # numpy ints too
        lora_scale(r, alpha, scale)  # rejects an unknown rule or a bad alpha now, not at the first forward
        dropout = check_probability("dropout", dropout)
        super().__init__(base)
        self.r = r  # the maximum rank: rows of A, columns of B
        self.alpha = 1.0 if scale == "none" and alpha is None else float(alpha)  # "none" ignores alpha
        self.scale_rule = scale
        self.rank = r  # the rank in use; set_rank changes it
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init: |A| <= 1/sqrt(in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        return f"r={self.r}, rank={self.rank}, alpha={self.alpha}, scale={self.scale_rule!r}"

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "r": self.r, "alpha": self.alpha, "scale": self.scale_rule}

    @property
    def scaling(self):
        """c(rank) (a float; MatryoshkaLoRA's training forward uses a vector)."""
        return lora_scale(self.rank, self.alpha, self.scale_rule)

    def set_rank(self, r: int | None) -> None:
        """Use the first ``r`` components from now on (None: the default)."""
        if self.merged:
            raise ValueError("unmerge() before changing the rank: the merged weight holds the old rank's update")
        if r is not None:
            r = check_int("sub-rank", r, 1, self.r)
        self.rank = self.r if r is None else r

    def factors(self):
        """(A (k, in), B (out, k), s): the adapter computes s * B A x, where s
        is a float or a (k,) vector of per-component scales."""
        k = self.rank
        return self.lora_A[:k], self.lora_B[:, :k], self.scaling

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        A, B, s = self.factors()
        return (B * s) @ A  # s scales B's columns: a float or a (k,) vector

    def adapter_output(self, x, y):
        A, B, s = self.factors()
        h = F.linear(self.dropout(x), A) * s  # (..., k): scale the narrow tensor, not the wide one
        return y + F.linear(h, B)  # (..., out)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)
        if isinstance(self.dropout, nn.Dropout) and self.training:
            return super().forward(x)  # the adapter reads dropout(x): plain autograd
        A, B, s = self.factors()
        return lora_linear(x, self.base.weight, self.base.bias, A, B, s)


class _LoRALinearFn(torch.autograd.Function):
    """y = x W^T + bias + ((x A^T) * s) B^T with a hand-written backward.

    The result equals ``base(x) + adapter_output(x, base(x))``; writing the
    backward out saves time, not math. Autograd would (1) form the
    adapter's (N, in) input gradient separately and then add it to the base
    one, and (2) compute dL/dB as ``g^T h``, a skinny product that is slow in
    that memory order. Here both land in place and in the fast order, so
    LoRA costs little more than its extra FLOPs (benchmarks/adapter_speed.py).
    With g = dL/dy (N, out) and h = (x A^T) * s (N, k):
        dL/dB = g^T h            dL/dA = ((g B) * s)^T x
        dL/dx = g W + ((g B) * s) A
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, s):
        if torch.is_tensor(s) and s.requires_grad:
            raise ValueError("the scale s is a constant here (its gradient is not computed)")
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = (x2 @ A.t()) * s  # (N, k)
        # y is a fresh tensor of the output's shape (not a view), written
        # through a 2-d view of it, so callers may modify it in place
        y = x.new_empty(*x.shape[:-1], W.shape[0])  # (..., out)
        y2 = y.view(-1, W.shape[0])  # (N, out)
        if bias is None:
            torch.mm(x2, W.t(), out=y2)
        else:
            torch.addmm(bias, x2, W.t(), out=y2)
        y2.addmm_(h, B.t())  # y += h B^T, fused into the matmul
        ctx.save_for_backward(x2, W, A, B, h, *([s] if torch.is_tensor(s) else []))
        ctx.s = None if torch.is_tensor(s) else s  # a float scale stays an exact Python float
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, W, A, B, h, *rest = ctx.saved_tensors
        s = rest[0] if rest else ctx.s
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gh = (g @ B) * s  # (N, k)
        gx = gW = gb = gA = gB = None
        if ctx.needs_input_grad[0]:
            gx = (g @ W).addmm_(gh, A).view(ctx.x_shape)  # g W + gh A
        if ctx.needs_input_grad[1]:
            gW = g.t() @ x2
        if ctx.needs_input_grad[2]:
            gb = g.sum(0)
        if ctx.needs_input_grad[3]:
            gA = gh.t() @ x2  # (k, in)
        if ctx.needs_input_grad[4]:
            gB = (h.t() @ g).t()  # (out, k) = g^T h, in the fast order
        return gx, gW, gb, gA, gB, None


def lora_linear(x, W, bias, A, B, s):
    """``x W^T + bias + s * x A^T B^T`` (s: a float or a (k,) vector)."""
    return _LoRALinearFn.apply(x, W, bias, A, B, s)


def set_adapter_rank(model: nn.Module, r: int | None) -> None:
    """``set_rank(r)`` on every rank-based adapter of the model."""
    layers = [m for _, m in adapter_layers(model) if hasattr(m, "set_rank")]
    if not layers:
        raise ValueError("the model has no rank-based adapters (LoRA, DyLoRA, MatryoshkaLoRA)")
    for m in layers:
        m.set_rank(r)


def evaluate_ranks(model: nn.Module, task, ranks, problems=None) -> dict[int, float]:
    """Greedy exact-match of the model with every adapter truncated to each
    rank in ``ranks`` (on ``problems``, default the task's fixed test set).
    The adapters' ranks are restored afterwards."""
    layers = [m for _, m in adapter_layers(model) if hasattr(m, "set_rank")]
    if not layers:
        raise ValueError("the model has no rank-based adapters (LoRA, DyLoRA, MatryoshkaLoRA)")
    check_ranks("ranks", ranks)  # a list of ints >= 1 (each is checked against the adapters' rank below)
    ranks = [int(r) for r in ranks]
    saved = [m.rank for m in layers]
    out = {}
    try:
        for r in ranks:
            for m in layers:
                m.set_rank(int(r))
            out[int(r)] = evaluate(model, task, problems)
    finally:
        for m, r in zip(layers, saved):
            m.rank = r
    return out

"""A pool of LoRAs behind a router: what ReMix (``remix.py``) and the
learned-router baseline (``mixlora.py``) share.

Each adapted layer holds ``n`` LoRAs of rank ``r`` and a router ``P`` (an
``nn.Linear(in, n)`` without bias), and computes, per token,

    y = W x + b + omega * sum_i g_i B_i A_i x        A_i: (r, in), B_i: (out, r)

where the gate g (..., n) is non-zero on the k LoRAs the token uses and
omega = alpha / (k r) ("lora") or alpha / sqrt(k r) ("rslora"). The two
methods differ only in how g is chosen (``gates``): ReMix draws k LoRAs and
gives each the constant weight 1; MixLoRA takes the top-k of the router and
weights them by its renormalised probabilities.

Routing collapse is measured by the effective support size of the weights,
ESS(pi) = 1 / sum_i pi_i^2 (1 when one LoRA takes all, k for uniform
weights over k): ``effective_support_size``, and per layer and across layers
``routing_stats_of`` / ``routing_metrics``.

Shapes: N tokens, n LoRAs, k active, r rank. The pool is stored as
``lora_A`` (n, r, in) and ``lora_B`` (n, out, r). With k = n every LoRA is
always active and the layer is a fixed rank-(n r) LoRA (the only case with a
``delta_weight``, so the only one that can merge).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import AdapterLayer, adapter_layers
from .lora import check_rank, lora_scale

OMEGA_RULES = ("lora", "rslora")


def effective_support_size(weights: torch.Tensor) -> torch.Tensor:
    """ESS(pi) = 1 / sum_i pi_i^2 of non-negative weights (..., n), each row
    normalised to sum to 1 first: 1 for a one-hot row, n for a uniform one."""
    if (weights < 0).any():
        raise ValueError("effective_support_size needs non-negative weights")
    pi = weights / weights.sum(-1, keepdim=True)
    return 1.0 / (pi * pi).sum(-1)


def softmax(logits: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(log-)softmax over the last dimension, computed over dim 0 of a
    transposed view: the same numbers, but torch's CPU kernels are several
    times slower over a short last dimension (n = 8) than over a strided one."""
    t = logits.transpose(0, -1)
    return (t.log_softmax(0) if log else t.softmax(0)).transpose(0, -1)


def check_mixture(n, k, omega) -> None:
    for name, v in (("n (experts)", n), ("k (active)", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if k > n:
        raise ValueError(f"k (active) must be at most n (experts) = {n}, got k={k}")
    if omega not in OMEGA_RULES:
        raise ValueError(f"omega must be one of {OMEGA_RULES}, got {omega!r}")


class MixtureOfLoRAs(AdapterLayer):
    """The pool both routers share: n LoRAs (A_i, B_i) of rank r, a router,
    and the gated forward ``y + omega * sum_i g_i B_i A_i x``. Subclasses
    say how a token's gate g (..., n) is chosen (``gates``)."""

    def __init__(self, base: nn.Linear, n: int, k: int, r: int, omega: str = "lora", alpha: float = 2.0):
        # check everything before super().__init__ freezes the base layer
        check_mixture(n, k, omega)
        check_rank(r, base)
        super().__init__(base)
        self.n, self.k, self.r = n, k, r
        self.alpha = float(alpha)
        self.omega_rule = omega
        self.omega = lora_scale(k * r, alpha, omega)  # the constant weight of an active LoRA
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(n, r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(n, base.out_features, r, device=w.device, dtype=w.dtype))
        for A in self.lora_A:  # each LoRA starts like LoRALinear's A: |A| <= 1/sqrt(in)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.router = nn.Linear(base.in_features, n, bias=False, device=w.device, dtype=w.dtype)
        # a list while a loss wrapper records (ReMix: (logits, d log Q / d logits) pairs; MixLoRA: balance
        # terms), else None
        self.record = None
        self.last_routing = None  # (logits, gates) of the last training forward, detached, (n, N), for statistics

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}, r={self.r}, omega={self.omega:.4g} ({self.omega_rule}, alpha={self.alpha})"

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "n": self.n, "k": self.k, "r": self.r, "alpha": self.alpha,
                "omega": self.omega_rule}

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:  # (..., n)
        return self.router(x.detach())

    def gates(self, logits: torch.Tensor) -> torch.Tensor:  # (..., n)
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        if self.k != self.n:
            raise ValueError(f"this mixture has no single weight update: each token uses its own {self.k} of "
                             f"{self.n} LoRAs (only k == n is a fixed LoRA that can merge)")
        A, B = self.pool()
        return self.omega * B @ A  # (out, n r) @ (n r, in)

    def pool(self):
        """The pool as one rank-(n r) LoRA: A (n r, in), B (out, n r) = [B_1 ... B_n]."""
        return flat_pool(self.lora_A, self.lora_B)

    def adapter_output(self, x, y):
        g = self.gates(self.router_logits(x))  # (..., n)
        A, B = self.pool()
        h = F.linear(x, A).unflatten(-1, (self.n, self.r))  # (..., n, r): every A_i x in one matmul
        h = h * (self.omega * g).unsqueeze(-1)  # gated: 0 on the LoRAs a token does not use
        return y + F.linear(h.flatten(-2), B)  # (..., out)

    def routing_stats(self) -> dict:
        """Statistics of the last training forward (``routing_stats_of``), as floats; empty before any.
        (Over all its tokens: all M copies after a stacked ReMix step, which
        ``routing_metrics`` reads only the first of.)"""
        if self.last_routing is None:
            return {}
        return {key: float(v) for key, v in routing_stats_of(*self.last_routing).items()}


def flat_pool(lora_A: torch.Tensor, lora_B: torch.Tensor):
    """lora_A (n, r, in) and lora_B (n, out, r) as one rank-(n r) LoRA:
    A (n r, in), B (out, n r) = [B_1 ... B_n] (``MixtureOfLoRAs.pool``)."""
    return lora_A.flatten(0, 1), lora_B.permute(1, 0, 2).flatten(1)


def routing_stats_of(logits: torch.Tensor, g: torch.Tensor) -> dict:
    """Means over tokens (the last dim) of: the ESS of the applied weights
    g, the ESS of the router's q = softmax(logits), and the largest applied
    weight (g normalised to sum 1). Inputs expert-major, (..., n, N), as
    layers keep them in ``last_routing``: every statistic reduces over the n
    LoRAs, which on CPU is several times faster over a leading dim than over
    a short last one. Outputs (...)."""
    g = g.float()
    pi = g / g.sum(-2, keepdim=True)  # (..., n, N), columns sum to 1
    q = logits.float().softmax(-2)  # (..., n, N), columns sum to 1
    return {"ess": (1.0 / (pi * pi).sum(-2)).mean(-1),  # effective_support_size, already normalised
            "router_ess": (1.0 / (q * q).sum(-2)).mean(-1),
            "max_weight": pi.amax(-2).mean(-1)}


def mixture_layers(model: nn.Module, kind=MixtureOfLoRAs) -> list[tuple[str, MixtureOfLoRAs]]:
    return [(name, m) for name, m in adapter_layers(model) if isinstance(m, kind)]


def routing_metrics(layers, copies: int = 1) -> dict:
    """Across layers: min and mean of each layer's mean ESS (applied weights
    and router q) and the largest layer-mean top weight, as floats. The
    layers' last forwards are stacked (L, n, N) so that all layers cost one
    computation. ``copies = M``: the last forward ran M stacked copies of a
    batch (ReMix's ``rloo_loss``), and the statistics read the first copy."""
    last = [m.last_routing for m in layers if m.last_routing is not None]
    if not last:
        return {}
    first = last[0][0].shape[1] // copies  # tokens of one copy
    logits, g = (torch.stack([t[i][:, :first] for t in last]) for i in (0, 1))  # (L, n, N) each
    s = routing_stats_of(logits, g)  # (L,) each
    return {"ess_min": float(s["ess"].min()), "ess_mean": float(s["ess"].mean()),
            "router_ess_min": float(s["router_ess"].min()), "router_ess_mean": float(s["router_ess"].mean()),
            "max_weight": float(s["max_weight"].max())}


def per_layer_routing(model: nn.Module) -> dict:
    """Each mixture layer's routing statistics from its last training forward."""
    return {name: m.routing_stats() for name, m in mixture_layers(model) if m.last_routing is not None}

"""The learned-router baseline: a MixLoRA-style mixture of LoRAs (Li et al. 2024, arXiv 2404.15159).

The same pool as ReMix (``mixture.py``: n LoRAs of rank r and a router P), but
the router's probabilities are the weights. (MixLoRA itself puts its experts
in the feed-forward block and plain LoRAs in attention; here every adapted
layer gets the same mixture, so that only the routing differs from ReMix.) Per token, with q = softmax(P x)
and T the indices of its k largest entries:

    y = W x + b + k omega * sum_{i in T} w_i B_i A_i x,    w_i = q_i / sum_{j in T} q_j

The k weights sum to 1 and are differentiable, so the router trains by plain
backpropagation: no sampling, no second term. The factor k omega makes the
two mixtures equal when w is uniform over the k (each w_i = 1/k), so they
differ only in how the weights are chosen. Nothing keeps w uniform,
though: a LoRA that helps a little gets more weight, hence more gradient,
hence helps more, and the weights can pile onto one LoRA per token (routing
collapse: the effective support size of w falls from k toward 1, and the
other k - 1 active LoRAs are computed for almost nothing).

Load balance. MoE routers add an auxiliary loss so that tokens spread over
the experts:

    L_balance = coef * n * sum_i f_i * mean_tokens(q_i),       coef = 0.001

where f_i is the share of the (token, slot) assignments of the top-k that
went to LoRA i (the f_i sum to 1; the loss is coef at perfect balance).
``f`` counts discrete choices and has no gradient; ``mean(q_i)`` carries it.
The balance loss is averaged over the mixture layers and added to the task
loss by ``with_balance_loss(loss_fn, coef)``, a loss wrapper like ReMix's
``rloo_loss``, so the shared training loop stays unchanged. The router
reads x itself here (ReMix's reads a detached x), as in MixLoRA: its
gradient is an ordinary pathwise one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapters import option
from .mixture import MixtureOfLoRAs, check_mixture, mixture_layers, routing_metrics, softmax


@dataclass
class MixLoRAOptions:
    """The learned-router baseline's own settings (``--rank``: each LoRA's rank r)."""
    experts: int = option(8, "n: LoRAs in each layer's pool")
    active: int = option(2, "k: LoRAs active per token")
    omega: str = option("lora", "k omega scales the renormalised weights: lora = alpha/(k r), "
                        "rslora = alpha/sqrt(k r)")
    balance: float = option(0.001, "coefficient of the load-balance loss")

    def __post_init__(self):  # bad settings fail when the config is made, before any work
        check_mixture(self.experts, self.active, self.omega)
        if isinstance(self.balance, bool) or not isinstance(self.balance, (int, float)) or self.balance < 0:
            raise ValueError(f"balance must be a number >= 0, got {self.balance!r}")


class MixLoRALinear(MixtureOfLoRAs):
    """Top-k of the router with renormalised, differentiable weights (the
    same in training and eval). While ``with_balance_loss`` records, each
    forward appends its balance term n * sum_i f_i mean(q_i) to ``self.record``."""

    def router_logits(self, x):
        return self.router(x)  # not detached: the weights train by backpropagation

    def gates(self, logits):
        q = softmax(logits)  # (..., n)
        top, idx = q.topk(self.k, dim=-1)  # (..., k)
        w = torch.zeros_like(q).scatter(-1, idx, top / top.sum(-1, keepdim=True))  # (..., n), rows sum to 1
        if self.training and self.record is not None:
            f = F.one_hot(idx, self.n).flatten(0, -2).to(q.dtype).mean(0)  # (n,), sums to 1
            self.record.append(self.n * (f * q.flatten(0, -2).mean(0)).sum())
        if self.training:
            self.last_routing = tuple(t.detach().flatten(0, -2).t() for t in (logits, w))  # (n, N) views
        return self.k * w  # times omega in adapter_output: k omega w_i


def with_balance_loss(loss_fn, coef: float = 0.001):
    """Wrap ``loss_fn(model, batch)``: add ``coef`` times the mean over
    MixLoRA layers of their balance terms. Metrics: the balance term and
    the routing statistics (ESS of the weights and of q, largest weight)."""
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0:
        raise ValueError(f"the balance coefficient must be a number >= 0, got {coef!r}")

    def mixlora_loss(model, batch):
        layers = [m for _, m in mixture_layers(model, MixLoRALinear)]
        if not layers:
            raise ValueError("with_balance_loss needs a model with MixLoRALinear adapters")
        for m in layers:
            m.record = []
        try:
            loss, metrics = loss_fn(model, batch)
            terms = [t for m in layers for t in m.record]
        finally:
            for m in layers:
                m.record = None
        balance = torch.stack(terms).mean() if terms else loss.new_zeros(())
        out = {**metrics, "balance": float(balance.detach()), **routing_metrics(layers)}
        return loss + coef * balance, out
    return mixlora_loss

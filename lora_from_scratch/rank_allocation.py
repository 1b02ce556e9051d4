"""Gradient-based LoRA rank allocation under GRPO (Sawant, arXiv 2605.07366).

Uniform LoRA gives every adapted layer the same rank R. This recipe spends
the same budget (``L * R`` ranks over L layers, or a fraction of it) where
the gradient says the learning happens:

1. Probe: train uniform rank-R LoRA with GRPO for a short warm-up and
   record, at every step, each adapted layer's gradient L2 norm
   ``g_l = sqrt(sum over its adapter parameters of ||dL/dtheta||^2)``
   (before clipping). Importance is the layer's share of the summed mean
   norms: ``w_l = mean_t g_l(t) / sum_j mean_t g_j(t)``.
2. Allocate (``allocate_ranks``): ``r_l`` proportional to ``w_l``, at least
   ``min_rank`` (and at most the layer's largest rank), summing to the
   budget exactly. Real quotas ``q_l = clip(lam * w_l, min_rank, cap_l)``
   with the one ``lam`` that makes them sum to the budget (with no layer
   at a bound, ``q_l = budget * w_l``: exactly proportional); then
   largest-remainder rounding: every layer gets ``floor(q_l)`` and the
   leftover units go to the largest fractional parts (ties: the earlier
   layer). All-zero importance counts as equal importance.
3. Rebuild (``rebuild_adapters``): replace every adapter by a fresh one at
   its new rank (B = 0, so the model equals its base at that moment) and
   train on.

Variants (``variant_ranks``): ``uniform`` (R everywhere), ``gradient``
(proportional), ``random`` (proportional to random shares drawn uniformly
from the simplex, same budget) and a reduced budget (``gradient`` at 70% of
``L * R``). The paper also reports the max/min spread of gradient share
across layers before and after allocation (``share_spread``): giving a
layer more rank gives it a larger share of the gradient, so proportional
allocation amplifies the spread it started from.

What the paper leaves open and we chose: the scale keeps the uniform run's
alpha in every layer (``c(r_l) = alpha / r_l`` under the "lora" rule, as
PEFT's per-layer rank pattern does); the warm-up adapters are thrown away,
not truncated; importance is the mean per-step norm of all of a layer's
adapter parameters (A and B together).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .adapters import adapter_layers, add_adapters

VARIANTS = ("uniform", "gradient", "random")


def allocate_ranks(importance: Sequence[float], budget: int, min_rank: int = 1,
                   max_rank: int | Sequence[int] | None = None) -> list[int]:
    """Integer ranks proportional to ``importance``, each in
    ``[min_rank, max_rank]``, summing to ``budget`` exactly (see the module
    docstring for the rounding)."""
    w = [float(x) for x in importance]
    L = len(w)
    if L == 0:
        raise ValueError("importance is empty: need one value per adapted layer")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"importance must be finite and >= 0, got {list(importance)}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an int >= 1 (a layer never gets rank 0), got {min_rank!r}")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int, got {budget!r}")
    if budget < L * min_rank:
        raise ValueError(f"budget={budget} is below {L} layers x min_rank {min_rank} = {L * min_rank}")
    hi = [math.inf] * L if max_rank is None else (
        [int(max_rank)] * L if isinstance(max_rank, int) else [int(m) for m in max_rank])
    if len(hi) != L or any(m < min_rank for m in hi):
        raise ValueError(f"max_rank must be one int or {L} ints, each >= min_rank={min_rank}, got {max_rank!r}")
    if budget > sum(hi):
        raise ValueError(f"budget={budget} exceeds the layers' largest ranks, {sum(hi)} in all")
    if sum(w) == 0:
        w = [1.0] * L  # no signal anywhere: share equally
    if sum(h if x > 0 else min_rank for x, h in zip(w, hi)) < budget:
        # the layers with importance are all full: the others must take the rest, equally
        tiny = 1e-9 * min(x for x in w if x > 0)
        w = [x if x > 0 else tiny for x in w]
    # Stage 1: real-valued quotas q_l = clip(lam * w_l, min_rank, cap_l) with
    # sum q = budget. The sum grows with lam: bisect for lam, then redo the
    # layers that are not at a bound exactly (lam = what is left / their w)
    def quotas(lam):
        return [min(max(lam * x, min_rank), h) for x, h in zip(w, hi)]

    lo_lam, hi_lam = 0.0, 1.0
    while sum(quotas(hi_lam)) < budget:
        hi_lam *= 2
    for _ in range(200):
        mid = (lo_lam + hi_lam) / 2
        lo_lam, hi_lam = (mid, hi_lam) if sum(quotas(mid)) < budget else (lo_lam, mid)
    quota = quotas(hi_lam)
    free = [i for i in range(L) if min_rank < hi_lam * w[i] < hi[i]]
    if free:
        lam = (budget - sum(q for i, q in enumerate(quota) if i not in free)) / sum(w[i] for i in free)
        for i in free:
            quota[i] = lam * w[i]
    # Stage 2: largest remainder
    ranks = [int(math.floor(q + 1e-9)) for q in quota]
    order = sorted(range(L), key=lambda i: (-(quota[i] - ranks[i]), i))  # biggest fraction first, then index
    for i in order[:budget - sum(ranks)]:
        ranks[i] += 1
    return ranks


def share_spread(importance: Sequence[float]) -> float:
    """max / min of the layers' shares (inf when a layer has none)."""
    w = [float(x) for x in importance]
    return max(w) / min(w) if min(w) > 0 else math.inf


class GradNormProbe:
    """Per-layer gradient L2 norms, accumulated over training steps.

    A hook on every adapter parameter adds ``||grad||^2`` to its layer's
    running sum during backward (the gradient before clipping). ``end_step``
    closes a step: each layer's norm is the square root of its sum. Wrap the
    loss with ``probe.wrap(loss_fn)`` so every new step closes the previous
    one; read ``mean_norms()`` or ``shares()`` after training (they close the
    last step too). ``remove()`` takes the hooks off.
    """

    def __init__(self, model: nn.Module, max_steps: int | None = None):
        self.max_steps = max_steps  # count only the first max_steps steps (None: all)
        self.names = [n for n, _ in adapter_layers(model)]
        if not self.names:
            raise ValueError("the model has no adapters to probe")
        self.totals = dict.fromkeys(self.names, 0.0)  # sum over steps of the layer's gradient norm
        self.steps = 0  # steps closed
        self._pending = dict.fromkeys(self.names, 0.0)  # squared norms of the step in progress
        self._seen = False  # a gradient arrived since the last end_step
        self._handles = [p.register_hook(self._hook(name)) for name, layer in adapter_layers(model)
                         for p in layer.adapter_parameters().values() if p.requires_grad]

    def _hook(self, name):
        def add(grad):
            self._pending[name] += float(grad.detach().float().pow(2).sum())
            self._seen = True
        return add

    def end_step(self) -> None:
        if not self._seen:
            return
        counted = self.max_steps is None or self.steps < self.max_steps
        for n in self.names:
            if counted:
                self.totals[n] += math.sqrt(self._pending[n])
            self._pending[n] = 0.0
        self.steps += counted
        self._seen = False

    def wrap(self, loss_fn):
        def probed(model, batch):
            self.end_step()  # the previous step's backward is complete
            return loss_fn(model, batch)
        return probed

    def mean_norms(self) -> dict[str, float]:
        self.end_step()
        return {n: t / max(1, self.steps) for n, t in self.totals.items()}

    def shares(self) -> dict[str, float]:
        norms = self.mean_norms()
        total = sum(norms.values())
        return {n: (v / total if total > 0 else 1 / len(norms)) for n, v in norms.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def remove_adapters(model: nn.Module) -> list[str]:
    """Put every adapter's frozen base linear back in its place (unmerged
    first); returns the names. The rest of the model keeps its flags."""
    names = []
    for name, layer in adapter_layers(model):
        layer.unmerge()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.base)
        names.append(name)
    return names


def rebuild_adapters(model: nn.Module, ranks: dict[str, int], make_adapter) -> list[str]:
    """Replace the model's adapters by fresh ones at per-layer ranks.

    ``ranks``: module name -> rank, one entry per adapter the model has;
    ``make_adapter(linear, rank)`` builds one (B = 0 for LoRA, so the model
    computes its base function right after). Returns the rebuilt names."""
    current = [n for n, _ in adapter_layers(model)]
    if set(ranks) != set(current):
        raise ValueError(f"ranks must name exactly the model's adapters; missing "
                         f"{sorted(set(current) - set(ranks))[:4]}, unknown {sorted(set(ranks) - set(current))[:4]}")
    for n, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank for {n} must be an int >= 1, got {r!r}")
    remove_adapters(model)
    name_of = {model.get_submodule(n): n for n in current}  # linear -> its name (modules hash by identity)
    return add_adapters(model, lambda lin: make_adapter(lin, ranks[name_of[lin]]), targets=current)


def variant_ranks(variant: str, names: Sequence[str], rank: int, budget: int | None = None,
                  shares: dict[str, float] | None = None, max_rank: Sequence[int] | None = None,
                  seed: int = 0) -> dict[str, int]:
    """Per-layer ranks for one variant. ``budget`` defaults to
    ``len(names) * rank``; ``shares`` (from a probe) is needed by
    ``gradient``; ``seed`` draws ``random``. ``uniform`` with a budget that
    does not divide evenly spreads the remainder over the first layers."""
    names = list(names)
    budget = len(names) * rank if budget is None else budget
    if variant == "uniform":
        importance = [1.0] * len(names)
    elif variant == "gradient":
        if shares is None or set(shares) != set(names):
            raise ValueError("the gradient variant needs a probe's shares for every adapted layer")
        importance = [shares[n] for n in names]
    elif variant == "random":
        g = torch.Generator().manual_seed(seed)
        importance = (-torch.rand(len(names), generator=g).log()).tolist()  # uniform on the simplex
    else:
        raise ValueError(f"unknown rank allocation {variant!r}; expected one of {VARIANTS}")
    return dict(zip(names, allocate_ranks(importance, budget, 1, max_rank)))


def layer_rank_caps(model: nn.Module) -> list[int]:
    """min(in, out) of every adapted layer: the largest rank it can take."""
    return [min(m.in_features, m.out_features) for _, m in adapter_layers(model)]


def probe_and_rebuild(model: nn.Module, loss_fn, batches, warmup, variant: str, rank: int, make_adapter,
                      budget: int | None = None, seed: int = 0) -> dict:
    """Stages 1 to 3 of the module docstring on a model with uniform rank-
    ``rank`` adapters: train ``warmup`` (a ``TrainConfig``) with ``loss_fn``
    (e.g. GRPO's) while probing, allocate by ``variant``, rebuild with
    ``make_adapter(linear, rank)``. Returns what was measured and chosen."""
    from .train import train  # the shared loop, unchanged

    if variant not in VARIANTS:
        raise ValueError(f"unknown rank allocation {variant!r}; expected one of {VARIANTS}")
    probe = GradNormProbe(model)
    try:
        train(model, probe.wrap(loss_fn), batches, warmup)
        shares = probe.shares()
    finally:
        probe.remove()
    ranks = variant_ranks(variant, list(shares), rank, budget, shares, layer_rank_caps(model), seed)
    rebuild_adapters(model, ranks, make_adapter)
    return {"rank_allocation": variant, "rank_budget": sum(ranks.values()), "warmup_steps": warmup.steps,
            "probe_shares": shares, "ranks": ranks, "share_spread_before": share_spread(list(shares.values()))}

"""DyLoRA: dynamic search-free LoRA (Valipour et al. 2022, arXiv 2210.07558).

Same parameters as LoRA at maximum rank R: ``lora_A`` (R, in), ``lora_B``
(out, R). The difference is in training. Every optimizer step draws one
rank ``b`` (uniform over 1..R, or over a given set of ranks), shared by every
adapted layer, and the forward uses only the first b components at the
scale that rank has at inference:

    y = W x + b0 + c(b) * B[:, :b] A[:b] x

so each truncation ``1..R`` is trained to work on its own, and after
training any rank can be chosen with ``set_rank`` without retraining.

"frozen" mode (the paper's default): components 1..b-1 take part in the
forward but are detached, so only component b (row b of A, column b of B)
gets gradient; the lower components keep what earlier steps taught them.
Non-frozen mode trains all of 1..b. (Frozen means zero gradient, not zero
update: AdamW's momentum still moves a component for a while after its
last gradient: the paper does not say, and we leave the optimizer as is.)

The per-step draw is not in the layer: ``with_rank_sampling(loss_fn)``
wraps any loss function, so the shared training loop stays unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .adapters import adapter_layers, int_list, option
from .lora import LoRALinear
from .validate import check_bool, check_ranks


@dataclass
class DyLoRAOptions:
    """DyLoRA's own settings (besides rank, alpha and scale)."""
    unfrozen: bool = option(False, "train all components 1..b each step, not only component b")
    train_ranks: tuple | None = option(None, "the ranks a step draws from, e.g. 1,2,4,8 (default 1..R)",
                                       parse=int_list)

    def __post_init__(self):
        self.unfrozen = check_bool("unfrozen", self.unfrozen)
        if self.train_ranks is not None:
            self.train_ranks = check_ranks("train_ranks", self.train_ranks)


class DyLoRALinear(LoRALinear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, frozen: bool = True, ranks=None,
                 scale: str = "lora", dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout=dropout, scale=scale)
        ranks = list(range(1, r + 1)) if ranks is None else list(check_ranks("DyLoRA ranks", ranks, 1, r))
        self.frozen = check_bool("frozen", frozen)  # True: only component b learns in a step
        self.ranks = ranks  # the ranks a training step draws from

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frozen={self.frozen}, ranks={self.ranks}"

    def adapter_config(self) -> dict:
        return {**super().adapter_config(), "frozen": self.frozen, "ranks": list(self.ranks)}

    def factors(self):
        k = self.rank
        A, B = self.lora_A[:k], self.lora_B[:, :k]
        if self.frozen and torch.is_grad_enabled():
            # components 1..k-1 are used but get no gradient; only k learns
            A = torch.cat([A[:-1].detach(), A[-1:]], 0)  # (k, in)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], 1)  # (out, k)
        return A, B, self.scaling


def with_rank_sampling(loss_fn):
    """Wrap ``loss_fn(model, batch)`` so each call first draws one rank b for
    all DyLoRA layers, then computes the loss at that rank.

    The draw uses torch's global RNG, which the training loop seeds and saves
    in its checkpoints, so runs repeat and resume exactly. The layers go back
    to full rank before the loss is returned; backward needs no rank, as the
    graph already holds the truncated factors.
    """
    def loss_at_sampled_rank(model, batch):
        layers = [m for _, m in adapter_layers(model) if isinstance(m, DyLoRALinear)]
        if not layers:
            raise ValueError("with_rank_sampling needs a model with DyLoRALinear adapters")
        ranks = layers[0].ranks
        if any(m.ranks != ranks for m in layers):
            raise ValueError("all DyLoRA layers must draw from the same set of ranks")
        b = ranks[int(torch.randint(len(ranks), ()))]
        for m in layers:
            m.set_rank(b)
        try:
            loss, metrics = loss_fn(model, batch)
        finally:
            for m in layers:
                m.set_rank(None)
        return loss, {**metrics, "rank": float(b)}
    return loss_at_sampled_rank

"""S-GRPO: GRPO on a selected subset of tokens (Lee and Tong, arXiv 2504.20834).

Full-token GRPO backpropagates through every completion token. S-GRPO
keeps only some of them, which cuts the memory of the update (the
activations saved for backward) and, the paper argues, acts as a
regulariser when only a small LoRA learns:

    per completion i, over its tokens t = 0, 1, ..., n_i - 1:
        keep t                          if t < alpha      (the first alpha tokens)
        keep t with probability p       otherwise
        then keep only the first k kept tokens            (the cap)

and the loss is GRPO's on the kept set K_i alone. In the "grpo"
aggregation with one inner step (rho = 1):

    loss = -(1/B) sum_i A_i * (1/|K_i|) sum_{t in K_i} log pi(o_t)  +  beta * KL on K_i

so the completion's log-probability is the mean over its kept tokens. With
``alpha = 0, p = 1`` and no cap every token is kept: plain GRPO. Here the
loss is ``grpo.grpo_loss`` with its token mask replaced by the kept mask, so
the clipping, the k3 KL and the other aggregations come with it.

Shapes: ``mask`` (B, T), 1 on completion tokens. Draws come from a
``torch.Generator`` when one is given, else from torch's global RNG (the
shared training loop seeds it). What the paper leaves open and we chose
(its body was not available to us): the cap keeps the earliest kept
tokens (so the first alpha survive when alpha <= k); a completion with no
kept token adds nothing but still counts in the mean over completions; our
defaults (alpha 1, p 0.5, no cap) are sized for answers of 4 to 6 tokens,
not the paper's long chains of thought.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SelectionConfig:
    alpha: int = 1  # always keep each completion's first alpha tokens
    p: float = 0.5  # keep each later token with this probability
    k: int | None = None  # keep at most k tokens per completion (None: no cap)

    def __post_init__(self):
        check_selection(self.alpha, self.p, self.k)


def check_selection(alpha, p, k) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int) or alpha < 0:
        raise ValueError(f"alpha (tokens always kept) must be an int >= 0, got {alpha!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p (keep probability) must be in [0, 1], got {p!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k (cap on kept tokens) must be an int >= 1 or None, got {k!r}")


def select_tokens(mask: torch.Tensor, alpha: int = 1, p: float = 0.5, k: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The (B, T) bool mask of the kept tokens (a subset of ``mask``)."""
    check_selection(alpha, p, k)
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    real = mask.bool()
    index = real.long().cumsum(1) - 1  # (B, T): t, the token's place in its completion
    draw = torch.rand(mask.shape, generator=generator, device=generator.device if generator else mask.device)
    keep = real & ((index < alpha) | (draw < p))  # (B, T)
    if k is not None:
        keep = keep & (keep.long().cumsum(1) <= k)  # the earliest k kept tokens
    return keep


def sgrpo_loss(logp, old_logp, ref_logp, advantages, mask, keep, **grpo_kwargs) -> torch.Tensor:
    """GRPO's loss (``grpo.grpo_loss``, same keyword options) on the kept
    tokens only: ``keep`` from ``select_tokens``, within ``mask``."""
    from .grpo import grpo_loss

    if keep.shape != mask.shape:
        raise ValueError(f"keep must have mask's shape {tuple(mask.shape)}, got {tuple(keep.shape)}")
    return grpo_loss(logp, old_logp, ref_logp, advantages, mask.bool() & keep.bool(), **grpo_kwargs)

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

Where the memory is saved (``SelectiveObjective``, shared with T-SPMO): the
fresh forward pass runs only on the rows that keep a token and only up to
the last kept column (a kept token attends to every token before it, so
earlier columns stay; later ones are never needed). The log-probs are put
back in place, so the loss is exactly the one of a full pass.

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

from dataclasses import dataclass, replace

import torch

from .adapters import option
from .grpo import GRPOConfig, GRPOObjective, Rollouts, grpo_loss, token_logprobs
from .tasks import stable_hash


@dataclass
class SGRPOConfig(GRPOConfig):
    keep_first: int = option(1, "alpha: always keep each completion's first alpha tokens (default 1)")
    keep_prob: float = option(0.5, "p: keep each later token with this probability (default 0.5)", parse=float)
    keep_max: int | None = option(None, "k: keep at most k tokens per completion (default: no cap)", parse=int)

    def __post_init__(self):
        super().__post_init__()
        check_selection(self.keep_first, self.keep_prob, self.keep_max)


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
    if keep.shape != mask.shape:
        raise ValueError(f"keep must have mask's shape {tuple(mask.shape)}, got {tuple(keep.shape)}")
    return grpo_loss(logp, old_logp, ref_logp, advantages, mask.bool() & keep.bool(), **grpo_kwargs)


def selected_token_logprobs(model, ro: Rollouts, need: torch.Tensor) -> torch.Tensor:
    """``token_logprobs`` where ``need`` (N, T) is True, 0 elsewhere, from a
    forward pass over the rows that need a token and only up to the last
    needed column: a token after the last kept one is never needed (it is
    not kept, and no kept token attends to it), so it costs no activations."""
    rows = need.any(1).nonzero().flatten()  # (n,)
    cols = need.any(0).nonzero().flatten()
    if rows.numel() == 0:  # nothing to learn: one token keeps the graph (its loss weight is 0)
        rows, end = rows.new_zeros(1), ro.prompt_len + 1
    else:
        end = int(cols.max()) + 1
    sub = replace(ro, input_ids=ro.input_ids[rows, :end], attention_mask=ro.attention_mask[rows, :end],
                  completion_mask=ro.completion_mask[rows, :end])
    out = torch.zeros(need.shape, device=need.device)  # (N, T)
    out[rows, :end] = token_logprobs(model, sub)  # differentiable copy into the rows and columns computed
    return out * need


class SelectiveObjective(GRPOObjective):
    """A GRPO objective that trains on a subset of tokens: a subclass says
    which (``needed(ro)``, an (N, T) bool mask, the same for every inner
    step on one batch of rollouts) and how (``loss``); the forward pass then
    runs on what is needed only."""

    def needed(self, ro: Rollouts) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model, batch) -> tuple[torch.Tensor, dict]:
        ro = self.rollouts(model, batch)
        need = self.needed(ro)
        logp = selected_token_logprobs(model, ro, need)  # (N, T)
        old = ro.old_logp if self.cfg.mu > 1 else logp.detach()
        loss = self.loss(logp, old, ro)
        shown = torch.where(need, logp.detach(), old)  # metrics: tokens not computed count as unchanged
        metrics = self.metrics(shown, old, ro)
        metrics["grad_frac"] = float((need & self.weighted(ro)).sum() / ro.completion_mask.sum().clamp(min=1))
        return loss, metrics

    def weighted(self, ro: Rollouts) -> torch.Tensor:
        """(N, T) bool: tokens whose loss weight is not zero (with beta = 0,
        a completion with advantage 0 teaches nothing)."""
        if self.cfg.beta > 0:
            return ro.completion_mask.bool()
        return ro.completion_mask.bool() & (ro.advantages != 0)[:, None]


class SGRPOObjective(SelectiveObjective):
    """S-GRPO for the shared loop: ``--algo sgrpo``. One selection per batch
    of rollouts, drawn from a generator seeded by (seed, rollout_id)."""

    config_class = SGRPOConfig

    def needed(self, ro: Rollouts) -> torch.Tensor:
        if getattr(self, "_keep_for", None) is not ro:
            c = self.cfg
            gen = torch.Generator().manual_seed(stable_hash(self.seed, self.rollout_id or 0, 7) % 2**63)
            keep = select_tokens(ro.completion_mask.cpu(), c.keep_first, c.keep_prob, c.keep_max, generator=gen)
            self._keep, self._keep_for = keep.to(ro.completion_mask.device), ro
        return self._keep

    def loss(self, logp, old_logp, ro: Rollouts) -> torch.Tensor:
        c = self.cfg
        return sgrpo_loss(logp, old_logp, ro.ref_logp, ro.advantages, ro.completion_mask, self.needed(ro),
                          eps_low=c.eps_low, eps_high=c.eps_high, beta=c.beta, loss_type=c.loss_type,
                          max_new_tokens=self.max_new_tokens)

"""ReMix: reinforcement routing for a mixture of LoRAs (Qiu et al. 2026, arXiv 2603.10160).

Each adapted layer holds a pool of ``n`` LoRAs of rank ``r`` and a router
``P`` (an ``nn.Linear(in, n)`` without bias). Per token, the router gives
``q = softmax(P x)`` over the pool, exactly ``k`` LoRAs are active, and each
active one gets the same CONSTANT weight omega:

    y = W x + b + omega * sum_{i in I} B_i A_i x        A_i: (r, in), B_i: (out, r)
    omega = alpha / (k r)  ("lora")   or   alpha / sqrt(k r)  ("rslora"),  alpha = 2

i.e. the active LoRAs form a rank-(k r) LoRA with the usual scale rule. A
learned-router mixture (MixLoRA, ``mixlora.py``) weights the k by the
renormalised router probabilities instead; those weights tend to pile onto
one LoRA (routing collapse), while ReMix's weights, uniform over the k, have
an effective support size of exactly k (``effective_support_size``).

Training draws the selection I = (i_1, ..., i_k) from q without replacement,
in order, with probability

    Q(I) = prod_j q_{i_j} / (1 - sum_{j' < j} q_{i_j'})

(sampled with the Gumbel-top-k trick). Q does not enter the output, so the
router gets no gradient from the loss. ``rloo_loss(loss_fn, M)`` supplies it:
it draws M >= 2 selections (a selection is the draw in every layer and
token; log Q sums over all of them), computes the loss L_m of each and
returns the surrogate

    (1/M) sum_m L_m  +  1/(M-1) sum_m stopgrad(L_m - mean L) * log Q_m

whose gradient is an unbiased estimate of grad E_I[L(I)]: the first term
trains the LoRAs, the second is REINFORCE with the leave-one-out baseline
(RLOO; the loss is a negative reward). Inference (``eval()``, so also
``generate``) uses the deterministic top-k of q.

Our reading where the paper leaves details open: routing is per token; B
starts at 0 (the adapted model is the base model, and on the first step all
M losses are equal, so the router gradient is exactly 0); the router reads
a detached x; the router starts at nn.Linear's default init; router draws on
padding tokens count in log Q (they cannot change the loss, so they add
variance but no bias, and excluding them would need every objective's mask).

Shapes: N tokens, n LoRAs, k active, r rank. The pool, its router and the
routing statistics are shared with MixLoRA and live in ``mixture.py``;
``lora_A`` is (n, r, in) and ``lora_B`` (n, out, r). The forward computes all
n experts' ``A_i x`` in one matmul and gates them per token with a dense
(N, n r) scale matrix that is omega on the selected LoRAs and 0 elsewhere:
a rank-(n r) LoRA with a per-token diagonal gate. That is simple and fast
for small n r; a large model would group tokens by expert instead. With
k = n every LoRA is always active and the layer is a fixed rank-(n r) LoRA
(the only case with a ``delta_weight``, so the only one that can merge).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .adapters import option
from .lora import lora_linear
from .mixture import MixtureOfLoRAs, check_mixture, mixture_layers, routing_metrics, softmax


def sample_selection(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Draw k indices (..., k) without replacement from softmax(logits), in
    draw order: the top-k of logits + Gumbel noise (the Gumbel-top-k trick),
    with the noise -log(-log u), u ~ Uniform(0, 1). (On CPU this is several
    times faster than -log of an ``exponential_()`` draw.)"""
    u = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)  # (..., n), never 0
    return (logits - u.log_().neg_().log_()).topk(k, dim=-1).indices  # logits + Gumbel(0, 1)


def selection_log_prob(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log Q of the ordered selections ``idx`` (..., k) under softmax(logits) (..., n):
    sum_j [log q_{i_j} - log(1 - sum_{j' < j} q_{i_j'})]. The mass left before
    slot j, 1 - sum_{j' < j} q_{i_j'}, is computed as the sum of q over the
    LoRAs not drawn yet: no cancellation, so it stays accurate in the
    logits' dtype (float32) even when one LoRA holds almost all of q. (Its
    limit: in float32, once the top logit leads the others by about 87 or
    more, the q left underflows to 0 and log Q becomes infinite.)"""
    log_q = softmax(logits, log=True)  # (..., n)
    out = log_q.gather(-1, idx).sum(-1)  # (...): sum_j log q_{i_j}
    q, left = log_q.exp(), torch.ones_like(log_q)  # left: 1 on the LoRAs not drawn yet
    for j in range(1, idx.shape[-1]):
        left = left.scatter(-1, idx[..., j - 1:j], 0.0)
        out = out - (q * left).sum(-1).log()  # - log(mass left before slot j)
    return out


@dataclass
class ReMixOptions:
    """ReMix's own settings (``--rank`` is each LoRA's rank r; ``--alpha`` the numerator of omega, default 2)."""
    experts: int = option(8, "n: LoRAs in each layer's pool")
    active: int = option(2, "k: LoRAs active per token")
    selections: int = option(2, "M >= 2: routing selections drawn per step for the RLOO router gradient")
    omega: str = option("lora", "weight of each active LoRA: lora = alpha/(k r), rslora = alpha/sqrt(k r)")

    def __post_init__(self):  # bad settings fail when the config is made, before any work
        check_mixture(self.experts, self.active, self.omega)
        if isinstance(self.selections, bool) or not isinstance(self.selections, int) or self.selections < 2:
            raise ValueError(f"selections (M) must be an int >= 2 for the leave-one-out baseline, "
                             f"got {self.selections!r}")


class ReMixLinear(MixtureOfLoRAs):
    """Constant weights over k LoRAs drawn from the router (training), or
    its top-k (eval). While a loss wrapper records, each training forward
    appends its (logits, selection) to ``self.record``; the wrapper turns
    them into the log Q of each selection (``record_log_prob``)."""

    def selection(self, logits):  # (..., k) indices of the active LoRAs
        if not self.training:
            return logits.topk(self.k, dim=-1).indices  # deterministic top-k
        idx = sample_selection(logits.detach(), self.k)  # (..., k), in draw order
        if self.record is not None:
            self.record.append((logits, idx))
        return idx

    def gates(self, logits):  # (..., n): 1 on the active LoRAs, 0 elsewhere
        return torch.zeros_like(logits).scatter_(-1, self.selection(logits), 1.0)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)
        if not self.training and not torch.is_grad_enabled():
            return self.inference_forward(x)
        # the same function as adapter_output, through LoRA's hand-written
        # backward: the per-token gate omega * g, repeated over each LoRA's
        # r components, is its (N, n r) matrix of constant scales, written
        # in one scatter
        logits = self.router_logits(x).flatten(0, -2)  # (N, n)
        idx = self.selection(logits)  # (N, k)
        N, n, r = logits.shape[0], self.n, self.r
        s = logits.new_zeros(N, n, r).scatter_(1, idx[:, :, None].expand(N, self.k, r), self.omega)
        if self.training:
            self.last_routing = (logits.detach(), s[:, :, 0])  # gates omega * g: statistics normalise them
        return lora_linear(x, self.base.weight, self.base.bias, *self.pool(), s.view(N, n * r))

    def inference_forward(self, x):
        """Eval without gradients (``generate``, ``evaluate``): the same output
        with fewer operations. The router P reads the same x as the A_i, so
        one matmul with the stacked weight [A_1; ...; A_n; P] (n r + n, in)
        gives every A_i x and the router logits at once."""
        A, B = self.pool()  # (n r, in), (out, n r)
        n, r, k = self.n, self.r, self.k
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        h = x2 @ torch.cat([A, self.router.weight]).t()  # (N, n r + n)
        idx = h[:, n * r:].topk(k, dim=-1).indices  # (N, k): the deterministic top-k of the logits
        N = x2.shape[0]
        s = h.new_zeros(N, n, r).scatter_(1, idx[:, :, None].expand(N, k, r), self.omega)  # (N, n, r) gates
        W, bias = self.base.weight, self.base.bias
        y = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())  # (N, out)
        y.addmm_(h[:, :n * r] * s.view(N, n * r), B.t())  # += (gated A x) B^T
        return y.view(*x.shape[:-1], W.shape[0])


def record_log_prob(records, copies: int = 1) -> torch.Tensor:
    """log Q of everything ReMix layers recorded: the sum over layers,
    forwards and tokens of log Q(selection), computed in one
    ``selection_log_prob`` call. With ``copies = M`` every recorded forward
    ran over M stacked copies of one batch (copy-major along the batch
    dimension, which comes first in every ReMix layer's input) and the
    result is each copy's own log Q, shape (M,)."""
    for lg, _ in records:
        if lg[..., 0].numel() % copies:
            raise ValueError(f"a ReMix layer ran {lg[..., 0].numel()} tokens, not a multiple of {copies} stacked "
                             f"copies: every training forward of a copies= call must run all copies, batch first")
    logits = torch.cat([lg.reshape(copies, -1, lg.shape[-1]) for lg, _ in records], 1)  # (M, sum N, n)
    idx = torch.cat([i.reshape(copies, -1, i.shape[-1]) for _, i in records], 1)  # (M, sum N, k)
    log_q = selection_log_prob(logits, idx).sum(-1)  # (M,)
    return log_q[0] if copies == 1 else log_q


def takes_copies(loss_fn) -> bool:
    """Whether ``loss_fn`` accepts ``copies=M`` (see ``rloo_loss``)."""
    try:
        # follow_wrapped=False: a functools.wraps wrapper has its own parameters, not the wrapped function's
        return "copies" in inspect.signature(loss_fn, follow_wrapped=False).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def rloo_loss(loss_fn, M: int = 2):
    """Wrap any ``loss_fn(model, batch) -> (loss, metrics)`` for ReMix.

    Returns the RLOO surrogate (module docstring) over M fresh routing
    selections of the same batch. Its value is the mean of the M losses;
    only its gradient carries the router term. Metrics: the spread (max -
    min) of the M losses, the routing statistics (of the first copy when
    stacked, of the last call otherwise), and the mean of loss_fn's own.

    Two routes to the M losses, with the same math:
    - plain: call ``loss_fn`` M times; each call draws its own selections;
    - stacked, when ``loss_fn`` takes a keyword ``copies`` (``sft_loss`` and
      ``GRPOObjective`` do): ONE call ``loss_fn(model, batch, copies=M)``
      runs M copies of the batch, stacked batch first, through one forward
      and backward pass, and returns the (M,) losses and M metrics dicts.
      Every token of every copy draws its own selection, so copy m is
      selection m. Same FLOPs, 1/M as many torch operations to launch,
      which is what costs time in a small model.

    The router compares the M selections by their losses. An objective whose
    loss VALUE is the same for every selection can name another score in
    its metrics, ``"selection_loss"`` (lower is better), and RLOO uses that
    instead: GRPO with one step per batch of rollouts is such an objective
    (its ratio is exactly 1, so its loss is -mean(A) whatever the routing),
    and it reports the policy-gradient surrogate -A logp, which does depend
    on the routing.
    """
    if isinstance(M, bool) or not isinstance(M, int) or M < 2:
        raise ValueError(f"rloo_loss needs M >= 2 selections (the leave-one-out baseline uses the others), got {M!r}")
    stacked = takes_copies(loss_fn)

    def recorded(layers, run, copies=1):
        """Run ``run()`` while the layers record their selections; its result and the log Q."""
        for m in layers:
            m.record = []
        try:
            out = run()
            records = [rec for m in layers for rec in m.record]
        finally:
            for m in layers:
                m.record = None
        if not records:  # a loss that did not run the ReMix layers in training mode
            return out, torch.zeros(copies) if copies > 1 else torch.zeros(())
        return out, record_log_prob(records, copies)

    def stacked_losses(model, batch):
        losses, inner = loss_fn(model, batch, copies=M)
        if not torch.is_tensor(losses) or losses.shape != (M,) or len(inner) != M:
            raise ValueError(f"loss_fn(model, batch, copies={M}) must return a ({M},) tensor of losses and a list "
                             f"of {M} metrics dicts, got {type(losses).__name__} of shape "
                             f"{tuple(getattr(losses, 'shape', ()))} and {len(inner)} dicts")
        return losses, inner

    def remix_loss(model, batch):
        layers = [m for _, m in mixture_layers(model, ReMixLinear)]
        if not layers:
            raise ValueError("rloo_loss needs a model with ReMixLinear adapters")
        # Stage 1: M losses, each with its own selection and log Q
        if stacked:
            (losses, inner), log_qs = recorded(layers, lambda: stacked_losses(model, batch), M)  # (M,), (M,)
        else:
            runs = [recorded(layers, lambda: loss_fn(model, batch)) for _ in range(M)]
            losses = torch.stack([loss for (loss, _), _ in runs])  # (M,)
            inner = [metrics for (_, metrics), _ in runs]
            log_qs = torch.stack([log_q for _, log_q in runs])  # (M,)
        log_qs = log_qs.to(losses.device)
        # Stage 2: leave-one-out advantages. L_m - mean L = (M-1)/M (L_m - mean of the others)
        scores = torch.tensor([float(d.get("selection_loss", l)) for d, l in zip(inner, losses.detach())],
                              dtype=log_qs.dtype, device=log_qs.device)  # (M,) what the router compares
        adv = scores - scores.mean()  # (M,)
        router_term = (adv * log_qs).sum() / (M - 1)
        # Stage 3: the value is the mean loss, the gradient adds the router term
        surrogate = losses.mean() + (router_term - router_term.detach())
        out = {k: sum(float(d[k]) for d in inner) / M for k in inner[0]}
        spread = float(losses.detach().max() - losses.detach().min())
        out.update(loss_spread=spread, **routing_metrics(layers, M if stacked else 1))
        return surrogate, out
    return remix_loss

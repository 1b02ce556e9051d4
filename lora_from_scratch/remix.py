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

(``draw`` samples it slot by slot and returns d log Q / d logits with it;
``selection_log_prob`` computes log Q). Q does not enter the output, so the
router gets no gradient from the loss. ``rloo_loss(loss_fn, M)`` supplies it:
it draws M >= 2 selections (a selection is the draw in every layer and
token; log Q sums over all of them), computes the loss L_m of each and
returns a surrogate with the value (1/M) sum_m L_m and the gradient of

    (1/M) sum_m L_m  +  1/(M-1) sum_m stopgrad(L_m - mean L) * log Q_m

an unbiased estimate of grad E_I[L(I)]: the first term trains the LoRAs,
the second is REINFORCE with the leave-one-out baseline (RLOO; the loss is
a negative reward). Inference (``eval()``, so also ``generate``) uses the
deterministic top-k of q.

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
for small n r; a large model would group tokens by expert instead. The
routing itself (logits, draw, gates) is expert-major, (n, N). With
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


# The smallest router probability a draw uses (about exp(-80)): a smaller q,
# which only a logit some 80 below the token's top one gives, counts as this
# much, so the mass left for a later slot stays above 0 in float32 and every
# slot draws a LoRA.
Q_FLOOR = 1e-35


def draw(logits: torch.Tensor, k: int, hits: torch.Tensor | None = None):
    """Draw k of the n LoRAs for each token, in order, without replacement.

    ``logits`` (n, N), no gradient, is EXPERT-MAJOR (one row per LoRA):
    every step below reduces over the n LoRAs, and on CPU a reduction over
    dim 0 of an (n, N) tensor is several times faster than over the short
    last dim of (N, n). Returns ``hits`` (k, n, N), where hits[j] is the
    one-hot of slot j's LoRA, the gates (n, N), their sum (1 on each
    token's k LoRAs), and the gradient of the draw's log-probability
    d log Q / d logits (n, N), which is all that the router's REINFORCE term
    needs (``rloo_loss``). Given ``hits``, it scores them instead of
    drawing.

    Slot by slot, by the inverse CDF. w holds q = softmax(logits) for the
    LoRAs not drawn yet and 0 for the drawn ones. With c its running sum
    down the n rows, slot j takes the first LoRA whose c exceeds
    v = u * sum(w), u ~ U[0, 1): LoRA i with probability
    p_j[i] = w_i / sum(w) = q_i / (1 - the q drawn before), exactly slot j's
    factor of Q (module docstring). A drawn LoRA has w = 0, so c does not
    rise at it and it cannot come again. sum(w) adds up what is left, with
    no 1 - (something close to 1) to lose precision to. Since
    log Q = sum_j log p_j[i_j], a log-softmax over the LoRAs left at each
    slot,

        d log Q / d logits = sum_j (onehot(i_j) - p_j)

    (``selection_log_prob`` computes log Q itself; the tests check this
    gradient against autograd on it)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[0]:
        raise ValueError(f"draw takes k in 1..n = 1..{logits.shape[0]} LoRAs per token, got k={k!r}")
    w = logits.softmax(0).clamp_(min=Q_FLOOR)  # (n, N): q
    (n, N), drawing = w.shape, hits is None
    if drawing:
        u = torch.rand(k, N, dtype=w.dtype, device=w.device)  # (k, N)
        hits = w.new_empty(k, n, N)
        passed = w.new_zeros(n + 1, N)  # passed[1 + i]: is LoRA i's c past v? (row 0 stays 0)
        now, before = passed[1:], passed[:-1]
    p_sum = None  # sum_j p_j
    for j, hit in enumerate(hits):  # hit: (n, N), slot j's one-hot
        c = w.cumsum(0)  # (n, N)
        mass = c[-1]  # (N,): all the weight left
        if drawing:
            torch.gt(c, u[j] * mass, out=now)  # 0 ... 0 1 ... 1, as float
            torch.sub(now, before, out=hit)  # the one-hot: where `passed` steps from 0 to 1
        p = w / mass  # (n, N): p_j, the distribution slot j draws from
        p_sum = p if p_sum is None else p_sum + p
        if j + 1 < k:
            w = w - w * hit  # the drawn LoRA leaves the pool
    gates = hits.sum(0)
    return hits, gates, gates - p_sum


def sample_selection(logits: torch.Tensor, k: int) -> torch.Tensor:
    """k indices (..., k) drawn without replacement from softmax(logits)
    (..., n), in draw order (``draw`` in the usual layout)."""
    hits, _, _ = draw(logits.detach().reshape(-1, logits.shape[-1]).t(), k)  # (k, n, N)
    return hits.argmax(1).t().reshape(*logits.shape[:-1], k)


def selection_log_prob(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log Q of the ordered selections ``idx`` (..., k) under softmax(logits) (..., n):
    sum_j [log q_{i_j} - log(1 - sum_{j' < j} q_{i_j'})], differentiable by
    autograd. The mass left before slot j, 1 - sum_{j' < j} q_{i_j'}, is
    computed as the sum of q over the LoRAs not drawn yet: no cancellation,
    so it stays accurate in the logits' dtype (float32) even when one LoRA
    holds almost all of q."""
    log_q = softmax(logits, log=True)  # (..., n)
    out = log_q.gather(-1, idx).sum(-1)  # (...): sum_j log q_{i_j}
    q, left = log_q.exp(), torch.ones_like(log_q)  # left: 1 on the LoRAs not drawn yet
    for j in range(1, idx.shape[-1]):
        left = left.scatter(-1, idx[..., j - 1:j], 0.0)
        out = out - (q * left).sum(-1).log()  # - log(mass left before slot j)
    return out


class _ScoreFunction(torch.autograd.Function):
    """Value 0, and for each recorded logits (n, N) the gradient
    adv_m d log Q_m / d logits on copy m's tokens (``score_function_term``)."""

    @staticmethod
    def forward(ctx, grads, adv, *logits):
        ctx.grads, ctx.adv = grads, adv
        return adv.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        adv = ctx.adv * g  # (M,)
        return (None, None, *[(d.view(d.shape[0], len(adv), -1) * adv[:, None].to(d.dtype)).view_as(d)
                              for d in ctx.grads])


def score_function_term(records, adv: torch.Tensor) -> torch.Tensor:
    """The router's REINFORCE term: a scalar with the value 0 and the
    gradient sum_m adv_m grad log Q_m, for ReMix layers' ``records`` of
    (logits (n, N), d log Q / d logits (n, N)) and ``adv`` (M,), one
    advantage per copy. With M > 1, every recorded forward ran M stacked
    copies of one batch, copy-major along N (the batch dimension comes first
    in every ReMix layer's input), and copy m drew selection m. The
    gradient reaches each router through its logits: log Q itself is never
    computed in training."""
    M = len(adv)
    for logits, _ in records:
        if logits.shape[1] % M:
            raise ValueError(f"a ReMix layer ran {logits.shape[1]} tokens, not a multiple of {M} stacked copies: "
                             f"every training forward of a copies= call must run all copies, batch first")
    if not records:
        return adv.new_zeros(())
    return _ScoreFunction.apply([d for _, d in records], adv.detach(), *[lg for lg, _ in records])


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
    appends its router logits and the gradient of its draw's log Q, both
    (n, N), to ``self.record``; the wrapper turns them into the router's
    REINFORCE term (``score_function_term``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # (n, n r): row i is omega on LoRA i's r components of the pool, 0
        # elsewhere; g^T @ spread turns gates (n, N) into per-component scales
        # in one matrix product. A constant: not saved, moves with the layer.
        w = self.lora_A
        spread = self.omega * torch.eye(self.n, dtype=w.dtype, device=w.device).repeat_interleave(self.r, 1)
        self.register_buffer("spread", spread, persistent=False)

    def expert_major_gates(self, logits):  # (n, N) -> (n, N): 1 on each token's k active LoRAs, 0 elsewhere
        if not self.training:  # the deterministic top-k
            return torch.zeros_like(logits).scatter_(0, logits.topk(self.k, dim=0).indices, 1.0)
        _, gates, grad_log_q = draw(logits.detach(), self.k)  # (n, N) each
        if self.record is not None:
            self.record.append((logits, grad_log_q))
        return gates

    def gates(self, logits):  # (..., n), for adapter_output
        g = self.expert_major_gates(logits.reshape(-1, self.n).t())  # (n, N)
        return g.t().reshape(logits.shape)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)
        if not self.training and not torch.is_grad_enabled():
            return self.inference_forward(x)
        # the same function as adapter_output, through LoRA's hand-written
        # backward, with the routing expert-major (see draw)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        logits = self.router.weight @ x2.detach().t()  # (n, N): the router reads a detached x
        g = self.expert_major_gates(logits)  # (n, N)
        if self.training:
            self.last_routing = (logits.detach(), g)  # for the statistics
        # LoRA's per-component scales, token-major: each token's gate
        # omega * g_i repeated over LoRA i's r components
        s = g.t() @ self.spread  # (N, n r)
        return lora_linear(x, self.base.weight, self.base.bias, *self.pool(), s)

    def inference_forward(self, x):
        """Eval without gradients (``generate``, ``evaluate``): the same output
        as the training forward's top-k, without the autograd bookkeeping
        (and without a custom backward, which it never needs)."""
        A, B = self.pool()  # (n r, in), (out, n r)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        logits = self.router.weight @ x2.t()  # (n, N), expert-major as in training
        g = self.expert_major_gates(logits)  # (n, N): eval, so the top-k
        W, bias = self.base.weight, self.base.bias
        y = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())  # (N, out)
        y.addmm_((x2 @ A.t()) * (g.t() @ self.spread), B.t())  # += (gated A x) B^T
        return y.view(*x.shape[:-1], W.shape[0])


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

    def recorded(layers, run):
        """Run ``run()`` while the layers record their draws; its result and the records."""
        for m in layers:
            m.record = []
        try:
            out = run()
            return out, [rec for m in layers for rec in m.record]
        finally:
            for m in layers:
                m.record = None

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
        # Stage 1: M losses, each with its own selection; every ReMix layer
        # records its logits and d log Q / d logits of its draw
        if stacked:
            (losses, inner), records = recorded(layers, lambda: stacked_losses(model, batch))  # (M,)
        else:
            runs = [recorded(layers, lambda: loss_fn(model, batch)) for _ in range(M)]
            losses = torch.stack([loss for (loss, _), _ in runs])  # (M,)
            inner = [metrics for (_, metrics), _ in runs]
        # Stage 2: leave-one-out advantages. L_m - mean L = (M-1)/M (L_m - mean of the others)
        scores = torch.tensor([float(d.get("selection_loss", l)) for d, l in zip(inner, losses.detach())],
                              dtype=losses.dtype, device=losses.device)  # (M,) what the router compares
        adv = scores - scores.mean()  # (M,)
        # Stage 3: REINFORCE, 1/(M-1) sum_m adv_m grad log Q_m, through the recorded gradients
        if stacked:  # one pass: copy m of every record is selection m
            router_term = score_function_term(records, adv)
        else:
            router_term = sum(score_function_term(recs, adv[m:m + 1]) for m, (_, recs) in enumerate(runs))
        # Stage 4: the value is the mean loss (the router term's is 0), the gradient adds the router term
        surrogate = losses.mean() + router_term / (M - 1)
        out = {k: sum(float(d[k]) for d in inner) / M for k in inner[0]}
        spread = float(losses.detach().max() - losses.detach().min())
        out.update(loss_spread=spread, **routing_metrics(layers, M if stacked else 1))
        return surrogate, out
    return remix_loss

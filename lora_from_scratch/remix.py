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
routing itself (logits, draw, gates) is expert-major, (n, N), and the
whole layer is one autograd node with its backward written out
(``_ReMixLinearFn``). With
k = n every LoRA is always active and the layer is a fixed rank-(n r) LoRA
(the only case with a ``delta_weight``, so the only one that can merge).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .adapters import option
from .mixture import MixtureOfLoRAs, check_mixture, flat_pool, mixture_layers, routing_metrics, softmax


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
    one-hot of slot j's LoRA; the gates (n, N), the one-hots summed over
    the slots (1 on each token's k LoRAs; for k = 1 that is hits[0] itself,
    not a copy); and the gradient of the draw's log-probability
    d log Q / d logits (n, N), which is all that the router's REINFORCE term
    needs (``rloo_loss``). Given ``hits`` (k, n, N), in the logits' dtype,
    it scores them instead of drawing.

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
    if not drawing and (hits.shape != (k, n, N) or hits.dtype != w.dtype):
        raise ValueError(f"draw scores hits of shape (k, n, N) = {(k, n, N)} and dtype {w.dtype}, got "
                         f"{tuple(hits.shape)} and {hits.dtype}")
    if drawing:
        u = torch.rand(k, N, dtype=w.dtype, device=w.device)  # (k, N)
        hits = w.new_empty(k, n, N)
        passed = w.new_zeros(n + 1, N)  # passed[1 + i]: is LoRA i's c past v? (row 0 stays 0)
        now, before = passed[1:], passed[:-1]
    p_sum = gates = None  # sum_j p_j and sum_j onehot(i_j), (n, N) each
    for j in range(k):
        hit = hits[j]  # (n, N): slot j's one-hot
        c = w.cumsum(0)  # (n, N)
        mass = c[-1]  # (N,): all the weight left
        if drawing:
            torch.gt(c, u[j] * mass, out=now)  # 0 ... 0 1 ... 1, as float
            torch.sub(now, before, out=hit)  # the one-hot: where `passed` steps from 0 to 1
        # p_j = w / mass, the distribution slot j draws from (addcdiv_: p_sum += w / mass)
        p_sum = w / mass if j == 0 else p_sum.addcdiv_(w, mass)
        gates = hit if j == 0 else gates + hit
        if j + 1 < k:
            w = torch.addcmul(w, w, hit, value=-1)  # w - w * hit: the drawn LoRA leaves the pool
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
        M = len(ctx.adv)
        adv = (ctx.adv * g)[:, None]  # (M, 1)
        return (None, None, *[(d.view(d.shape[0], M, -1) * adv.to(d.dtype)).view_as(d) for d in ctx.grads])


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


class _ReMixLinearFn(torch.autograd.Function):
    """One ReMix layer, forward and backward written out as one autograd node:

        logits = P x^T                 (n, N), expert-major (see draw)
        s      = spread of the gates   (N, n r): omega on the r components of each token's k LoRAs, 0 elsewhere
        h      = (x A^T) * s           (N, n r), A (n r, in) the pool's down-projections
        y      = x W^T + b + h B^T     (N, out), B (out, n r) the pool's up-projections

    that is LoRA's ``lora_linear`` over the whole pool with a per-token gate,
    plus the router. The gates come from ``layer.route`` (a draw in training,
    the top-k in eval). Outputs: y, the logits, and route's gates and
    d log Q / d logits (no gradient). The logits get a gradient G only from
    the router's REINFORCE term (``score_function_term``); with g = dL/dy:

        dL/dP = G x          dL/dA = ((g B) * s)^T x          dL/dB = g^T h
        dL/dx = g W + ((g B) * s) A      (the router reads x detached: G adds nothing here)

    Autograd would get the same numbers through a dozen small nodes (the
    router's matmul, transposes, the pool's reshapes), and on CPU a small
    layer's time goes mostly to the number of operations, not to FLOPs."""

    @staticmethod
    def compute(x, W, bias, P, A, B, layer):
        """The forward's math; also the whole forward without gradients
        (``generate``, ``evaluate``), where an autograd node only costs time.
        Returns y, the logits, the gates, d log Q / d logits (or None) and
        what the backward needs."""
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        logits = P @ x2.t()  # (n, N)
        gates, grad_log_q = layer.route(logits)  # (n, N) each; grad_log_q is None in eval
        s = gates.t() @ layer.spread  # (N, n r): each gate, times omega, over its LoRA's r components
        A2, B2 = flat_pool(A, B)  # (n r, in), (out, n r): the pool as one LoRA
        h = (x2 @ A2.t()).mul_(s)  # (N, n r): zero outside each token's k LoRAs
        # y is a fresh tensor of the output's shape (not a view: callers may
        # modify it in place), written through a 2-d view of it
        y = x.new_empty(*x.shape[:-1], W.shape[0])  # (..., out)
        y2 = y.view(-1, W.shape[0])  # (N, out)
        torch.mm(x2, W.t(), out=y2) if bias is None else torch.addmm(bias, x2, W.t(), out=y2)
        y2.addmm_(h, B2.t())  # y += h B^T
        return y, logits, gates, grad_log_q, (x2, W, A2, B2, h, s)

    @staticmethod
    def forward(ctx, x, W, bias, P, A, B, layer):
        y, logits, gates, grad_log_q, saved = _ReMixLinearFn.compute(x, W, bias, P, A, B, layer)
        ctx.save_for_backward(*saved)
        ctx.x_shape, ctx.pool_shape = x.shape, A.shape
        ctx.mark_non_differentiable(*(t for t in (gates, grad_log_q) if t is not None))
        ctx.set_materialize_grads(False)  # logits without a REINFORCE term get None, not zeros: no router gradient
        return y, logits, gates, grad_log_q

    @staticmethod
    def backward(ctx, gy, g_logits, _gates, _grad_log_q):
        x2, W, A2, B2, h, s = ctx.saved_tensors
        n, r, _ = ctx.pool_shape
        need = ctx.needs_input_grad
        gP = g_logits @ x2 if need[3] and g_logits is not None else None  # (n, in)
        if gy is None:  # only the logits were used
            return None, None, None, gP, None, None, None
        g = gy.reshape(-1, gy.shape[-1])  # (N, out)
        gh = (g @ B2).mul_(s)  # (N, n r)
        gx = (g @ W).addmm_(gh, A2).view(ctx.x_shape) if need[0] else None
        gW = g.t() @ x2 if need[1] else None
        gb = g.sum(0) if need[2] else None
        gA = (gh.t() @ x2).view(ctx.pool_shape) if need[4] else None  # (n, r, in)
        gB = (h.t() @ g).view(n, r, -1).transpose(1, 2) if need[5] else None  # (n, out, r) = g^T h per LoRA
        return gx, gW, gb, gP, gA, gB, None


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

    def route(self, logits):
        """Gates (n, N) for router logits (n, N), no gradient: 1 on each
        token's k active LoRAs, 0 elsewhere. Eval takes the deterministic
        top-k; training draws (``draw``) and also returns d log Q / d logits
        (None in eval)."""
        if not self.training:
            return torch.zeros_like(logits).scatter_(0, logits.topk(self.k, dim=0).indices, 1.0), None
        _, gates, grad_log_q = draw(logits, self.k)
        return gates, grad_log_q

    def gates(self, logits):  # (..., n), for adapter_output
        lg = logits.reshape(-1, self.n).t()  # (n, N)
        g, grad_log_q = self.route(lg.detach())
        if grad_log_q is not None and self.record is not None:
            self.record.append((lg, grad_log_q))
        return g.t().reshape(logits.shape)

    def forward(self, x):
        if self.merged or self.disabled:
            return self.base(x)
        # the same function as adapter_output, with the backward written out
        # and the routing expert-major (see _ReMixLinearFn and draw)
        args = (x, self.base.weight, self.base.bias, self.router.weight, self.lora_A, self.lora_B, self)
        if torch.is_grad_enabled():
            y, logits, g, grad_log_q = _ReMixLinearFn.apply(*args)
        else:
            y, logits, g, grad_log_q, _ = _ReMixLinearFn.compute(*args)
        if self.training:
            self.last_routing = (logits.detach(), g)  # for the statistics
            if self.record is not None:
                self.record.append((logits, grad_log_q))
        return y


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

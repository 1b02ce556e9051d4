"""GRPO: Group Relative Policy Optimization (Shao et al., DeepSeekMath, arXiv 2402.03300).

Reinforcement learning without a value network. For each prompt q the
policy samples a group of G completions o_1..o_G, a reward function scores
them (here: 1 for an exactly right answer, else 0), and each completion's
advantage is its reward measured against its own group:

    A_i = (r_i - mean(r)) / (std(r) + eps)        scale="group" (std with Bessel's correction)
    A_i =  r_i - mean(r)                          scale="none"  (Dr. GRPO)

Every token t of o_i gets the same A_i. With the ratio to the policy that
sampled the rollouts, rho_t = pi(o_t) / pi_old(o_t), and the k3 estimator of
the KL divergence to a fixed reference policy,

    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      (>= 0; ref_t = log pi_ref(o_t))

the per-token loss is PPO's clipped surrogate plus the KL penalty:

    l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta KL_t

and it is averaged in one of three ways (M_i = tokens of completion i, B rows):

    "grpo"     mean over each completion's tokens, then over completions
    "dapo"     sum over all tokens / number of tokens
    "dr_grpo"  sum over all tokens / (B * max_new_tokens)

With one inner step per batch of rollouts (``mu=1``) pi_old is pi itself,
detached, so rho = 1 and the gradient is the advantage-weighted policy
gradient, plus beta (pi_ref/pi - 1) grad logp per token from the KL.

The reference policy of a model with adapters is the same model inside
``adapters_disabled(model)``: no second copy of the weights. A model without
adapters (full fine-tuning) keeps a frozen copy made on the first step.

Shapes: N = B * G rows (groups consecutive: rows g*G .. g*G+G-1 answer
problem g), T = prompt columns P + new columns n. Per-token tensors are
(N, T), aligned with ``input_ids``: entry t is about token t given tokens < t.

Stages: (1) rollouts, one batched ``generate`` with the KV cache that also
returns the sampled tokens' log-probs; (2) rewards; (3) group advantages;
(4) the clipped, KL-penalised loss; (5) ``mu`` inner steps reuse one batch of
rollouts. ``GRPOObjective`` is a ``loss_fn`` for the shared training loop;
it keeps the current rollouts, keyed by the batch's ``rollout_id``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import adapter_layers, adapters_disabled
from .tasks import Problem, Task, stable_hash
from .tokenizer import Tokenizer
from .validate import check_int

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "none")


@dataclass
class GRPOConfig:
    group_size: int = 8  # G: completions sampled per prompt
    max_new_tokens: int | None = None  # longest completion; None: the task's longest answer + <eos>
    temperature: float = 1.0  # sampling temperature; the policy is softmax(logits / temperature)
    beta: float = 0.0  # weight of the k3 KL to the reference policy (0: no reference in the loss)
    eps_low: float = 0.2  # clip the ratio below at 1 - eps_low
    eps_high: float = 0.2  # ... and above at 1 + eps_high (DAPO raises it)
    loss_type: str = "grpo"  # "grpo", "dapo" or "dr_grpo": how per-token losses are averaged
    scale: str = "group"  # "group": divide advantages by the group's std; "none": do not (Dr. GRPO)
    mu: int = 1  # optimizer steps per batch of rollouts (inner steps against the old log-probs)
    log_kl: bool = True  # compute the reference pass even at beta = 0, to report the KL

    def __post_init__(self):
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an int >= 2 (advantages compare completions), got {self.group_size!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be None or an int >= 1, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        _check_loss_args(self.beta, self.eps_low, self.eps_high, self.loss_type)
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not isinstance(self.mu, int) or self.mu < 1:
            raise ValueError(f"mu must be an int >= 1, got {self.mu!r}")


def _check_loss_args(beta, eps_low, eps_high, loss_type):
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta!r}")
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low!r}, eps_high={eps_high!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


# ----- Stage 1: rollouts ----------------------------------------------------
@dataclass
class Rollouts:
    input_ids: torch.Tensor  # (N, T) prompt (left-padded) + completion (pads after <eos>)
    attention_mask: torch.Tensor  # (N, T) 1 on real prompt and completion tokens
    completion_mask: torch.Tensor  # (N, T) 1 on completion tokens, <eos> included
    old_logp: torch.Tensor  # (N, T) log-probs of the sampled tokens when sampled (0 off the completion)
    ref_logp: torch.Tensor | None  # (N, T) the same tokens under the reference policy, or None
    rewards: torch.Tensor  # (N,) one reward per completion
    group_size: int  # G; rows g*G .. g*G+G-1 share problem g
    problems: list  # the B problems, in group order
    temperature: float = 1.0  # the policy is softmax(logits / temperature)
    advantages: torch.Tensor | None = None  # (N,) filled in stage 3
    completions: list = field(default_factory=list)  # the N completions as text (up to <eos>)
    prompt_len: int = 0  # P: prompts are left-padded to P columns, completions start in column P


@torch.no_grad()
def sample_rollouts(model, problems: list[Problem], task: Task, tok: Tokenizer | None = None, group_size: int = 8,
                    max_new_tokens: int | None = None, temperature: float = 1.0, reference=None,
                    with_ref: bool = False, generator: torch.Generator | None = None) -> Rollouts:
    """Stages 1 and 2: G completions of each problem from ONE batched
    ``generate`` (KV cache), their log-probs, rewards, and (``with_ref``) the
    reference log-probs: ``reference`` if given, else ``model`` with its
    adapters disabled."""
    if not problems:
        raise ValueError("sample_rollouts needs at least one problem")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    tok = tok or Tokenizer()
    n_new = max_new_tokens or task.max_answer_tokens()
    prompts = [tok.encode(p.prompt, bos=True) for p in problems for _ in range(group_size)]  # N prompts
    device = next(model.parameters()).device
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), tok.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p, device=device)
        mask[i, P - len(p):] = 1
    new, logp = model.generate(ids, n_new, temperature=temperature, attention_mask=mask, generator=generator,
                               return_logprobs=True)  # (N, n), (N, n)
    # completion tokens: everything up to and including the first <eos>
    is_eos = new == model.config.eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (N, n)
    cmask = (~after_eos).long()
    zeros = torch.zeros_like(ids)
    completions = [tok.decode(row) for row in new.tolist()]
    # Stage 2: rewards
    rewards = torch.tensor([task.reward(c, problems[i // group_size].answer) for i, c in enumerate(completions)],
                           dtype=torch.float32, device=device)
    ro = Rollouts(input_ids=torch.cat([ids, new], 1), attention_mask=torch.cat([mask, cmask], 1),
                  completion_mask=torch.cat([zeros, cmask], 1), old_logp=torch.cat([zeros.float(), logp * cmask], 1),
                  ref_logp=None, rewards=rewards, group_size=group_size, problems=list(problems),
                  temperature=temperature, completions=completions, prompt_len=P)
    if with_ref:
        ro.ref_logp = reference_logprobs(model, ro, reference)
    return ro


def token_logprobs(model, ro: Rollouts, copies: int = 1) -> torch.Tensor:
    """A fresh forward pass: log pi(token t | tokens < t) for every completion
    token, (N, T), 0 off the completion. Differentiable. ``copies = M`` runs
    M stacked copies of the rollouts in one pass and returns (M N, T),
    copy-major (for ReMix, whose copies route differently)."""
    P = ro.prompt_len
    ids, mask, done = ro.input_ids, ro.attention_mask, ro.completion_mask
    if copies > 1:
        ids, mask, done = (t.repeat(copies, 1) for t in (ids, mask, done))  # (M N, T), copy-major
    logits = model(ids[:, :-1], mask[:, :-1])[:, P - 1:]  # (M N, n, V): predicts columns P..
    logp = F.log_softmax(logits.float() / ro.temperature, -1).gather(-1, ids[:, P:, None]).squeeze(-1)
    logp = logp * done[:, P:]  # (M N, n)
    return torch.cat([logp.new_zeros(logp.shape[0], P), logp], 1)  # (M N, T)


@torch.no_grad()
def reference_logprobs(model, ro: Rollouts, reference=None) -> torch.Tensor:
    """Log-probs under the reference policy: ``reference`` when given (a
    frozen copy, for full fine-tuning), else ``model`` with its adapters off."""
    if reference is not None:
        return token_logprobs(reference, ro)
    if not adapter_layers(model):
        raise ValueError("a model without adapters needs an explicit reference model (a frozen copy)")
    with adapters_disabled(model):
        return token_logprobs(model, ro)


# ----- Stage 3: group advantages ----------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards, groups of ``group_size`` consecutive rows -> (N,) advantages.
    A group whose rewards are all equal gets 0 (never NaN): its std is 0 and
    so is every r - mean."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-d (N,), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {rewards.numel()} rewards")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    r = rewards.float().view(-1, group_size)  # (B, G)
    adv = r - r.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)  # Bessel's correction, as torch's default
    return adv.view(-1)


# ----- Stage 4: the loss --------------------------------------------------------
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) for tokens sampled from pi:
    exp(d) - d - 1 with d = ref_logp - logp. Non-negative (e^d >= 1 + d) and
    unbiased: E_pi[exp(d)] = sum pi_ref = 1, so E[k3] = E[-d] = KL."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.0,
              loss_type="grpo", max_new_tokens=None) -> torch.Tensor:
    """The GRPO loss (scalar) from (N, T) per-token log-probs of the current,
    old and reference policies, (N,) advantages and an (N, T) mask of the
    tokens that count. Padded tokens contribute nothing."""
    _check_loss_args(beta, eps_low, eps_high, loss_type)
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp, old_logp and mask must share one (N, T) shape, got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be (N,) = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if beta > 0 and (ref_logp is None or ref_logp.shape != logp.shape):
        raise ValueError("beta > 0 needs ref_logp of the same (N, T) shape as logp")
    if loss_type == "dr_grpo" and not max_new_tokens:
        raise ValueError("loss_type='dr_grpo' divides by max_new_tokens: pass it")
    A = advantages[:, None].to(logp.dtype)  # (N, 1)
    ratio = torch.exp(logp - old_logp)  # (N, T)
    surrogate = torch.min(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    per_token = -surrogate
    if beta > 0:
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    return aggregate(per_token, mask, loss_type, max_new_tokens)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "grpo",
              max_new_tokens: int | None = None) -> torch.Tensor:
    """Average (N, T) per-token losses over the tokens in ``mask`` the way
    ``loss_type`` says (see the module docstring)."""
    m = mask.to(per_token.dtype)
    total = torch.where(mask.bool(), per_token, 0.0)  # padded tokens are exactly 0, whatever they hold (inf, NaN)
    if loss_type == "grpo":
        return (total.sum(1) / m.sum(1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return total.sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total.sum() / (per_token.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


# ----- Stage 5: the objective for the shared loop ------------------------------
def rl_batches(task: Task, batch_size: int, mu: int = 1, seed: int = 0):
    """``step -> batch`` for ``GRPOObjective``: steps s*mu .. s*mu+mu-1 get
    the same ``batch_size`` training problems and ``rollout_id`` s, so the
    objective samples once and takes ``mu`` optimizer steps on them."""
    if batch_size < 1 or mu < 1:
        raise ValueError(f"need batch_size >= 1 and mu >= 1, got {batch_size}, {mu}")

    def get_batch(step: int) -> dict:
        rid = step // mu
        return {"problems": task.sample_train(batch_size, seed=stable_hash(seed, rid)), "rollout_id": rid}
    return get_batch


class GRPOObjective:
    """``(model, batch) -> (loss, metrics)`` for ``train``.

    Rollouts live here, not in the batch function: sampling needs the model
    as it is at that step, which the loop hands to the loss function. The
    objective keeps the last batch of rollouts, keyed by ``rollout_id``, so
    ``mu`` inner steps (and a wrapper that calls it several times per step)
    reuse one batch of rollouts. Subclasses change the method by overriding
    ``advantages`` or ``loss`` (and ``config_class`` for settings of their own).
    ``copies=M`` serves ReMix (``remix.rloo_loss``); a subclass that
    overrides ``__call__`` without it (S-GRPO, T-SPMO) gets M plain calls.
    """

    config_class = GRPOConfig  # the settings dataclass the RL recipe builds for this objective

    def __init__(self, cfg: GRPOConfig, task: Task, tok: Tokenizer | None = None, reference=None, seed: int = 0):
        self.cfg, self.task, self.tok = cfg, task, tok or Tokenizer()
        self.reference = reference  # None: adapters_disabled(model), or a frozen copy for a model without adapters
        self.seed = seed
        self.max_new_tokens = cfg.max_new_tokens or task.max_answer_tokens()
        self.rollout_id = None
        self.ro: Rollouts | None = None
        self.seconds = {"generate": 0.0, "reference": 0.0}  # time spent in stages 1-3, for benchmarks

    # Stages 1-3, once per rollout_id
    def rollouts(self, model, batch) -> Rollouts:
        if not isinstance(batch, dict) or "problems" not in batch or "rollout_id" not in batch:
            raise ValueError("a GRPO batch is a dict with 'problems' and 'rollout_id' (see rl_batches)")
        if self.ro is not None and batch["rollout_id"] == self.rollout_id:
            return self.ro
        cfg = self.cfg
        need_ref = cfg.beta > 0 or cfg.log_kl
        if need_ref and self.reference is None and not adapter_layers(model):
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)  # full fine-tuning: freeze pi_0
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(stable_hash(self.seed, batch["rollout_id"]) % 2**63)
        t0 = time.perf_counter()
        ro = sample_rollouts(model, batch["problems"], self.task, self.tok, cfg.group_size, self.max_new_tokens,
                             cfg.temperature, generator=gen)
        t1 = time.perf_counter()
        if need_ref:
            ro.ref_logp = reference_logprobs(model, ro, self.reference)
        self.seconds["generate"] += t1 - t0
        self.seconds["reference"] += time.perf_counter() - t1
        ro.advantages = self.advantages(ro.rewards, ro.group_size)
        self.rollout_id, self.ro = batch["rollout_id"], ro
        return ro

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        return group_advantages(rewards, group_size, self.cfg.scale)

    def loss(self, logp: torch.Tensor, old_logp: torch.Tensor, ro: Rollouts) -> torch.Tensor:
        """Stage 4: the scalar loss from the fresh log-probs; override to change the objective."""
        c = self.cfg
        return grpo_loss(logp, old_logp, ro.ref_logp, ro.advantages, ro.completion_mask, eps_low=c.eps_low,
                         eps_high=c.eps_high, beta=c.beta, loss_type=c.loss_type, max_new_tokens=self.max_new_tokens)

    def __call__(self, model, batch, copies: int | None = None) -> tuple[torch.Tensor, dict | list[dict]]:
        """Stages 1-4: (loss, metrics). ``copies = M`` (ReMix's ``rloo_loss``
        asks for it): the policy pass runs over M stacked copies of the
        rollouts at once, and the result is the (M,) losses and M metrics."""
        ro = self.rollouts(model, batch)
        if copies is not None:
            copies = check_int("copies", copies, 1)
            out = [self.loss_and_metrics(logp, ro) for logp in token_logprobs(model, ro, copies).chunk(copies)]
            return torch.stack([loss for loss, _ in out]), [metrics for _, metrics in out]
        return self.loss_and_metrics(token_logprobs(model, ro), ro)  # (N, T) log-probs, with gradient

    def loss_and_metrics(self, logp, ro: Rollouts) -> tuple[torch.Tensor, dict]:
        """Stage 4 and the metrics, from the fresh (N, T) log-probs."""
        # mu = 1: pi_old is pi itself, so the ratio is exactly 1
        old = ro.old_logp if self.cfg.mu > 1 else logp.detach()
        return self.loss(logp, old, ro), self.metrics(logp.detach(), old, ro)

    def metrics(self, logp, old_logp, ro: Rollouts) -> dict:
        m = ro.completion_mask.float()
        n_tok = m.sum().clamp(min=1)
        ratio, A = torch.exp(logp - old_logp), ro.advantages[:, None]
        clipped = ((ratio < 1 - self.cfg.eps_low) & (A < 0)) | ((ratio > 1 + self.cfg.eps_high) & (A > 0))
        out = {"reward": float(ro.rewards.mean()), "clip_frac": float((clipped * m).sum() / n_tok),
               "length": float(m.sum(1).mean())}
        if ro.ref_logp is not None:
            out["kl"] = float((k3_kl(logp, ro.ref_logp) * m).sum() / n_tok)
        # the policy-gradient surrogate's value, which (unlike the loss at mu = 1, where the ratio is
        # exactly 1) depends on the policy: ReMix's RLOO router compares its routings by it (remix.rloo_loss)
        out["selection_loss"] = float(aggregate(-A * logp, ro.completion_mask, self.cfg.loss_type, self.max_new_tokens))
        return out

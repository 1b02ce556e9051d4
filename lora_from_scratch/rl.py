"""The RL recipe: a partly trained base, adapters, and a GRPO-family objective
on the shared training loop.

- ``rl_base_config(task)``: the starting policy. RL only learns from groups
  whose completions differ in reward, so it needs a model that is sometimes
  right and sometimes wrong. We get one by supervised training on the task
  itself for a few hundred steps only (``RL_BASE_STEPS``), cached like every
  pretrained base (``recipes.load_or_pretrain``).
- ``ALGOS``: the table of objectives, ``--algo NAME`` -> objective class
  (``GRPOObjective`` and its subclasses). An objective class names its config
  dataclass in ``config_class``; ``RLConfig.algo_options`` fills that
  class's own fields.
- ``rl_finetune(cfg)``: adds ``cfg.method``'s adapters (any method of the
  method table; ``"full"`` trains every weight instead), trains them with the
  objective through ``train``, and reports greedy exact-match on the fixed
  test set before and after, with the objective's metrics per step.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from .adapters import adapter_layers, trainable_parameters
from .checkpoint import jsonable
from .grpo import GRPOObjective, rl_batches
from .methods import get_method
from .rank_allocation import VARIANTS, GradNormProbe, probe_and_rebuild, share_spread
from .recipes import PretrainConfig, adapt, load_or_pretrain
from .tasks import Task, parse_digits
from .tokenizer import Tokenizer
from .train import TrainConfig, evaluate, train

from .sgrpo import SGRPOObjective  # noqa: E402  (they subclass GRPOObjective)
from .tspmo import TSPMOObjective  # noqa: E402

ALGOS: dict[str, type] = {"grpo": GRPOObjective, "sgrpo": SGRPOObjective,
                          "tspmo": TSPMOObjective}  # --algo name -> objective class

# Supervised steps of the partly trained base, by task (batch 128, lr 3e-3,
# the pretraining recipe otherwise): chosen so that the base is right on
# roughly a third of the test problems. Other tasks: RL_BASE_DEFAULT_STEPS.
RL_BASE_STEPS = {"mul": 800, "wordprob": 300}
RL_BASE_DEFAULT_STEPS = 300


def rl_base_config(task: str, digits=None, seed: int = 0, device: str = "cpu", progress: bool = True,
                   steps: int | None = None) -> PretrainConfig:
    """The partly supervised starting base for ``task`` (see the module docstring)."""
    steps = steps or RL_BASE_STEPS.get(task, RL_BASE_DEFAULT_STEPS)
    return PretrainConfig(task=task, digits=digits, steps=steps, batch_size=128, stop_when_solved=False,
                          seed=seed, device=device, progress=progress)


@dataclass
class RLConfig:
    algo: str = "grpo"  # a name in ALGOS
    method: str = "lora"  # adapter method (a name in methods.METHODS), or "full" to train every weight
    rank: int = 8  # (maximum) adapter rank
    alpha: float | None = None  # scale numerator; None: the method's default
    scale: str | None = None  # scale rule c(r); None: the method's default
    options: dict = field(default_factory=dict)  # the adapter method's own options
    targets: tuple | str = "all-linear"  # which linear layers get adapters
    task: str = "mul"  # task to improve by RL
    digits: tuple | str | int | None = None  # its operand size
    group_size: int = 8  # G completions per prompt
    prompts: int = 16  # prompts per batch of rollouts (N = prompts * G completions)
    beta: float = 0.0  # weight of the k3 KL to the reference (adapters off)
    eps_low: float = 0.2  # ratio clip below
    eps_high: float = 0.2  # ratio clip above
    loss_type: str = "grpo"  # "grpo", "dapo" or "dr_grpo"
    adv_scale: str = "group"  # "group" or "none" (Dr. GRPO: no division by the std)
    mu: int = 1  # optimizer steps per batch of rollouts
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int | None = None  # None: the task's longest answer + <eos>
    algo_options: dict = field(default_factory=dict)  # extra fields of the objective's config class
    steps: int = 200  # optimizer steps
    rank_allocation: str | None = None  # "uniform", "gradient" or "random": probe, reallocate, rebuild; None: plain
    rank_budget: int | None = None  # total rank over the adapted layers when reallocating; None: layers x rank
    rank_warmup: int = 20  # steps of the uniform-rank probe before reallocating (on top of `steps`)
    lr: float = 1e-3  # learning rate (constant after warmup; 3e-3 made mul worse in our runs)
    warmup_steps: int = 10  # linear warmup
    eval_every: int = 50  # greedy test exact-match every this many steps (0: only at the end)
    base_steps: int | None = None  # supervised steps of the starting base; None: RL_BASE_STEPS
    seed: int = 0  # seeds the adapters, the prompts and the sampling
    base_seed: int = 0  # seed of the starting base
    device: str = "cpu"  # "cpu" or "cuda"
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; expected one of {', '.join(ALGOS)}")
        if self.method != "full":
            self.rank, self.alpha, self.scale, _ = get_method(self.method).resolve(self.rank, self.alpha, self.scale,
                                                                                  self.options)
        self.digits = parse_digits(self.task, self.digits)
        if self.rank_allocation is not None:
            if self.rank_allocation not in VARIANTS:
                raise ValueError(f"unknown rank_allocation {self.rank_allocation!r}; expected one of {VARIANTS}")
            if self.method == "full" or not isinstance(self.rank_warmup, int) or self.rank_warmup < 1:
                raise ValueError(f"rank_allocation needs adapters (not method='full') and rank_warmup >= 1, "
                                 f"got method={self.method!r}, rank_warmup={self.rank_warmup!r}")
        elif self.rank_budget is not None:
            raise ValueError("rank_budget is used only with rank_allocation")
        if self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")
        self.objective_config()  # bad GRPO settings fail here, before any work

    def objective_config(self):
        cls = ALGOS[self.algo].config_class
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(self.algo_options) - known)
        if unknown:
            raise ValueError(f"algo {self.algo!r} has no option(s) {unknown}; its config has {sorted(known)}")
        common = dict(group_size=self.group_size, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                      beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high, loss_type=self.loss_type,
                      scale=self.adv_scale, mu=self.mu)
        return cls(**{**common, **self.algo_options})


def rl_finetune(cfg: RLConfig, base_model=None, cache_dir=None, batches=None):
    """Run ``cfg``; returns (model, metrics). ``base_model`` overrides the
    cached partly supervised base; ``batches`` (``step -> batch``, see
    ``rl_batches``) the stream of training problems."""
    t_start = time.perf_counter()
    task = Task(cfg.task, cfg.digits)
    if base_model is None:
        base_cfg = rl_base_config(cfg.task, cfg.digits, cfg.base_seed, cfg.device, cfg.progress, cfg.base_steps)
        base_model, _ = load_or_pretrain(base_cfg, cache_dir)
    model = copy.deepcopy(base_model).to(cfg.device)
    base_acc = evaluate(model, task)
    torch.manual_seed(cfg.seed)  # adapter init
    if cfg.method == "full":
        wrap = lambda loss_fn: loss_fn  # noqa: E731
    else:
        wrap = adapt(model, cfg.method, cfg.rank, cfg.alpha, cfg.scale, cfg.options, cfg.targets)
    objective = ALGOS[cfg.algo](cfg.objective_config(), task, Tokenizer(), seed=cfg.seed)
    alloc, probe = {}, None
    if cfg.rank_allocation is not None:  # probe a uniform warm-up, reallocate, rebuild (rank_allocation.py)
        n_layers = len(adapter_layers(model))
        if cfg.rank_budget is not None and cfg.rank_budget < n_layers:
            raise ValueError(f"rank_budget={cfg.rank_budget} is below the {n_layers} adapted layers (1 rank each)")
        spec = get_method(cfg.method)
        opts = spec.make_options(cfg.options)
        warm = TrainConfig(steps=cfg.rank_warmup, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.rank_warmup),
                           schedule="constant", seed=cfg.seed, progress=cfg.progress, log_every=1)
        alloc = probe_and_rebuild(
            model, wrap(ALGOS[cfg.algo](cfg.objective_config(), task, Tokenizer(), seed=cfg.seed + 1)),
            rl_batches(task, cfg.prompts, cfg.mu, cfg.seed + 30_000), warm, cfg.rank_allocation, cfg.rank,
            lambda lin, r: spec.build(r, cfg.alpha, cfg.scale, opts)(lin), cfg.rank_budget, cfg.seed)
        probe = GradNormProbe(model, max_steps=cfg.rank_warmup)  # the same number of steps after the rebuild
        wrap = (lambda w: lambda loss_fn: probe.wrap(w(loss_fn)))(wrap)
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, schedule="constant",
                       eval_every=cfg.eval_every, seed=cfg.seed, progress=cfg.progress, log_every=1)
    clock = {"eval": 0.0, "eval_cpu": 0.0}

    def eval_fn(m):  # greedy exact-match on the fixed test set, its time kept apart
        t1, c1 = time.perf_counter(), time.process_time()
        scores = {"test_exact_match": evaluate(m, task)}
        clock["eval"] += time.perf_counter() - t1
        clock["eval_cpu"] += time.process_time() - c1
        return scores

    t0, c0 = time.perf_counter(), time.process_time()
    batches = batches or rl_batches(task, cfg.prompts, cfg.mu, cfg.seed + 20_000)
    res = train(model, wrap(objective), batches, tcfg, eval_fn)
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    if probe is not None:
        shares = probe.shares()
        probe.remove()
        alloc.update(probe_shares_after=shares, share_spread_after=share_spread(list(shares.values())))
    per_step = {k: [m.get(k) for m in res.metrics] for k in ("reward", "kl", "clip_frac", "length", "grad_frac")}
    last = res.metrics[-1] if res.metrics else {}
    metrics = {"algo": cfg.algo, "method": cfg.method, "task": task.spec(), "rank": cfg.rank,
               "config": jsonable(asdict(cfg)), "base_exact_match": base_acc,
               "test_exact_match": res.final["test_exact_match"],
               "evals": [(step, s["test_exact_match"]) for step, s in res.evals],
               "reward": last.get("reward"), "kl": last.get("kl"), "clip_frac": last.get("clip_frac"),
               "length": last.get("length"), "grad_frac": last.get("grad_frac"), "per_step": per_step,
               "trainable_parameters": trainable_parameters(model), "steps": res.steps,
               "generate_seconds": objective.seconds["generate"], "reference_seconds": objective.seconds["reference"],
               "eval_seconds": clock["eval"],
               # CPU seconds of this process in training, evaluations excluded: on a shared machine
               # this is closer than the wall clock to what the run costs on an idle one
               "train_cpu_seconds": train_cpu - clock["eval_cpu"],
               "train_seconds": train_seconds, **alloc, "seconds": time.perf_counter() - t_start}
    return model, metrics

"""End-to-end recipes the CLI, the demo and the benchmarks share:
pretrain a base model, cache it, fine-tune adapters on top of it.

Each recipe is a dataclass of settings (one comment per field) and a
function that runs it and returns the trained model and a metrics dict.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adapters import add_adapters, trainable_parameters
from .checkpoint import jsonable, load_model, save_model
from .lora import evaluate_ranks
from .matryoshka import aurac
from .methods import get_method
from .model import GPTConfig, TinyGPT
from .data import MAX_BATCH_SIZE, train_batches
from .tasks import TASKS, Task, parse_digits
from .tokenizer import Tokenizer
from .validate import check_bool, check_choice, check_float, check_int, check_names, check_ranks, check_seed, \
    check_writable_file
from .train import TrainConfig, evaluate, sft_loss, train


def default_cache() -> Path:
    """Where base checkpoints are cached: $LORA_FROM_SCRATCH_CACHE, else the
    checkout's data/checkpoints/ (editable install), else ./data/checkpoints/."""
    if os.environ.get("LORA_FROM_SCRATCH_CACHE"):
        return Path(os.environ["LORA_FROM_SCRATCH_CACHE"])
    repo = Path(__file__).resolve().parent.parent
    root = repo if (repo / "setup.cfg").exists() else Path.cwd()
    return root / "data" / "checkpoints"


CACHE_VERSION = 2  # part of every cached base's file name

# Default (steps, batch size, stop when solved) by (task, digits). For 2- and
# 3-digit addition they were chosen with benchmarks/pretrain_speed.py so
# that every seed we tried reaches >= 99% test exact-match. 3-digit addition
# sometimes sits on a plateau for many hundreds of steps, so its recipe is
# "at most 3000 steps, but stop once VALID_SIZE training-split problems are
# all answered" (checked every CHECK_EVERY steps): fast seeds stay fast and
# slow ones get the time they need. 1-digit addition and the other tasks
# get a guess (for the others, one that grows with the answer length).
PRETRAIN_RECIPES = {("add", (1, 1)): (300, 128, False), ("add", (2, 2)): (800, 96, False),
                    ("add", (3, 3)): (3000, 128, True)}
VALID_SIZE = 500  # training-split problems scored by the stop-when-solved check
VALID_SEED = 4321  # their draw (training problems, never test ones)
CHECK_EVERY = 100  # steps between checks, unless eval_every is set


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU (try --device cpu)")
    return name


@dataclass
class PretrainConfig:
    task: str = "add"  # task to learn from scratch
    digits: tuple | str | int | None = None  # operand size; None: the task's default
    steps: int | None = None  # optimizer steps (at most, when stopping early); None: from PRETRAIN_RECIPES or a guess
    batch_size: int | None = None  # problems per step; None: from PRETRAIN_RECIPES, else 128
    stop_when_solved: bool | None = None  # stop once VALID_SIZE training problems are all right; None: recipe
    lr: float = 3e-3  # peak learning rate (warmup, then cosine decay)
    warmup_steps: int = 50  # linear warmup
    grad_clip: float | None = None  # no clipping: at 1.0 the first plateau lasted longer in our runs
    n_layer: int = 2  # TinyGPT depth
    n_head: int = 4  # attention heads
    n_embd: int = 64  # width
    pos_init_std: float = 0.1  # init std of the position embeddings (see model.py)
    block_size: int = 128  # longest sequence (word problems are ~100 characters)
    eval_every: int = 0  # also evaluate on the test set every this many steps (0: only at the end)
    seed: int = 0  # seeds the weights, the data and the training
    device: str = "cpu"  # "cpu" or "cuda"
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        self.digits = parse_digits(self.task, self.digits)
        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("n_layer", 1), ("n_head", 1),
                         ("n_embd", 1), ("block_size", 1), ("eval_every", 0)):
            if getattr(self, name) is not None:
                setattr(self, name, check_int(name, getattr(self, name), lo,
                                              MAX_BATCH_SIZE if name == "batch_size" else None))
        self.lr = check_float("lr", self.lr, positive=True)
        self.pos_init_std = check_float("pos_init_std", self.pos_init_std, 0.0)
        if self.grad_clip is not None:
            self.grad_clip = check_float("grad_clip", self.grad_clip, positive=True)
        if self.stop_when_solved is not None:
            self.stop_when_solved = check_bool("stop_when_solved", self.stop_when_solved)
        self.seed = check_seed("seed", self.seed)
        check_choice("device", self.device, ("cpu", "cuda"))
        guess = (500 * Task(self.task, self.digits).max_answer_tokens(), 128, False)
        steps, batch, stop = PRETRAIN_RECIPES.get((self.task, self.digits), guess)
        self.steps = steps if self.steps is None else self.steps
        self.batch_size = batch if self.batch_size is None else self.batch_size
        self.stop_when_solved = stop if self.stop_when_solved is None else bool(self.stop_when_solved)

    def stop_check_every(self) -> int | None:
        """Steps between stop-when-solved checks (None: no check). They run
        with the test-set evaluations when ``eval_every`` is set."""
        return (self.eval_every or CHECK_EVERY) if self.stop_when_solved else None

    def cache_key(self) -> str:
        """A file name that changes whenever a setting that shapes the weights
        does (bump CACHE_VERSION when the code that trains a base changes)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("device", "progress", "eval_every")}
        d["version"] = CACHE_VERSION
        if self.stop_when_solved:  # where a run stops, so its weights, depends on the check interval
            d["check_every"] = self.stop_check_every()
        h = hashlib.sha1(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:8]
        return f"base_{self.task}{'x'.join(map(str, self.digits))}_s{self.seed}_{h}.pt"


def pretrain(cfg: PretrainConfig) -> tuple[TinyGPT, dict]:
    """Train a TinyGPT from scratch on one task; returns (model, metrics)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tok = Tokenizer()
    task = Task(cfg.task, cfg.digits)
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, pos_init_std=cfg.pos_init_std)).to(cfg.device)
    check = cfg.stop_check_every()
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
                       eval_every=check or cfg.eval_every, stop_metric="valid_exact_match" if check else None,
                       seed=cfg.seed, progress=cfg.progress)
    valid = task.sample_train(VALID_SIZE, seed=VALID_SEED) if check else None
    clock = {"eval": 0.0}  # seconds spent evaluating, kept out of the training time

    def eval_fn(m):
        t1 = time.perf_counter()
        scores = {"train_seconds": t1 - t0 - clock["eval"]}
        if valid is not None:
            scores["valid_exact_match"] = evaluate(m, task, valid)
        if cfg.eval_every:  # a test-set curve, for benchmarks/pretrain_speed.py
            scores["test_exact_match"] = evaluate(m, task)
        clock["eval"] += time.perf_counter() - t1
        return scores

    res = train(model, sft_loss, train_batches(task, tok, cfg.batch_size, cfg.seed), tcfg, eval_fn=eval_fn)
    test_em = res.final.get("test_exact_match")
    if test_em is None:  # the test set is scored once, at the end
        test_em = evaluate(model, task)
    metrics = {"task": task.spec(), "test_exact_match": test_em, "steps": res.steps,
               "max_steps": cfg.steps, "stopped_early": res.stopped_early, "batch_size": cfg.batch_size,
               "final_loss": res.losses[-1] if res.losses else None,
               "parameters": sum(p.numel() for p in model.parameters()),
               # (step, seconds of model building and training so far, test exact-match) per test evaluation
               "evals": [(step, s["train_seconds"], s["test_exact_match"]) for step, s in res.evals
                         if "test_exact_match" in s],
               "seconds": time.perf_counter() - t0}
    return model, metrics


def load_or_pretrain(cfg: PretrainConfig, cache_dir=None) -> tuple[TinyGPT, dict]:
    """The cached base model for ``cfg`` if there is one, else pretrain and
    cache it (``cache_dir`` default: ``default_cache()``)."""
    path = Path(cache_dir or default_cache()) / cfg.cache_key()
    if path.exists():
        model, meta = load_model(path, cfg.device)
        return model, {**meta.get("metrics", {}), "cached": True, "path": str(path)}
    check_writable_file(path, "cached base model")  # before the work, not after
    model, metrics = pretrain(cfg)
    save_model(model, path, metrics=metrics, pretrain=jsonable(asdict(cfg)))
    return model, {**metrics, "cached": False, "path": str(path)}


# ----- fine-tuning ----------------------------------------------------------
LOG_EVERY = 10  # steps between the entries of a fine-tuning run's train_log
@dataclass
class FinetuneConfig:
    method: str = "lora"  # a name in methods.METHODS: "lora", "dylora", "matryoshka", ...
    rank: int = 8  # (maximum) adapter rank R
    alpha: float | None = None  # scale numerator; None: the method's default (2 * rank for LoRA)
    scale: str | None = None  # scale rule c(r): "lora", "rslora" or "none"; None: the method's default
    options: dict = field(default_factory=dict)  # the method's own settings, e.g. {"unfrozen": True}
    targets: tuple | str = "all-linear"  # which linear layers get adapters
    task: str = "sub"  # task to fine-tune on (the base has not seen it)
    digits: tuple | str | int | None = None  # its operand size
    steps: int = 600  # optimizer steps
    batch_size: int = 128  # problems per step
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 30  # linear warmup
    eval_ranks: tuple | None = None  # sub-ranks to evaluate (methods with sub-ranks); None: {1, 2, 4, ..., R}
    base: PretrainConfig = field(default_factory=PretrainConfig)  # the base model to adapt
    seed: int = 0  # seeds the adapters, the data and the training
    device: str = "cpu"  # "cpu" or "cuda"
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        spec = get_method(self.method)
        check_choice("task", self.task, TASKS)
        self.digits = parse_digits(self.task, self.digits)
        self.rank, self.alpha, self.scale, _ = spec.resolve(self.rank, self.alpha, self.scale, self.options)
        if self.targets != "all-linear":
            self.targets = tuple(check_names("targets", self.targets))
        self.steps = check_int("steps", self.steps, 0)
        self.batch_size = check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        self.lr = check_float("lr", self.lr, positive=True)
        self.warmup_steps = check_int("warmup_steps", self.warmup_steps, 0)
        self.seed = check_seed("seed", self.seed)
        check_choice("device", self.device, ("cpu", "cuda"))
        if not isinstance(self.base, PretrainConfig):
            raise TypeError(f"base must be a PretrainConfig, got {type(self.base).__name__}")
        if self.eval_ranks is not None:
            self.eval_ranks = check_ranks("eval_ranks", self.eval_ranks, 1, self.rank)
        if self.eval_ranks and not spec.sub_ranks:
            raise ValueError(f"method {self.method!r} has no sub-ranks to evaluate; drop eval_ranks")


def adapt(model, method: str, rank: int, alpha: float, scale: str, options: dict | None = None,
          targets="all-linear"):
    """Put ``method``'s adapters into ``model`` (in place) and return the
    method's ``wrap_loss(loss_fn)``: the identity for methods whose training
    step is plain, e.g. DyLoRA's per-step rank draw otherwise. Shared by
    ``finetune`` and the RL recipes, so any adapter trains with any objective."""
    spec = get_method(method)
    opts = spec.make_options(options)
    if alpha is None and scale == "none":
        alpha = 1.0  # c(r) = 1 does not read alpha
    add_adapters(model, spec.build(rank, alpha, scale, opts), targets)
    if spec.wrap_loss is None:
        return lambda loss_fn: loss_fn
    return lambda loss_fn: spec.wrap_loss(loss_fn, opts)


def finetune(cfg: FinetuneConfig, base_model: TinyGPT | None = None, cache_dir=None):
    """Add adapters to the base model, train them on ``cfg.task``, and
    evaluate them (every sub-rank, for methods that have them). Returns
    (model, metrics)."""
    t_start = time.perf_counter()
    spec = get_method(cfg.method)
    if base_model is None:
        base_model, _ = load_or_pretrain(cfg.base, cache_dir)
    model = copy.deepcopy(base_model).to(cfg.device)  # the caller's base stays untouched
    tok = Tokenizer()
    task = Task(cfg.task, cfg.digits)
    longest = max(len(p.prompt) + len(p.answer) + 2 for p in task.test_set())
    if longest > model.config.block_size:
        raise ValueError(f"task {cfg.task} needs {longest} positions, the base model has {model.config.block_size}")
    base_acc = evaluate(model, task)
    torch.manual_seed(cfg.seed)  # adapter init
    wrap = adapt(model, cfg.method, cfg.rank, cfg.alpha, cfg.scale, cfg.options, cfg.targets)
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                       progress=cfg.progress)
    t0 = time.perf_counter()
    res = train(model, wrap(sft_loss), train_batches(task, tok, cfg.batch_size, cfg.seed + 10_000), tcfg)
    train_seconds = time.perf_counter() - t0
    opts = spec.make_options(cfg.options)
    extra = spec.extra_metrics(model, task, opts) if spec.extra_metrics else {}
    metrics = {"method": cfg.method, "task": task.spec(), "rank": cfg.rank, "alpha": cfg.alpha, "scale": cfg.scale,
               "options": jsonable(asdict(opts)), "base_exact_match": base_acc}
    if spec.sub_ranks:
        ranks = cfg.eval_ranks or tuple(r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256) if r < cfg.rank) + (cfg.rank,)
        by_rank = evaluate_ranks(model, task, ranks)
        full = by_rank[cfg.rank] if cfg.rank in by_rank else evaluate_ranks(model, task, [cfg.rank])[cfg.rank]
        metrics.update(test_exact_match=full, exact_match_by_rank={str(r): a for r, a in by_rank.items()},
                       aurac=aurac(list(by_rank), [100 * a for a in by_rank.values()]))
    else:
        metrics["test_exact_match"] = evaluate(model, task)
    # the loss and the loss_fn's metrics (e.g. a router's ESS) every LOG_EVERY steps and at the last
    train_log = [{"step": i + 1, "loss": loss, **m} for i, (loss, m) in enumerate(zip(res.losses, res.metrics))
                 if (i + 1) % LOG_EVERY == 0 or i + 1 == len(res.losses)]
    metrics.update(trainable_parameters=trainable_parameters(model), steps=res.steps,
                   final_loss=res.losses[-1] if res.losses else None, train_log=train_log, **extra,
                   train_seconds=train_seconds, seconds=time.perf_counter() - t_start)
    return model, metrics

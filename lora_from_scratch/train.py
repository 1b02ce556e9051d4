"""The one training loop, and the greedy exact-match evaluation.

``train(model, loss_fn, batches, config)`` knows nothing about tasks,
adapters or objectives. It needs:

- ``loss_fn(model, batch) -> (loss, metrics)``: a scalar tensor to minimise
  and a dict of floats to show. Supervised fine-tuning, DyLoRA's rank
  sampling, a REINFORCE-style router loss or a GRPO objective are all just
  different ``loss_fn``s.
- ``batches``: ``step -> batch`` (preferred: a resumed run then sees the same
  data) or any iterable of batches.

It trains the parameters with ``requires_grad=True`` (all of them for
pretraining, only the adapters after ``add_adapters``) with AdamW, an
optional linear warmup and cosine decay, and gradient clipping. With
``stop_metric``, it stops early at the first evaluation where that metric
reaches ``stop_value`` (pretraining uses it to stop once a sample of
training problems is solved).

Checkpoints (``checkpoint_path``) hold everything a resume needs, and what
the run is a function of: the settings of the schedule, the seed, and the
``signature`` of the batch function (task, batch size and data seed for
``data.train_batches``). A resume that changes any of them is refused, since
it would match neither run. Parameters that become NaN or infinite are
never saved: training stops and names the last checkpoint that is good.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .adapters import adapter_configs
from .checkpoint import atomic_save, jsonable, load_state_strict, safe_load
from .tasks import Problem, Task
from .tokenizer import Tokenizer
from .validate import check_bool, check_choice, check_float, check_int


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in total (a resumed run counts from 0 too)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW decay on 2-d tensors (matrices, embeddings), not biases/norms
    betas: tuple = (0.9, 0.99)  # AdamW betas
    warmup_steps: int = 0  # linear warmup from 0 to lr
    schedule: str = "cosine"  # "cosine" (decay to min_lr_ratio * lr) or "constant"
    min_lr_ratio: float = 0.1  # final lr / peak lr for the cosine schedule
    grad_clip: float | None = 1.0  # max global gradient norm; None turns it off
    eval_every: int = 0  # run eval_fn every this many steps (0: only at the end)
    stop_metric: str | None = None  # stop early after an evaluation where this eval_fn metric ...
    stop_value: float = 1.0  # ... is >= this (the lr schedule still spans all `steps`)
    checkpoint_every: int = 0  # save a resumable checkpoint every this many steps
    checkpoint_path: str | None = None  # where; required by checkpoint_every and resume
    resume: bool = False  # continue from checkpoint_path if it exists
    seed: int = 0  # seeds torch's RNG (dropout, sampling inside loss_fn)
    progress: bool = True  # show a tqdm bar with the live loss and metrics
    log_every: int = 10  # refresh the bar's numbers every this many steps

    def __post_init__(self):
        self.steps = check_int("steps", self.steps, 0)
        self.lr = check_float("lr", self.lr, positive=True)
        self.weight_decay = check_float("weight_decay", self.weight_decay, 0.0)
        self.min_lr_ratio = check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if self.grad_clip is not None:
            self.grad_clip = check_float("grad_clip", self.grad_clip, positive=True)
        self.stop_value = check_float("stop_value", self.stop_value)
        self.seed = check_int("seed", self.seed, -2**63, 2**64 - 1)
        for name in ("log_every", "eval_every", "checkpoint_every", "warmup_steps"):
            setattr(self, name, check_int(name, getattr(self, name)))
        for name in ("resume", "progress"):
            setattr(self, name, check_bool(name, getattr(self, name)))
        check_choice("schedule", self.schedule, ("cosine", "constant"))
        if self.log_every < 1 or self.eval_every < 0 or self.checkpoint_every < 0 or self.warmup_steps < 0:
            raise ValueError(f"need log_every >= 1 and eval_every, checkpoint_every, warmup_steps >= 0, got "
                             f"{self.log_every}, {self.eval_every}, {self.checkpoint_every}, {self.warmup_steps}")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_path:
            raise ValueError("checkpoint_every and resume need checkpoint_path")
        if self.stop_metric is not None and not self.eval_every:
            raise ValueError(f"stop_metric={self.stop_metric!r} needs eval_every > 0 to be checked during training")


@dataclass
class TrainResult:
    steps: int  # steps done when training stopped
    seconds: float  # wall time of this call
    losses: list = field(default_factory=list)  # loss of every step of this call
    metrics: list = field(default_factory=list)  # loss_fn's metrics dict of every step of this call
    evals: list = field(default_factory=list)  # (step, metrics) of every evaluation
    final: dict = field(default_factory=dict)  # last evaluation's metrics
    stopped_early: bool = False  # True when stop_metric reached stop_value before `steps`


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for ``step``: a pure function, so resuming needs no state."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters with requires_grad=True: nothing to train")
    groups = [  # no weight decay on biases and LayerNorm gains (1-d tensors)
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                             foreach=True)


def to_device(batch, device):
    """Move every tensor of a dict batch (or a bare tensor) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def train(model: torch.nn.Module, loss_fn, batches, config: TrainConfig | None = None,
          eval_fn=None) -> TrainResult:
    """Train ``model`` for ``config.steps`` steps; see the module docstring.

    ``eval_fn(model) -> dict`` runs under ``torch.no_grad`` in eval mode every
    ``eval_every`` steps and once at the end; its numbers join the bar.
    """
    cfg = config or TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.stop_metric is not None and eval_fn is None:
        raise ValueError(f"stop_metric={cfg.stop_metric!r} needs an eval_fn that reports it")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg)
    data_signature = jsonable(getattr(batches, "signature", None) or {}) or None  # what the batches depend on
    last_good = None  # (path, step) of the last checkpoint known to hold finite weights
    start, done = 0, False
    # Stage 1: a fresh start, or exactly where a checkpoint left off
    if cfg.resume and cfg.checkpoint_path and os.path.exists(cfg.checkpoint_path):
        ckpt = safe_load(cfg.checkpoint_path, "training checkpoint")
        for key in ("model", "optimizer", "step", "rng"):
            if key not in ckpt:
                raise ValueError(f"{cfg.checkpoint_path} is not a training checkpoint: no {key!r}")
        saved = ckpt.get("train_config", {})
        now = {**jsonable(asdict(cfg)), "data": data_signature}
        if "data" in ckpt:
            saved = {**saved, "data": ckpt["data"]}
        changed = [k for k in ("steps", "lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay",
                               "grad_clip", "stop_metric", "stop_value", "seed", "betas", "data")
                   if k in saved and saved[k] != now[k]]
        if changed:  # the run is a function of these: resuming would silently change it
            raise ValueError(f"{cfg.checkpoint_path} was written with other settings: "
                             + ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in changed))
        if "adapters" in ckpt and ckpt["adapters"] != adapter_configs(model):
            raise ValueError(f"{cfg.checkpoint_path} was written for other adapters: {ckpt['adapters']}, "
                             f"this model has {adapter_configs(model)}")
        load_state_strict(model, ckpt["model"], cfg.checkpoint_path)
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        start = int(ckpt["step"])
        last_good = (cfg.checkpoint_path, start)
        done = bool(ckpt.get("stopped_early"))  # that run had reached its stop_value: nothing left to do
    else:
        torch.manual_seed(cfg.seed)
    get = batches if callable(batches) else _skipping(iter(batches), start)  # step -> batch

    result = TrainResult(steps=start, seconds=0.0, stopped_early=done)
    shown: dict = {}
    model.train()
    bar = tqdm(range(start, start if done else cfg.steps), initial=start, total=cfg.steps,
               disable=not cfg.progress, dynamic_ncols=True, desc="train")
    for step in bar:
        # Stage 2: one optimizer step
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = to_device(get(step), device)
        loss, metrics = loss_fn(model, batch)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; training stopped"
                                     + _last_good(cfg, last_good))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        result.losses.append(loss_value)
        result.metrics.append(metrics)
        result.steps = step + 1

        # Stage 3: show, evaluate, checkpoint
        if cfg.progress and (step % cfg.log_every == 0 or step + 1 == cfg.steps):
            shown.update(loss=loss_value, **metrics)
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        last = step + 1 == cfg.steps
        if eval_fn is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            scores = run_eval(model, eval_fn)
            result.evals.append((step + 1, scores))
            result.final = scores
            shown.update(scores)
            if cfg.stop_metric is not None and not last:
                if cfg.stop_metric not in scores:
                    raise ValueError(f"stop_metric {cfg.stop_metric!r} is not among eval_fn's metrics {sorted(scores)}")
                result.stopped_early = scores[cfg.stop_metric] >= cfg.stop_value
                last = result.stopped_early  # the goal is reached: this step is the last
        if cfg.checkpoint_path and (last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            _check_finite_parameters(model, step, cfg, last_good)  # never save a broken model
            state = {"step": step + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": torch.get_rng_state(), "train_config": jsonable(asdict(cfg)),
                     "adapters": adapter_configs(model), "stopped_early": result.stopped_early,
                     "data": data_signature}
            if torch.cuda.is_available():  # sampling on a GPU draws from its own generator
                state["cuda_rng"] = torch.cuda.get_rng_state_all()
            atomic_save(state, cfg.checkpoint_path)
            last_good = (cfg.checkpoint_path, step + 1)
        if result.stopped_early:
            break
    bar.close()
    if result.steps > start:  # the caller gets (and may save) this model: it must be finite
        _check_finite_parameters(model, result.steps - 1, cfg, last_good)
    if eval_fn is not None and not result.evals:  # e.g. resumed at the very end
        result.final = run_eval(model, eval_fn)
    result.seconds = time.perf_counter() - t0
    return result


def _last_good(cfg: TrainConfig, last_good) -> str:
    if last_good is not None:
        return f"; the last good checkpoint is {last_good[0]} (step {last_good[1]})"
    return "; no checkpoint of this run was saved" if cfg.checkpoint_path else ""


def _check_finite_parameters(model, step: int, cfg: TrainConfig, last_good) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            raise FloatingPointError(f"parameter {name} became non-finite (nan or inf) at step {step}; training "
                                     "stopped without saving it" + _last_good(cfg, last_good))


def run_eval(model, eval_fn) -> dict:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return dict(eval_fn(model))
    finally:
        model.train(was_training)


def _skipping(it, n):
    """An iterator as a ``step -> batch`` function; a resumed run skips the
    ``n`` batches already used."""
    for _ in range(n):
        next(it)
    return lambda step: next(it)


# ----- supervised loss ----------------------------------------------------
def sft_loss(model, batch, copies: int | None = None) -> tuple[torch.Tensor, dict | list[dict]]:
    """Next-token cross-entropy on the answer tokens only (``targets`` is
    -100 on the prompt and on padding).

    ``copies=M`` (what ReMix's ``rloo_loss`` asks for): the batch is stacked
    M times along the batch dimension and run through ONE forward pass; the
    result is then the (M,) vector of each copy's loss and a list of M
    (empty) metrics dicts. The copies differ only in what the model draws
    at random inside its forward (ReMix's routing)."""
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    if copies is None:
        logits = model(ids[:, :-1], mask[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), targets[:, :-1].flatten(), ignore_index=-100), {}
    copies = check_int("copies", copies, 1)
    ids, mask, targets = (t.repeat(copies, 1) for t in (ids, mask, targets))  # (M B, T), copy-major
    logits = model(ids[:, :-1], mask[:, :-1])  # (M B, T-1, V)
    ce = F.cross_entropy(logits.flatten(0, 1), targets[:, :-1].flatten(), ignore_index=-100, reduction="none")
    counted = (targets[:, :-1] != -100).view(copies, -1).sum(1)  # (M,) answer tokens per copy
    return ce.view(copies, -1).sum(1) / counted, [{} for _ in range(copies)]


# ----- greedy evaluation --------------------------------------------------
def predict(model, prompts: list[str], max_new_tokens: int, tok: Tokenizer | None = None,
            batch_size: int = 500) -> list[str]:
    """Greedy answers (text up to <eos>) for a list of prompts."""
    tok = tok or Tokenizer()
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tok.encode(p, bos=True) for p in prompts[i:i + batch_size]]
        new = model.generate(chunk, max_new_tokens, greedy=True)
        out += [tok.decode(row) for row in new.tolist()]
    return out


def evaluate(model, task: Task, problems: list[Problem] | None = None, batch_size: int = 500) -> float:
    """Greedy exact-match in [0, 1] on ``problems`` (default: the task's
    fixed evaluation set)."""
    problems = task.test_set() if problems is None else problems
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    # room for the longest answer the task can have, or that these problems have, and <eos>
    longest = max(len(p.answer) for p in problems) + 1
    preds = predict(model, [p.prompt for p in problems], max(task.max_answer_tokens(), longest),
                    batch_size=batch_size)
    return sum(task.check(pr, p.answer) for pr, p in zip(preds, problems)) / len(problems)

"""Command line: ``python -m lora_from_scratch COMMAND --help``.

    data      write the fixed evaluation sets to data/
    pretrain  train a base TinyGPT from scratch on one task
    eval      greedy exact-match of a checkpoint on a task or a data file
    finetune  add adapters (LoRA, DyLoRA, MatryoshkaLoRA, ...) to a base and train them
    demo      pretrain a base on addition, then teach it subtraction with LoRA
    rl        improve a partly trained base by RL (GRPO) with adapters

Every command takes --seed, --device, --threads N (CPU threads torch may
use; 1 by default, which is also what to keep on a machine shared with
other work) and --metrics-out FILE: its final metrics as JSON (pretrain,
eval, finetune and demo report at least test_exact_match and seconds).

A mistake in the command line ends in one line on stderr and exit code 2,
before any work: ``check_command`` checks every command's output paths
(a flag named ``--out``, ``--*-out``, ``--save-*``, or ``--*-dir`` for a
folder) against its inputs and each other, and that they can be written, and
that every number is finite; each flag's own range is checked by its
``type=``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from .adapters import save_adapters
from .checkpoint import jsonable, load_model, save_model, write_json
from .adapters import int_list
from .methods import METHODS, option_flags
from .recipes import FinetuneConfig, PretrainConfig, finetune, load_or_pretrain, \
    default_cache, pretrain, resolve_device
from .data import MAX_BATCH_SIZE, load_problems, save_problems
from .validate import SEED_LIMIT, check_writable_dir, check_writable_file, cli_float, cli_int, same_file
from .tasks import DEFAULT_DIGITS, TASKS, Task
from .train import evaluate, predict


# benchmarks/threads.py, on a shared 2-core machine: 2 threads (torch's own default there) ran
# 10 to 16 times slower than 1; 4 threads ran faster than 1 there, most likely by taking a larger
# share of the cores from the other users. One thread is the fair, never-catastrophic choice.
DEFAULT_THREADS = 1
MAX_THREADS = 256  # far more than any machine this runs on; 100000 would hang creating threads


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=cli_int(0, SEED_LIMIT - 1), default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=cli_int(1, MAX_THREADS), default=DEFAULT_THREADS, metavar="N",
                   help=f"CPU threads for torch (default {DEFAULT_THREADS}; keep 1 on a machine shared with "
                        "other work, where extra threads wait on each other; results repeat exactly only "
                        "for the same thread count)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run; auto picks cuda when available (default auto)")
    p.add_argument("--metrics-out", metavar="FILE", help="write the final metrics to FILE as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _task_args(p: argparse.ArgumentParser, default_task: str | None) -> None:
    p.add_argument("--task", default=default_task, choices=TASKS, help=f"task (default {default_task})")
    p.add_argument("--digits", help="operand digits: N, or A,B for mul (default: the task's default, "
                   + ", ".join(f"{t} {','.join(map(str, d))}" for t, d in DEFAULT_DIGITS.items()) + ")")


def _model_args(p: argparse.ArgumentParser) -> None:
    d = PretrainConfig()
    p.add_argument("--n-layer", type=cli_int(1), default=d.n_layer, help=f"transformer blocks (default {d.n_layer})")
    p.add_argument("--n-head", type=cli_int(1), default=d.n_head, help=f"attention heads (default {d.n_head})")
    p.add_argument("--n-embd", type=cli_int(1), default=d.n_embd, help=f"model width (default {d.n_embd})")
    p.add_argument("--pos-init-std", type=cli_float(0.0), default=d.pos_init_std,
                   help=f"init std of the position embeddings (default {d.pos_init_std}; GPT-2 uses 0.02)")


def _write_metrics(path, metrics: dict) -> None:
    if path:
        write_json(path, metrics, sort_keys=True)


def _samples(model, task: Task, n: int, problems=None) -> list[str]:
    probs = (problems or task.test_set())[:n]
    preds = predict(model, [p.prompt for p in probs], task.max_answer_tokens())
    return [f"  {p.prompt}{pr:<8} {'ok' if task.check(pr, p.answer) else 'wrong, expected ' + p.answer}"
            for p, pr in zip(probs, preds)]


def cmd_data(a) -> dict:
    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in TASKS:
        probs = Task(name).test_set()
        save_problems(probs, out / f"{name}.jsonl")
        files[name] = len(probs)
        print(f"wrote {len(probs)} problems to {out / (name + '.jsonl')}")
    return {"files": files, "seconds": time.perf_counter() - t0}


def _pretrain_config(a) -> PretrainConfig:
    return PretrainConfig(task=a.task, digits=a.digits, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                          n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, pos_init_std=a.pos_init_std,
                          eval_every=a.eval_every, stop_when_solved=getattr(a, "stop_when_solved", None),
                          seed=a.seed, device=resolve_device(a.device), progress=not a.quiet)


def cmd_pretrain(a) -> dict:
    cfg = _pretrain_config(a)
    out = Path(a.out) if a.out else default_cache() / cfg.cache_key()
    check_writable_file(out, "checkpoint")
    if a.metrics_out and same_file(out, a.metrics_out):
        raise ValueError(f"--metrics-out {a.metrics_out} is the checkpoint this command writes")
    model, metrics = pretrain(cfg)
    save_model(model, out, metrics=metrics, pretrain=jsonable(asdict(cfg)))
    stopped = " (stopped early: the training sample was solved)" if metrics["stopped_early"] else ""
    print(f"test exact-match {metrics['test_exact_match']:.4f} after {metrics['steps']} steps{stopped}, "
          f"{metrics['seconds']:.1f} s; saved {out}")
    return {**metrics, "checkpoint": str(out)}


def cmd_eval(a) -> dict:
    t0 = time.perf_counter()
    model, meta = load_model(a.ckpt, resolve_device(a.device))
    spec = meta.get("metrics", {}).get("task", {})
    name = a.task or spec.get("name")
    if name is None:
        raise ValueError(f"{a.ckpt} does not record its task; pass --task")
    digits = a.digits or (spec.get("digits") if name == spec.get("name") else None)
    task = Task(name, digits)
    problems = load_problems(a.data, block_size=model.config.block_size) if a.data else None
    acc = evaluate(model, task, problems)
    print(f"{task}: test exact-match {acc:.4f}")
    print("\n".join(_samples(model, task, a.samples, problems)))
    return {"task": task.spec(), "test_exact_match": acc, "seconds": time.perf_counter() - t0}


def _adapter_args(p: argparse.ArgumentParser) -> None:
    """--method, the settings every method shares, and one group of flags
    per method, built from the method table (methods.py)."""
    p.add_argument("--method", default="lora", choices=list(METHODS),
                   help="adapter: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
                   + " (default lora)")
    p.add_argument("--rank", type=cli_int(1), default=8, help="(maximum) rank R (default 8)")
    p.add_argument("--alpha", type=cli_float(positive=True),
                   help="scale numerator alpha (default: the method's: 2 * rank for lora and dylora, "
                   "1 for matryoshka, as its reference code)")
    p.add_argument("--scale", choices=["lora", "rslora", "none"],
                   help="scale rule c(r): alpha/r, alpha/sqrt(r) or 1 (default: the method's: lora for lora and "
                   "dylora, rslora for matryoshka, as its reference code)")
    p.add_argument("--targets", default="all-linear",
                   help="comma-separated layer names, e.g. q_proj,v_proj (default all-linear)")
    seen = {}  # flag -> methods using it: two methods may share a flag (--train-ranks)
    for m in METHODS.values():
        for name, flag, default, text, parse in option_flags(m):
            seen.setdefault(flag, []).append((m.name, name, default, text, parse))
    groups = {}
    for flag, users in seen.items():
        first = users[0]
        title = " and ".join(u[0] for u in users)
        g = groups.setdefault(title, p.add_argument_group(f"options of --method {title}"))
        text = "; ".join(f"{u[0]}: {u[3]}" for u in users) if len(users) > 1 else first[3]
        text += f" (default {first[2]})" if first[2] not in (None, False) else ""
        dest = "opt_" + flag.lstrip("-").replace("-", "_")
        if isinstance(first[2], bool):
            g.add_argument(flag, dest=dest, action="store_const", const=not first[2], default=None, help=text)
        else:  # parsed in _method_options, where the chosen method is known
            g.add_argument(flag, dest=dest, type=str, default=None, metavar=flag.lstrip("-").upper().replace("-", "_"),
                           help=text)
    p.set_defaults(option_users=seen)


def _method_options(a) -> dict:
    """The chosen method's options that were given on the command line; a
    flag that belongs to another method is an error rather than ignored."""
    out = {}
    for flag, users in a.option_users.items():
        value = getattr(a, "opt_" + flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        mine = [u for u in users if u[0] == a.method]
        if not mine:
            raise ValueError(f"{flag} is an option of --method {' / '.join(u[0] for u in users)}, "
                             f"not of --method {a.method}")
        _, name, default, _, parse = mine[0]
        if isinstance(value, str):
            parse = parse or type(default)
            try:
                value = parse(value)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
        out[name] = value
    return out


def _finetune_config(a, base: PretrainConfig) -> FinetuneConfig:
    try:
        eval_ranks = int_list(a.eval_ranks) if a.eval_ranks is not None else None
    except ValueError as e:
        raise ValueError(f"--eval-ranks: {e}") from None
    return FinetuneConfig(method=a.method, rank=a.rank, alpha=a.alpha, scale=a.scale, options=_method_options(a),
                          targets=tuple(a.targets.split(",")) if a.targets != "all-linear" else "all-linear",
                          task=a.task, digits=a.digits, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                          eval_ranks=eval_ranks,
                          base=base, seed=a.seed, device=base.device, progress=not a.quiet)


def _print_results(m: dict) -> None:
    print(f"{m['method']} R={m['rank']} on {m['task']['name']}: base exact-match {m['base_exact_match']:.4f}")
    if "exact_match_by_rank" in m:
        print("| rank | exact-match |\n|---:|---:|")
        for r, acc in m["exact_match_by_rank"].items():
            print(f"| {r} | {acc:.4f} |")
        print(f"AURAC (log2 ranks, %): {m['aurac']:.2f}")
    else:
        print(f"test exact-match {m['test_exact_match']:.4f}")
    print(f"trainable parameters {m['trainable_parameters']}; {m['seconds']:.1f} s")


def cmd_finetune(a) -> dict:
    device = resolve_device(a.device)
    try:
        base_cfg = PretrainConfig(task=a.base_task or "add", digits=a.base_digits, seed=a.base_seed or 0,
                                  device=device, progress=not a.quiet)
    except ValueError as e:
        raise ValueError(f"--base-digits: {e}") from None
    cfg = _finetune_config(a, base_cfg)
    base_model = load_model(a.base, device)[0] if a.base else None
    if a.save_adapters and not a.base and same_file(a.save_adapters,
                                                    Path(a.cache_dir or default_cache()) / base_cfg.cache_key()):
        raise ValueError(f"--save-adapters {a.save_adapters} is the cached base model this command reads")
    model, metrics = finetune(cfg, base_model, cache_dir=a.cache_dir)
    _print_results(metrics)
    if a.save_adapters:
        save_adapters(model, a.save_adapters, finetune=jsonable(asdict(cfg)), metrics=metrics,
                      base_checkpoint=a.base)  # when set, the base used (cfg.base then describes no model)
        print(f"adapter weights saved to {a.save_adapters}")
    return metrics


def cmd_demo(a) -> dict:
    t0 = time.perf_counter()
    device = resolve_device(a.device)
    base_cfg = PretrainConfig(task="add", digits=a.digits, seed=a.seed, device=device, progress=not a.quiet)
    print(f"step 1: a base TinyGPT that adds {base_cfg.digits[0]}-digit numbers "
          f"(trained once, then cached in {a.cache_dir or default_cache()})")
    base, bm = load_or_pretrain(base_cfg, a.cache_dir)
    add = Task("add", base_cfg.digits)
    acc = evaluate(base, add)
    print(f"  addition test exact-match: {acc:.4f} ({'cached' if bm['cached'] else 'trained now'})")
    print("  answers are written least-significant digit first (see data/README.md):")
    print("\n".join(_samples(base, add, 4)))
    print("step 2: teach it subtraction with a rank-8 LoRA on every linear layer (base frozen)")
    ft = FinetuneConfig(method="lora", rank=8, task="sub", digits=base_cfg.digits, steps=a.finetune_steps,
                        eval_ranks=(8,), base=base_cfg, seed=a.seed, device=device, progress=not a.quiet)
    model, fm = finetune(ft, base, a.cache_dir)
    sub = Task("sub", base_cfg.digits)
    print(f"  subtraction test exact-match: {fm['base_exact_match']:.4f} before -> {fm['test_exact_match']:.4f} "
          f"after, training {fm['trainable_parameters']} of "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    print("\n".join(_samples(model, sub, 4)))
    return {"test_exact_match": acc, "add_exact_match": acc, "sub_base_exact_match": fm["base_exact_match"],
            "sub_lora_exact_match": fm["test_exact_match"], "seconds": time.perf_counter() - t0}


def _algo_option_flags() -> list:
    """(flag, field, algos, default, help, parse) for every setting an --algo
    adds to GRPO's (its config class's own fields, made with ``option``)."""
    from .grpo import GRPOConfig
    from .rl import ALGOS
    shared = {f.name for f in fields(GRPOConfig)}
    out = {}
    for algo, cls in ALGOS.items():
        for f in fields(cls.config_class):
            if f.name not in shared:
                flag = "--" + f.name.replace("_", "-")
                entry = out.setdefault(flag, [flag, f.name, [], f.default, f.metadata.get("help", ""),
                                              f.metadata.get("parse")])
                entry[2].append(algo)
    return list(out.values())


def _algo_options(a) -> dict:
    """The --algo's own settings given on the command line; one of another
    algo is an error rather than ignored."""
    out = {}
    for flag, name, algos, *_ in _algo_option_flags():
        value = getattr(a, "algo_" + name)
        if value is not None:
            if a.algo not in algos:
                raise ValueError(f"{flag} is an option of --algo {' / '.join(algos)}, not of --algo {a.algo}")
            out[name] = value
    return out


def cmd_rl(a) -> dict:
    from .rl import RLConfig, rl_finetune
    device = resolve_device(a.device)
    base_model = load_model(a.base, device)[0] if a.base else None
    cfg = RLConfig(algo=a.algo, method=a.method, rank=a.rank, alpha=a.alpha, scale=a.scale,
                   options=_method_options(a), targets=tuple(a.targets.split(",")) if a.targets != "all-linear"
                   else "all-linear", task=a.task, digits=a.digits, group_size=a.group_size, prompts=a.prompts,
                   beta=a.beta, eps_low=a.eps_low, eps_high=a.eps_high, loss_type=a.loss_type,
                   adv_scale=a.adv_scale, mu=a.mu, temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                   steps=a.steps, lr=a.lr, eval_every=a.eval_every, base_steps=a.base_steps, seed=a.seed,
                   base_seed=a.base_seed, device=device, progress=not a.quiet, algo_options=_algo_options(a),
                   rank_allocation=a.rank_allocation, rank_budget=a.rank_budget, rank_warmup=a.rank_warmup)
    model, m = rl_finetune(cfg, base_model, cache_dir=a.cache_dir)
    print(f"{m['algo']} with {m['method']} R={m['rank']} on {m['task']['name']}: test exact-match "
          f"{m['base_exact_match']:.4f} -> {m['test_exact_match']:.4f} in {m['steps']} steps, {m['seconds']:.1f} s")
    print(f"last step: reward {m['reward']:.3f}, KL {m['kl'] if m['kl'] is not None else float('nan'):.4f}, "
          f"clip fraction {m['clip_frac']:.3f}, completion length {m['length']:.2f}")
    if a.save_adapters:
        save_adapters(model, a.save_adapters, rl=jsonable(asdict(cfg)), metrics=m, base_checkpoint=a.base)
        print(f"adapter weights saved to {a.save_adapters}")
    return m


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_from_scratch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="write the fixed evaluation sets (500 problems per task)")
    p.add_argument("--out", default="data", help="folder to write TASK.jsonl into (default data)")
    _common(p)
    p.set_defaults(output_dirs=("out",))
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("pretrain", help="train a base TinyGPT from scratch on one task")
    _task_args(p, "add")
    p.add_argument("--steps", type=cli_int(1), help="optimizer steps, at most (default: tuned per task size)")
    p.add_argument("--batch-size", type=cli_int(1, MAX_BATCH_SIZE),
                   help="problems per step (default: tuned per task size, else 128)")
    p.add_argument("--lr", type=cli_float(positive=True), default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--stop-when-solved", action=argparse.BooleanOptionalAction, default=None,
                   help="stop once 500 training-split problems are all answered, checked every 100 steps "
                        "(or every --eval-every steps when given; default: on for 3-digit addition, off otherwise)")
    _model_args(p)
    p.add_argument("--eval-every", type=cli_int(0), default=0,
                   help="also evaluate every N steps and report when accuracy arrives (default 0: only at the end)")
    p.add_argument("--out", help="checkpoint path (default: <cache>/<settings>.pt, the cache being "
                   "data/checkpoints/ or $LORA_FROM_SCRATCH_CACHE)")
    _common(p)
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("eval", help="greedy exact-match of a checkpoint")
    p.add_argument("--ckpt", required=True, help="model checkpoint written by pretrain")
    _task_args(p, None)
    p.add_argument("--data", help="JSON-lines file of problems (default: the task's fixed test set)")
    p.add_argument("--samples", type=cli_int(0), default=5, help="sample answers to show (default 5)")
    _common(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("finetune", help="train adapters (LoRA, DyLoRA, MatryoshkaLoRA, ...) on a new task")
    _adapter_args(p)
    _task_args(p, "sub")
    p.add_argument("--steps", type=cli_int(1), default=600, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=cli_int(1, MAX_BATCH_SIZE), default=128, help="problems per step (default 128)")
    p.add_argument("--lr", type=cli_float(positive=True), default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--eval-ranks", help="sub-ranks to evaluate (lora, dylora, matryoshka), e.g. 1,2,4,8 "
                   "(default powers of 2 up to R)")
    p.add_argument("--base", help="base checkpoint (default: pretrain one on --base-task, cached)")
    p.add_argument("--base-task", choices=TASKS, help="task of the cached base (default add)")
    p.add_argument("--base-digits", help="digits of the cached base (default: the task's default)")
    p.add_argument("--base-seed", type=cli_int(0, SEED_LIMIT - 1), help="seed of the cached base (default 0)")
    p.add_argument("--save-adapters", metavar="FILE", help="write the trained adapter weights to FILE")
    p.add_argument("--cache-dir", help="where base checkpoints are cached (default data/checkpoints/, "
                   "or $LORA_FROM_SCRATCH_CACHE)")
    _common(p)
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("demo", help="pretrain on addition, then fine-tune subtraction with LoRA")
    p.add_argument("--digits", default="2", help="operand digits (default 2)")
    p.add_argument("--finetune-steps", type=cli_int(1), default=400, help="LoRA steps (default 400)")
    p.add_argument("--cache-dir", help="where base checkpoints are cached (default data/checkpoints/, "
                   "or $LORA_FROM_SCRATCH_CACHE)")
    _common(p)
    p.set_defaults(fn=cmd_demo)

    from .rl import ALGOS, RLConfig
    d = RLConfig()
    p = sub.add_parser("rl", help="RL (GRPO) with adapters on a base that is sometimes right")
    p.add_argument("--algo", default=d.algo, choices=list(ALGOS), help=f"RL objective (default {d.algo})")
    _adapter_args(p)
    _task_args(p, d.task)
    g = p.add_argument_group("RL settings")
    g.add_argument("--group-size", type=int, default=d.group_size, help=f"completions per prompt G (default {d.group_size})")
    g.add_argument("--prompts", type=int, default=d.prompts, help=f"prompts per batch of rollouts (default {d.prompts})")
    g.add_argument("--beta", type=float, default=d.beta, help=f"weight of the k3 KL to the adapter-free reference (default {d.beta})")
    g.add_argument("--eps-low", type=float, default=d.eps_low, help=f"clip the ratio below at 1 - eps_low (default {d.eps_low})")
    g.add_argument("--eps-high", type=float, default=d.eps_high, help=f"clip the ratio above at 1 + eps_high (default {d.eps_high})")
    g.add_argument("--loss-type", default=d.loss_type, choices=["grpo", "dapo", "dr_grpo"],
                   help=f"how per-token losses are averaged (default {d.loss_type})")
    g.add_argument("--adv-scale", default=d.adv_scale, choices=["group", "none"],
                   help=f"divide advantages by the group's std, or not (default {d.adv_scale})")
    g.add_argument("--mu", type=int, default=d.mu, help=f"optimizer steps per batch of rollouts (default {d.mu})")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"sampling temperature (default {d.temperature})")
    g.add_argument("--max-new-tokens", type=int, help="longest completion (default: the task's longest answer + 1)")
    g.add_argument("--steps", type=cli_int(1), default=d.steps, help=f"optimizer steps (default {d.steps})")
    g.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    g.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"greedy test exact-match every N steps (default {d.eval_every}; 0: only at the end)")
    g = p.add_argument_group("rank allocation (probe a uniform warm-up, reallocate the ranks, train on)")
    g.add_argument("--rank-allocation", choices=["uniform", "gradient", "random"],
                   help="how to share the rank budget between layers after the probe (default: no probe)")
    g.add_argument("--rank-budget", type=int, help="total rank over the adapted layers (default: layers x --rank)")
    g.add_argument("--rank-warmup", type=int, default=d.rank_warmup,
                   help=f"probe steps at uniform rank before reallocating (default {d.rank_warmup})")
    g = p.add_argument_group("options of one --algo")
    for flag, name, algos, default, text, parse in _algo_option_flags():
        g.add_argument(flag, dest="algo_" + name, type=parse or type(default), default=None,
                       metavar=name.upper(),
                       help=f"[{'/'.join(algos)}] {text}")
    p.add_argument("--base", help="starting checkpoint (default: the task's partly supervised base, cached)")
    p.add_argument("--base-steps", type=int, help="supervised steps of the cached starting base (default: per task)")
    p.add_argument("--base-seed", type=int, default=0, help="seed of the cached starting base (default 0)")
    p.add_argument("--save-adapters", metavar="FILE", help="write the trained adapter weights to FILE")
    p.add_argument("--cache-dir", help="where base checkpoints are cached (default data/checkpoints/, "
                   "or $LORA_FROM_SCRATCH_CACHE)")
    _common(p)
    p.set_defaults(fn=cmd_rl)
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(x for x in parser._actions if isinstance(x, argparse._SubParsersAction)).choices[command]


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """dest -> its longest flag, for the options of ``command``."""
    return {x.dest: max(x.option_strings, key=len) for x in _command_parser(parser, command)._actions
            if x.option_strings}


def check_command(parser: argparse.ArgumentParser, a) -> None:
    """Checks every command gets before it runs (so a new command gets them
    too): no value is empty, numbers are finite, seeds in range, no flag is
    given that does not apply, and output paths (flags named --out, --*-out,
    --save-*: files; --*-dir and a command's ``output_dirs``: folders) are
    writable, and none is an input of the command (any other flag naming an
    existing file) or another output."""
    flags = _flags(parser, a.command)
    values = {d: getattr(a, d) for d in flags if getattr(a, d, None) is not None}
    for d, v in values.items():
        if isinstance(v, str) and not v.strip():  # e.g. an unset shell variable: never meant as "the default"
            raise ValueError(f"{flags[d]} is empty")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flags[d]} must be a finite number, got {v}")
        if (d == "seed" or d.endswith("_seed")) and isinstance(v, int) and not 0 <= v < SEED_LIMIT:
            raise ValueError(f"{flags[d]} must be in 0..2**63-1, got {v}")
    # flags that do not apply: those choosing the cached base (--base-*, --cache-dir) next to --base,
    # and --alpha with --scale none (c(r) = 1 reads no alpha)
    sub = _command_parser(parser, a.command)
    given = [flags[d] for d in values
             if (d.startswith("base_") or d == "cache_dir") and values[d] != sub.get_default(d)]
    if values.get("base") and given:
        raise ValueError(f"with --base {a.base}, {' and '.join(given)} {'does' if len(given) == 1 else 'do'} "
                         "not apply (they choose the cached base); drop them")
    if values.get("scale") == "none" and values.get("alpha") is not None:
        raise ValueError(f"--alpha {a.alpha} does not apply with --scale none (c(r) = 1); drop one of them")
    dirs = set(getattr(a, "output_dirs", ())) | {d for d in values if d.endswith("_dir")}
    files = {d for d in values if d == "out" or d.endswith("_out") or d.startswith("save_")} - dirs
    outputs = {d: values[d] for d in sorted(files | dirs) if isinstance(values[d], str)}
    inputs = {d: v for d, v in values.items() if d not in outputs and isinstance(v, str) and os.path.isfile(v)}
    for d, path in outputs.items():
        if d in dirs:  # a cache folder may be read-only when it already holds what is needed
            check_writable_dir(path, flags[d], must_write=not d.startswith("cache"))
        else:
            check_writable_file(path, flags[d])
        for other, q in list(inputs.items()) + [(o, q) for o, q in outputs.items() if o < d]:
            if same_file(path, q):
                kind = "input" if other in inputs else "output"
                raise ValueError(f"{flags[d]} {path} is the same file as {flags[other]} {q}, "
                                 f"an {kind} of this command; writing it would destroy it")


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        check_command(parser, a)
        import torch
        torch.set_num_threads(a.threads)  # before any work: the thread count changes speed and last digits
        torch.manual_seed(a.seed)
        metrics = a.fn(a)
        _write_metrics(a.metrics_out, {"command": a.command, **metrics})
    except (ValueError, TypeError, OSError, FloatingPointError) as e:
        hint = " (a smaller --lr may help)" if isinstance(e, FloatingPointError) and getattr(a, "lr", None) else ""
        print(f"error: {_name_the_flag(str(e), parser, a)}{hint}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # a model or batch too large for this machine
        if not isinstance(e, MemoryError) and "alloc" not in str(e) and "out of memory" not in str(e):
            raise  # a bug, not a user mistake: keep the traceback
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}); try a smaller model or --batch-size",
              file=sys.stderr)
        return 2
    return 0


def _name_the_flag(message: str, parser, a) -> str:
    """An API error names the argument ("batch_size must be ..."); on the
    command line, name the flag instead ("--batch-size must be ...")."""
    first = message.split(" ", 1)[0]
    flags = _flags(parser, a.command)
    flags.update({d[len("opt_"):]: f for d, f in flags.items() if d.startswith("opt_")})  # method options
    key = first.split("[", 1)[0]
    return flags[key] + message[len(key):] if key in flags else message


if __name__ == "__main__":
    sys.exit(main())

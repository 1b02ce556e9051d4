"""GRPO lift: exact-match before and after GRPO with LoRA, rollout throughput,
and where the time goes.

Each row is a task (2-digit multiplication, word problems) and a partly
supervised base of ``rl.rl_base_config`` (the task's own pretraining recipe,
stopped after a given number of steps, so that it is sometimes right): the
default base of the ``rl`` command, and for multiplication also a base
supervised longer (3000 steps), which is right more often. GRPO with a LoRA
adapter runs a fixed budget of steps per task for each seed, the budget
chosen to fill about 5 CPU minutes. Reported per row: greedy exact-match on
the task's fixed test set before and after (mean, min and max over seeds),
seconds, and the time split of training between generation (stage 1-2:
sampling, rewards), the reference pass (adapters off) and the rest (fresh
forward, backward and optimizer step; the test-set evaluations are counted
apart). The goal: a lift of at least +30 points of exact-match in at most 5
minutes on 2 CPU cores.

Two diagnostics per row, on the base: pass@8 on the test set (the share
of problems where at least one of 8 samples is right: GRPO can only make
sampled right answers more likely, so this bounds what sharpening alone
can reach), and a fixed-batch check: GRPO on the same 16 training
problems at every step (fresh rollouts each time), whose reward must climb
if the loss, the rollouts and the update are right.

Rollout throughput: completions per second of ``sample_rollouts`` (one
batched KV-cache ``generate`` that also keeps log-probs, then decoding and
rewards) against a plain batched ``model.generate`` on the same prompts,
timed alternately (A, B, A, B, ...) in the same process, medians.

Writes benchmarks/results/grpo_lift.json and .txt, and a reward-over-steps
figure (tutorials/figures/grpo_reward.png; skipped without matplotlib).

Usage: ``python benchmarks/grpo_lift.py [--rows mul:800,mul:3000,wordprob:300
--task-steps mul=3000,wordprob=600 --seeds 0,1,2 --jobs 2]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lora_from_scratch.checkpoint import atomic_write, pyplot, save_figure, write_json
from lora_from_scratch.grpo import sample_rollouts
from lora_from_scratch.recipes import load_or_pretrain
from lora_from_scratch.rl import RLConfig, rl_base_config, rl_finetune
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rows", default="mul:800,mul:3000,wordprob:300",
                   help="comma-separated TASK:BASE_STEPS rows, TASK optionally with operand sizes as in "
                        "mul/2x1 (default mul:800,mul:3000,wordprob:300)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--task-steps", default="mul=3000,wordprob=600",
                   help="GRPO steps per run, by task (default mul=3000,wordprob=600: about 5 CPU minutes each)")
    p.add_argument("--fixed-steps", type=int, default=200,
                   help="steps of the fixed-batch check, seed 0 (default 200; 0 skips it)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lr", type=float, default=RLConfig.lr, help=f"learning rate (default {RLConfig.lr})")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (default 0)")
    p.add_argument("--eval-every", type=int, default=250, help="test exact-match every N steps (default 250)")
    p.add_argument("--repeats", type=int, default=7, help="throughput repeats per side (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_lift"),
                   help="output path without extension (default benchmarks/results/grpo_lift)")
    p.add_argument("--plot", default=str(ROOT / "tutorials" / "figures" / "grpo_reward.png"),
                   help="reward figure ('' to skip)")
    a = p.parse_args(argv)
    try:
        a.rows = [(t, int(n)) for t, n in (r.split(":") for r in a.rows.split(","))]
        a.task_steps = {t: int(n) for t, n in (x.split("=") for x in a.task_steps.split(","))}
    except ValueError:
        p.error(f"--rows takes TASK:STEPS,... and --task-steps TASK=STEPS,..., got {a.rows!r} and {a.task_steps!r}")
    missing = sorted({split_task(t)[0] for t, _ in a.rows} - set(a.task_steps))
    if missing:
        p.error(f"--task-steps has no budget for {missing}")
    return a


def split_task(name: str) -> tuple[str, str | None]:
    """``"mul"`` -> ("mul", None) (the task's default operand sizes); ``"mul/2x1"`` -> ("mul", "2,1")."""
    task, _, digits = name.partition("/")
    return task, digits.replace("x", ",") or None


def row_name(task: str, base_steps: int) -> str:
    return f"{task} (base {base_steps} steps)"


def pass_at(model, task: Task, k: int = 8) -> dict:
    """The base's sampled answers on the test set, temperature 1: the mean
    reward of one sample and pass@k (at least one of k samples right)."""
    ro = sample_rollouts(model, task.test_set(), task, Tokenizer(), k, generator=torch.Generator().manual_seed(0))
    right = ro.rewards.view(-1, k)
    return {"sampled": float(right.mean()), f"pass@{k}": float((right.max(1).values > 0).float().mean()),
            "mixed_groups": float(((right.sum(1) > 0) & (right.sum(1) < k)).float().mean())}


def fixed_batch(job: tuple) -> dict:
    """GRPO on the same 16 training problems at every step: the mean reward
    of the first and last 20 steps."""
    name, base_steps, a = job
    torch.set_num_threads(a.threads)
    tname, digits = split_task(name)
    base, _ = load_or_pretrain(rl_base_config(tname, digits, progress=False, steps=base_steps))
    task = Task(tname, digits)
    problems = task.sample_train(16, seed=7)
    cfg = RLConfig(task=tname, digits=digits, rank=a.rank, lr=a.lr, prompts=16, group_size=a.group_size,
                   beta=a.beta, steps=a.fixed_steps, eval_every=0, seed=0, progress=False)
    _, m = rl_finetune(cfg, base, batches=lambda step: {"problems": problems, "rollout_id": step})
    r = m["per_step"]["reward"]
    return {"first": statistics.fmean(r[:20]), "last": statistics.fmean(r[-20:]), "steps": len(r)}


def throughput(model, task: Task, prompts: int, group_size: int, repeats: int) -> dict:
    """Completions per second: sample_rollouts vs plain generate, interleaved."""
    tok = Tokenizer()
    problems = task.sample_train(prompts, seed=99)
    encoded = [tok.encode(p.prompt, bos=True) for p in problems for _ in range(group_size)]
    n_new = task.max_answer_tokens()
    plain, ours = [], []
    for i in range(repeats + 1):  # the first pair warms up and is dropped
        g = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        model.generate(encoded, n_new, temperature=1.0, generator=g)
        t1 = time.perf_counter()
        sample_rollouts(model, problems, task, tok, group_size, n_new, 1.0, generator=torch.Generator().manual_seed(i))
        t2 = time.perf_counter()
        if i:
            plain.append(t1 - t0)
            ours.append(t2 - t1)
    n = len(encoded)
    return {"completions": n, "plain_per_s": n / statistics.median(plain), "rollouts_per_s": n / statistics.median(ours),
            "ratio": statistics.median(plain) / statistics.median(ours)}


def rounded(values, digits: int = 4):
    """Per-step values to 4 decimals (None kept), so that the JSON stays small."""
    return [None if v is None else round(v, digits) for v in values]


def summary(values):
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run_one(job: tuple) -> dict:
    """One GRPO run (a separate process when --jobs > 1)."""
    name, base_steps, seed, a = job
    torch.set_num_threads(a.threads)
    tname, digits = split_task(name)
    base, _ = load_or_pretrain(rl_base_config(tname, digits, progress=False, steps=base_steps))
    cfg = RLConfig(task=tname, digits=digits, rank=a.rank, lr=a.lr, prompts=a.prompts, group_size=a.group_size,
                   beta=a.beta, steps=a.task_steps[tname], eval_every=a.eval_every, seed=seed, progress=False)
    _, m = rl_finetune(cfg, base)
    train = m["train_seconds"] - m["eval_seconds"]
    run = {"task": name, "base_steps": base_steps, "seed": seed, "before": m["base_exact_match"],
           "after": m["test_exact_match"],
           "evals": m["evals"], "reward": rounded(m["per_step"]["reward"]), "kl": rounded(m["per_step"]["kl"]),
           "seconds": train, "cpu_seconds": m["train_cpu_seconds"], "generate_seconds": m["generate_seconds"],
           "reference_seconds": m["reference_seconds"],
           "update_seconds": train - m["generate_seconds"] - m["reference_seconds"], "eval_seconds": m["eval_seconds"]}
    print(f"{row_name(name, base_steps)} seed {seed}: {100 * run['before']:.1f}% -> {100 * run['after']:.1f}% "
          f"in {train:.0f} s "
          f"({run['cpu_seconds']:.0f} CPU s); evals {m['evals']}", flush=True)
    return run


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {"settings": {**vars(a), "rows": [list(r) for r in a.rows]}, "torch": torch.__version__, "tasks": {}}
    bases = {}
    for name, steps in a.rows:  # built (or loaded) once, before the runs that share them
        base_cfg = rl_base_config(*split_task(name), progress=False, steps=steps)
        bases[(name, steps)] = (base_cfg, *load_or_pretrain(base_cfg))
    jobs = [(name, steps, seed, a) for name, steps in a.rows for seed in seeds]
    checks = [(name, steps, a) for name, steps in a.rows] if a.fixed_steps else []
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            fixed = pool.map(fixed_batch, checks)
            runs = list(pool.map(run_one, jobs))
            fixed = list(fixed)
    else:
        fixed = [fixed_batch(c) for c in checks]
        runs = [run_one(j) for j in jobs]
    fixed = dict(zip([(n, s) for n, s, _ in checks], fixed))
    for name, steps in a.rows:
        base_cfg, base, info = bases[(name, steps)]
        mine = [r for r in runs if (r["task"], r["base_steps"]) == (name, steps)]
        task = Task(*split_task(name))
        tp = throughput(base, task, a.prompts, a.group_size, a.repeats)
        print(f"{row_name(name, steps)} throughput: rollouts {tp['rollouts_per_s']:.0f}/s, "
              f"plain generate {tp['plain_per_s']:.0f}/s, ratio {tp['ratio']:.2f}", flush=True)
        lift = [100 * (r["after"] - r["before"]) for r in mine]
        results["tasks"][row_name(name, steps)] = {
            "task": name, "steps": a.task_steps[split_task(name)[0]],
            "base": {"steps": base_cfg.steps, "exact_match": info.get("test_exact_match"),
                     "seconds": info.get("seconds"),  # seconds when it was built (also when loaded from the cache)
                     **pass_at(base, task)},
            "fixed_batch": fixed.get((name, steps)),
            "runs": mine, "before": summary([100 * r["before"] for r in mine]),
            "after": summary([100 * r["after"] for r in mine]), "lift": summary(lift),
            "seconds": summary([r["seconds"] for r in mine]), "cpu_seconds": summary([r["cpu_seconds"] for r in mine]),
            "throughput": tp}
    write_json(a.out + ".json", results)
    write_table(results, a.out + ".txt")
    if a.plot:
        plot(results, a.plot)
    return 0


def write_table(results: dict, path: str) -> None:
    s = results["settings"]
    steps = ", ".join(f"{t} {n}" for t, n in s["task_steps"].items())
    lines = [f"GRPO + LoRA r={s['rank']}, {s['prompts']} prompts x G={s['group_size']}, beta={s['beta']}, "
             f"lr {s['lr']}, steps: {steps}; seeds {s['seeds']}, {s['threads']} thread(s); torch {results['torch']}",
             "",
             "| task (base) | base: greedy / one sample / pass@8 | fixed batch: reward first -> last 20 steps "
             "| steps | before (mean) | after (mean, min-max) | lift (mean, min-max) | wall s (mean) "
             "| CPU s (mean) | generate | reference | update | rollouts/s | plain generate/s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["tasks"].items():
        runs = r["runs"]
        tot = sum(x["seconds"] for x in runs)
        share = {k: 100 * sum(x[k + "_seconds"] for x in runs) / tot for k in ("generate", "reference", "update")}
        tp, b, fx = r["throughput"], r["base"], r.get("fixed_batch")
        fixed = f"{fx['first']:.2f} -> {fx['last']:.2f} ({fx['steps']} steps)" if fx else ""
        lines.append(f"| {name} | {100 * b['exact_match']:.1f} / {100 * b['sampled']:.1f} / {100 * b['pass@8']:.1f} "
                     f"| {fixed} | {r['steps']} | {r['before']['mean']:.1f} | {r['after']['mean']:.1f} "
                     f"({r['after']['min']:.1f}-{r['after']['max']:.1f}) | {r['lift']['mean']:+.1f} "
                     f"({r['lift']['min']:+.1f} to {r['lift']['max']:+.1f}) | {r['seconds']['mean']:.0f} "
                     f"| {r['cpu_seconds']['mean']:.0f} "
                     f"| {share['generate']:.0f}% | {share['reference']:.0f}% | {share['update']:.0f}% "
                     f"| {tp['rollouts_per_s']:.0f} | {tp['plain_per_s']:.0f} | {tp['ratio']:.2f} |")
    lines += ["", "Exact-match in %, greedy, on the task's fixed test set (500 problems; 108 for mul/2x1, whose "
              "test split is that small). Base: greedy exact-match, the mean "
              "reward of one sample and pass@8 (at least one of 8 samples right) on the test set, temperature 1. "
              "Fixed batch: GRPO on the same 16 training problems at every step (seed 0), mean reward of the "
              "first and the last 20 steps. Seconds: training only (test-set evaluations excluded); CPU s: CPU "
              "time of the run's process (one thread), closer than the wall clock to the cost on an idle machine. "
              "generate / reference / update: share of the wall seconds. Throughput: completions per second, "
              "median of interleaved repeats, same prompts."]
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    names = list(results["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run in results["tasks"][name]["runs"]:
            r = run["reward"]
            k = max(10, len(r) // 50)  # moving average over k steps
            smooth = [statistics.fmean(r[max(0, i - k + 1):i + 1]) for i in range(len(r))]
            line, = ax.plot(range(1, len(r) + 1), smooth, lw=1, label=f"mean reward, seed {run['seed']}")
            steps, em = zip(*run["evals"]) if run["evals"] else ((), ())
            ax.plot([0, *steps], [run["before"], *em], "o--", color=line.get_color(), ms=3, lw=0.8)
        ax.set_title(f"{name}\nreward (lines), test exact-match (dots)", fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    raise SystemExit(main())

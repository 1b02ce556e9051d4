"""GRPO lift: exact-match before and after GRPO with LoRA, rollout throughput,
and where the time goes.

For each task (2-digit multiplication, word problems), starting from the
partly supervised base of ``rl.rl_base_config`` (briefly trained on the task,
so it is sometimes right), GRPO with a LoRA adapter runs a fixed budget of
steps for each seed. Reported per task: greedy exact-match on the fixed
500-problem test set before and after (mean, min and max over seeds),
seconds, and the time split of training between generation (stage 1-2:
sampling, rewards), the reference pass (adapters off) and the rest (fresh
forward, backward and optimizer step; the test-set evaluations are counted
apart). The goal: a lift of at least +30 points of exact-match in at most 5
minutes on 2 CPU cores.

Rollout throughput: completions per second of ``sample_rollouts`` (one
batched KV-cache ``generate`` that also keeps log-probs, then decoding and
rewards) against a plain batched ``model.generate`` on the same prompts,
timed alternately (A, B, A, B, ...) in the same process, medians.

Writes benchmarks/results/grpo_lift.json and .txt, and a reward-over-steps
figure (tutorials/figures/grpo_reward.png; skipped without matplotlib).

Usage: ``python benchmarks/grpo_lift.py [--tasks mul,wordprob --seeds 0,1,2
--steps 300 --threads 1]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from lora_from_scratch.checkpoint import atomic_write, write_json
from lora_from_scratch.grpo import sample_rollouts
from lora_from_scratch.recipes import load_or_pretrain
from lora_from_scratch.rl import RLConfig, rl_base_config, rl_finetune
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tasks", default="mul,wordprob", help="comma-separated tasks (default mul,wordprob)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=300, help="GRPO steps per run (default 300)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lr", type=float, default=RLConfig.lr, help=f"learning rate (default {RLConfig.lr})")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (default 16)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight (default 0)")
    p.add_argument("--eval-every", type=int, default=50, help="test exact-match every N steps (default 50)")
    p.add_argument("--repeats", type=int, default=7, help="throughput repeats per side (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes (default 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grpo_lift"),
                   help="output path without extension (default benchmarks/results/grpo_lift)")
    p.add_argument("--plot", default=str(ROOT / "tutorials" / "figures" / "grpo_reward.png"),
                   help="reward figure ('' to skip)")
    return p.parse_args(argv)


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


def summary(values):
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def run_one(job: tuple) -> dict:
    """One GRPO run (a separate process when --jobs > 1)."""
    name, seed, a = job
    torch.set_num_threads(a.threads)
    base, _ = load_or_pretrain(rl_base_config(name, progress=False))
    cfg = RLConfig(task=name, rank=a.rank, lr=a.lr, prompts=a.prompts, group_size=a.group_size, beta=a.beta,
                   steps=a.steps, eval_every=a.eval_every, seed=seed, progress=False)
    _, m = rl_finetune(cfg, base)
    train = m["train_seconds"] - m["eval_seconds"]
    run = {"task": name, "seed": seed, "before": m["base_exact_match"], "after": m["test_exact_match"],
           "evals": m["evals"], "reward": m["per_step"]["reward"], "kl": m["per_step"]["kl"],
           "seconds": train, "cpu_seconds": m["train_cpu_seconds"], "generate_seconds": m["generate_seconds"],
           "reference_seconds": m["reference_seconds"],
           "update_seconds": train - m["generate_seconds"] - m["reference_seconds"], "eval_seconds": m["eval_seconds"]}
    print(f"{name} seed {seed}: {100 * run['before']:.1f}% -> {100 * run['after']:.1f}% in {train:.0f} s "
          f"({run['cpu_seconds']:.0f} CPU s); evals {m['evals']}", flush=True)
    return run


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    tasks, seeds = a.tasks.split(","), [int(s) for s in a.seeds.split(",")]
    results = {"settings": vars(a), "torch": torch.__version__, "tasks": {}}
    bases = {}
    for name in tasks:  # built (or loaded) once, before the runs that share them
        base_cfg = rl_base_config(name, progress=False)
        bases[name] = (base_cfg, *load_or_pretrain(base_cfg))
    jobs = [(name, seed, a) for name in tasks for seed in seeds]
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            runs = list(pool.map(run_one, jobs))
    else:
        runs = [run_one(j) for j in jobs]
    for name in tasks:
        base_cfg, base, info = bases[name]
        mine = [r for r in runs if r["task"] == name]
        tp = throughput(base, Task(name), a.prompts, a.group_size, a.repeats)
        print(f"{name} throughput: rollouts {tp['rollouts_per_s']:.0f}/s, plain generate {tp['plain_per_s']:.0f}/s, "
              f"ratio {tp['ratio']:.2f}", flush=True)
        lift = [100 * (r["after"] - r["before"]) for r in mine]
        results["tasks"][name] = {
            "base": {"steps": base_cfg.steps, "exact_match": info.get("test_exact_match"),
                     "seconds": info.get("seconds")},  # seconds when it was built (also when loaded from the cache)
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
    lines = [f"GRPO + LoRA r={s['rank']}, {s['prompts']} prompts x G={s['group_size']}, beta={s['beta']}, "
             f"lr {s['lr']}, {s['steps']} steps, seeds {s['seeds']}, {s['threads']} thread(s); torch {results['torch']}",
             "",
             "| task | base steps | before (mean) | after (mean, min-max) | lift (mean, min-max) | wall s (mean) "
             "| CPU s (mean) | generate | reference | update | rollouts/s | plain generate/s | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results["tasks"].items():
        runs = r["runs"]
        tot = sum(x["seconds"] for x in runs)
        share = {k: 100 * sum(x[k + "_seconds"] for x in runs) / tot for k in ("generate", "reference", "update")}
        tp = r["throughput"]
        lines.append(f"| {name} | {r['base']['steps']} | {r['before']['mean']:.1f} | {r['after']['mean']:.1f} "
                     f"({r['after']['min']:.1f}-{r['after']['max']:.1f}) | {r['lift']['mean']:+.1f} "
                     f"({r['lift']['min']:+.1f} to {r['lift']['max']:+.1f}) | {r['seconds']['mean']:.0f} "
                     f"| {r['cpu_seconds']['mean']:.0f} "
                     f"| {share['generate']:.0f}% | {share['reference']:.0f}% | {share['update']:.0f}% "
                     f"| {tp['rollouts_per_s']:.0f} | {tp['plain_per_s']:.0f} | {tp['ratio']:.2f} |")
    lines += ["", "Exact-match in %, greedy, on the fixed 500-problem test set. Seconds: training only "
              "(test-set evaluations excluded); CPU s: CPU time of the run's process (one thread), closer than "
              "the wall clock to the cost on an idle machine. generate / reference / update: share of the wall "
              "seconds. Throughput: completions per second, median of interleaved repeats, same prompts."]
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    names = list(results["tasks"])
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run in results["tasks"][name]["runs"]:
            r = run["reward"]
            k = 10
            smooth = [statistics.fmean(r[max(0, i - k + 1):i + 1]) for i in range(len(r))]
            line, = ax.plot(range(1, len(r) + 1), smooth, lw=1, label=f"mean reward, seed {run['seed']}")
            steps, em = zip(*run["evals"]) if run["evals"] else ((), ())
            ax.plot([0, *steps], [run["before"], *em], "o--", color=line.get_color(), ms=3, lw=0.8)
        ax.set_title(f"{name}: reward (lines) and test exact-match (dots)")
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    raise SystemExit(main())

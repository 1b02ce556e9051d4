"""S-GRPO and T-SPMO against full-token GRPO, and gradient-based rank
allocation under GRPO, at toy scale.

Part 1 (Lee and Tong, arXiv 2504.20834). From the same partly supervised
base, LoRA rank R on every linear layer, the same budget of steps, several
seeds, on 2-digit multiplication and on word problems: ``grpo`` (every
completion token), ``sgrpo`` (the first alpha tokens, then each with
probability p) and ``tspmo`` (prefix-tree advantages, branching tokens
only). Columns: greedy exact-match on the fixed 500-problem test set before
and after (mean and range over seeds), the share of completion tokens whose
log-probability gets a non-zero gradient, training seconds (median, and as
a ratio to GRPO in the same run: the three run interleaved per seed), and
the memory of one update step. On a CPU that is the bytes of the tensors
autograd saves for backward during the loss's forward pass, counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once; the
model's own parameters, which exist anyway, are not counted). On a GPU it
would be ``torch.cuda.max_memory_allocated``; these runs had none. The
token share and the memory are measured on the same batch of rollouts of
the base model for all three, and for S-GRPO with a cap of k = 2 tokens
(one update step only, no training run).

The claims under test: under LoRA, full-token GRPO barely beats the base
while both selective methods lift accuracy a lot (SVAMP 46% -> above 70%),
T-SPMO strongest on multi-digit multiplication.

Part 2 (Sawant, arXiv 2605.07366), GRPO with LoRA on one task: a uniform
rank-R probe for ``--rank-warmup`` steps, then the adapters are rebuilt
(B = 0) with ranks ``uniform``, ``gradient`` (proportional to each layer's
share of the gradient norm), ``random`` (same budget) or ``reduced``
(gradient at 70% of the budget), and trained ``--rank-steps`` more steps;
``base`` is the starting model. Also the max/min spread of the layers'
gradient share during the probe and during as many steps after the rebuild.
The paper's numbers (Qwen2.5-1.5B, GSM8K): uniform 74.5, proportional 70.0,
random 67.5, reduced 65.0, base 66.0; spread 2.17x -> 3.00x.

Usage: ``python benchmarks/rl_variants.py [--steps 100 --seeds 0,1,2
--tasks mul,wordprob --rank-task mul --rank-steps 100 --rank-warmup 20]
[--json FILE]`` (the table goes next to the JSON, as .txt).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lora_from_scratch.checkpoint import atomic_write, write_json
from lora_from_scratch.grpo import rl_batches, token_logprobs
from lora_from_scratch.recipes import adapt, load_or_pretrain
from lora_from_scratch.rl import ALGOS, RLConfig, rl_base_config, rl_finetune
from lora_from_scratch.tasks import Task
from lora_from_scratch.train import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
RANK_ROWS = {  # row -> (rank_allocation, fraction of the uniform budget)
    "uniform": ("uniform", 1.0), "gradient": ("gradient", 1.0), "random": ("random", 1.0),
    "reduced (70%)": ("gradient", 0.7),
}


def saved_bytes(fn, params) -> tuple[object, int]:
    """Run ``fn()``; return its result and the bytes of the distinct storages
    autograd saved for backward meanwhile, parameters excluded."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def update_step_probe(base, task: Task, cfg: RLConfig) -> dict:
    """Memory of one update step and the share of tokens with a gradient, for
    each algo, on one batch of rollouts of the base model (LoRA B = 0)."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    adapt(model, "lora", cfg.rank, cfg.alpha, cfg.scale)
    batch = rl_batches(task, cfg.prompts, 1, seed=12_345)(0)
    ro = None
    out = {}
    variants = [(algo, algo, {}) for algo in ALGOS] + [("sgrpo, cap k=2", "sgrpo", {"keep_max": 2})]
    for row, algo, options in variants:
        cls = ALGOS[algo]
        obj = cls(RLConfig(algo=algo, task=task.name, digits=task.digits, algo_options=options).objective_config(),
                  task, seed=0)
        if ro is None:
            ro = obj.rollouts(model, batch)
        obj.rollout_id, obj.ro = batch["rollout_id"], ro  # the same rollouts for every algo
        (loss, _), nbytes = saved_bytes(lambda: obj(model, batch), list(model.parameters()))
        loss.backward()
        model.zero_grad(set_to_none=True)
        logp = token_logprobs(model, ro).detach().requires_grad_()  # which log-probs does the loss reach?
        obj.loss(logp, logp.detach(), ro).backward()
        m = ro.completion_mask.bool()
        out[row] = {"saved_bytes": nbytes, "grad_token_share": float((logp.grad != 0)[m].float().mean()),
                     "completion_tokens": int(m.sum()), "mixed_groups": int(
                         (ro.rewards.view(-1, ro.group_size).std(1) > 0).sum()), "groups": len(ro.problems)}
    return out


def task_setting(text: str | None, task: str, default):
    """``"mul=60,wordprob=30"`` -> the value for ``task`` (``default`` when absent)."""
    pairs = dict(kv.split("=") for kv in text.split(",")) if text else {}
    return int(pairs[task]) if task in pairs else default


def split_task(name: str) -> tuple[str, str | None]:
    """``"mul"`` -> ("mul", None) (the task's default operand sizes); ``"mul/2x1"`` -> ("mul", "2,1")."""
    task, _, digits = name.partition("/")
    return task, digits.replace("x", ",") or None


def load_base(a, task_name: str):
    base, meta = load_or_pretrain(rl_base_config(*split_task(task_name), progress=False,
                                                 steps=task_setting(a.base_steps, task_name, None)))
    print(f"[{task_name}] base: {meta['path']}, exact-match {meta.get('test_exact_match')}", flush=True)
    return base, meta


def algo_runs(a, task_name: str) -> dict:
    base, meta = load_base(a, task_name)
    tname, digits = split_task(task_name)
    task = Task(tname, digits)
    steps = task_setting(a.task_steps, task_name, a.steps)
    probe = update_step_probe(base, task, RLConfig(task=tname, digits=digits, rank=a.rank))
    runs = {algo: [] for algo in a.algos}
    for seed in a.seeds:
        for algo in a.algos:  # interleaved, so the timing ratios see the same machine load
            cfg = RLConfig(algo=algo, task=tname, digits=digits, rank=a.rank, steps=steps, lr=a.lr, eval_every=0, seed=seed,
                           progress=False, base_steps=task_setting(a.base_steps, task_name, None))
            _, m = rl_finetune(cfg, base)
            gf = [x for x in m["per_step"].get("grad_frac", []) if x is not None]
            runs[algo].append({"seed": seed, "before": m["base_exact_match"], "after": m["test_exact_match"],
                               "train_seconds": m["train_seconds"], "train_cpu_seconds": m["train_cpu_seconds"],
                               "grad_frac_mean": statistics.mean(gf) if gf else None,
                               "reward_per_step": m["per_step"]["reward"]})
            print(f"[{task_name}] {algo} seed {seed}: {m['base_exact_match']:.3f} -> {m['test_exact_match']:.3f} "
                  f"in {m['train_seconds']:.1f} s", flush=True)
    base_meta = {"file": Path(meta["path"]).name, **{k: meta.get(k) for k in ("test_exact_match", "steps")}}
    return {"task": task.spec(), "label": task_name, "steps": steps, "base_meta": base_meta, "probe": probe,
            "runs": runs}


def rank_runs(a) -> dict:
    base, meta = load_base(a, a.rank_task)
    task = Task(a.rank_task)
    rows = {"base": [{"seed": s, "after": evaluate(base, task)} for s in a.rank_seeds[:1]]}
    n_layers = 6 * base.config.n_layer
    for seed in a.rank_seeds:
        for row, (variant, frac) in RANK_ROWS.items():
            budget = round(frac * n_layers * a.rank)
            cfg = RLConfig(algo="grpo", task=a.rank_task, rank=a.rank, steps=a.rank_steps, lr=a.lr, eval_every=0,
                           seed=seed,
                           progress=False, base_steps=task_setting(a.base_steps, a.rank_task, None),
                           rank_allocation=variant, rank_budget=budget, rank_warmup=a.rank_warmup)
            _, m = rl_finetune(cfg, base)
            rows.setdefault(row, []).append({
                "seed": seed, "before": m["base_exact_match"], "after": m["test_exact_match"], "budget": budget,
                "ranks": m["ranks"], "trainable_parameters": m["trainable_parameters"],
                "spread_before": m["share_spread_before"], "spread_after": m["share_spread_after"],
                "train_seconds": m["train_seconds"]})
            print(f"[rank] {row} seed {seed}: {m['base_exact_match']:.3f} -> {m['test_exact_match']:.3f}, ranks "
                  f"{list(m['ranks'].values())}, spread {m['share_spread_before']:.2f}x -> "
                  f"{m['share_spread_after']:.2f}x", flush=True)
    return {"task": task.spec(), "rows": rows}


def pct(x):
    return f"{100 * x:.1f}"


def label(part: dict) -> str:
    """A task part's name in the tables: "mul", or "mul/2x1" when it names operand sizes."""
    return part.get("label", part["task"]["name"])


def merge_parts(parts: list) -> list:
    """Task parts of runs made in parallel; parts of the same task (e.g. its
    seeds split over two processes) become one, their runs concatenated."""
    merged = {}
    for part in parts:
        key = label(part)
        if key not in merged:
            merged[key] = {**part, "runs": {algo: list(rs) for algo, rs in part["runs"].items()}}
        else:
            for algo, rs in part["runs"].items():
                merged[key]["runs"].setdefault(algo, []).extend(rs)
    return list(merged.values())


def table(res: dict) -> str:
    a = res["args"]
    out = [f"S-GRPO / T-SPMO / GRPO with LoRA rank {a['rank']} (all linear layers), lr {a.get('lr', 3e-3):g}, seeds {a['seeds']}, "
           + ", ".join(f"{label(p)} {p['steps']} steps" for p in res["algos"])
           + "; exact-match in % on the task's fixed test set (500 problems; 108 for mul/2x1) (mean, min-max over seeds)", "",
           "| task | algo | before | after | change | tokens with gradient (one batch; mean in training) "
           "| saved for backward, one step | training CPU s (median) | CPU time vs grpo |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for part in res["algos"]:
        runs, probe = part["runs"], part["probe"]
        t_grpo = [r["train_cpu_seconds"] for r in runs.get("grpo", [])]
        for algo, rs in runs.items():
            before = statistics.mean(r["before"] for r in rs)
            after = [r["after"] for r in rs]
            gf = [r["grad_frac_mean"] for r in rs if r["grad_frac_mean"] is not None]
            ratio = (statistics.median([r["train_cpu_seconds"] / g for r, g in zip(rs, t_grpo)]) if t_grpo else None)
            out.append(f"| {label(part)} | {algo} | {pct(before)} | {pct(statistics.mean(after))} "
                       f"({pct(min(after))}-{pct(max(after))}) | {100 * (statistics.mean(after) - before):+.1f} | "
                       f"{pct(probe[algo]['grad_token_share'])}%" + (f"; {pct(statistics.mean(gf))}%" if gf else "")
                       + f" | {probe[algo]['saved_bytes'] / 2**20:.2f} MiB "
                       f"({probe[algo]['saved_bytes'] / probe['grpo']['saved_bytes']:.2f}x) | "
                       f"{statistics.median(r['train_cpu_seconds'] for r in rs):.1f} | "
                       + (f"{ratio:.2f}x |" if ratio else "- |"))
        extra = [k for k in probe if k not in runs]
        for k in extra:
            out.append(f"| {label(part)} | {k} (one update step only) | | | | {pct(probe[k]['grad_token_share'])}% | "
                       f"{probe[k]['saved_bytes'] / 2**20:.2f} MiB ({probe[k]['saved_bytes'] / probe['grpo']['saved_bytes']:.2f}x) | | |")
    if res.get("rank"):
        rk = res["rank"]
        out += ["", f"Rank allocation under GRPO on {rk['task']['name']}: LoRA rank {a['rank']} probe for "
                f"{a['rank_warmup']} steps, rebuild, {a['rank_steps']} more steps; seeds {a['rank_seeds']}", "",
                "| row | budget (sum of ranks) | ranks per layer (seed " + str(a["rank_seeds"][0]) + ") "
                "| trainable params | exact-match after (mean, min-max) | gradient-share spread max/min: probe -> after |",
                "|---|---:|---|---:|---:|---:|"]
        for row, rs in rk["rows"].items():
            after = [r["after"] for r in rs]
            if row == "base":
                out.append(f"| base | - | - | 0 | {pct(after[0])} | - |")
                continue
            sb = statistics.median(r["spread_before"] for r in rs)
            sa = statistics.median(r["spread_after"] for r in rs)
            out.append(f"| {row} | {rs[0]['budget']} | {' '.join(map(str, rs[0]['ranks'].values()))} | "
                       f"{rs[0]['trainable_parameters']} | {pct(statistics.mean(after))} ({pct(min(after))}-"
                       f"{pct(max(after))}) | {sb:.2f}x -> {sa:.2f}x |")
    out += ["", "Bases: " + ", ".join(f"{label(p)} {100 * p['base_meta']['test_exact_match']:.1f}% "
                                       f"({p['base_meta']['steps']} supervised steps)" for p in res["algos"]),
            f"Machine: {res['machine']}; total {res['seconds'] / 60:.1f} min of wall clock."]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="mul,wordprob", help="tasks of part 1 (default mul,wordprob)")
    p.add_argument("--algos", default="grpo,sgrpo,tspmo", help="algos of part 1 (default all three)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of part 1 (default 0,1,2)")
    p.add_argument("--steps", type=int, default=100, help="RL steps per run in part 1 (default 100)")
    p.add_argument("--task-steps", help="steps per task overriding --steps, e.g. mul=60,wordprob=30")
    p.add_argument("--base-steps", help="supervised steps of each task's starting base, e.g. mul=865 "
                   "(default: the rl recipe's)")
    p.add_argument("--lr", type=float, default=RLConfig.lr, help=f"learning rate (default {RLConfig.lr}, the rl recipe's)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank R (default 8)")
    p.add_argument("--rank-task", default="mul", help="task of part 2 (default mul); 'none' skips part 2")
    p.add_argument("--rank-seeds", default="0", help="seeds of part 2 (default 0)")
    p.add_argument("--rank-steps", type=int, default=100, help="steps after the rebuild in part 2 (default 100)")
    p.add_argument("--rank-warmup", type=int, default=20, help="probe steps in part 2 (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", default=str(RESULTS / "rl_variants.json"), help="where the results go (and .txt)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="only merge results files of runs made in parallel (their task parts, the one rank part) "
                        "into --json and its table")
    a = p.parse_args(argv)
    if a.combine:
        parts = [json.loads(Path(f).read_text()) for f in a.combine]
        res = {**parts[0], "algos": merge_parts([t for r in parts for t in r["algos"]]),
               "rank": next((r["rank"] for r in parts if r.get("rank")), None),
               "seconds": max(r["seconds"] for r in parts), "combined_from": [str(f) for f in a.combine]}
        res["args"] = {**parts[0]["args"], **next((r["args"] for r in parts if r.get("rank")), {}),
                       "tasks": ",".join(label(t) for t in res["algos"]),
                       "seeds": sorted({r["seed"] for t in res["algos"] for rs in t["runs"].values() for r in rs})}
        write_json(a.json, res)
        with atomic_write(Path(a.json).with_suffix(".txt")) as f:
            f.write(table(res))
        print(table(res))
        return res
    torch.set_num_threads(a.threads)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.rank_seeds = [int(s) for s in a.rank_seeds.split(",")]
    a.algos = a.algos.split(",")
    unknown = sorted(set(a.algos) - set(ALGOS))
    if unknown:
        p.error(f"unknown algos {unknown}; expected some of {sorted(ALGOS)}")
    warm = torch.nn.Parameter(torch.zeros(1))  # torch's optimizer imports take seconds once: not in any timing
    opt = torch.optim.AdamW([warm], foreach=True)
    warm.sum().backward()
    opt.step()
    t0 = time.perf_counter()
    res = {"args": {k: v for k, v in vars(a).items() if k != "json"},
           "machine": f"CPU, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"}
    res["algos"] = [algo_runs(a, t) for t in a.tasks.split(",") if t]
    res["rank"] = rank_runs(a) if a.rank_task != "none" else None
    res["seconds"] = time.perf_counter() - t0
    write_json(a.json, res)
    text = table(res)
    with atomic_write(Path(a.json).with_suffix(".txt")) as f:
        f.write(text)
    print(text)
    return res


if __name__ == "__main__":
    main()

"""Rank-accuracy curves of LoRA, DyLoRA and MatryoshkaLoRA (issue 3).

All methods fine-tune adapters of maximum rank R on every linear layer of
the same frozen base (TinyGPT pretrained on addition, cached in
data/checkpoints/) for a task the base never saw, with the same steps,
learning rate and data. Each adapter is then evaluated truncated to every
rank in {1, 2, 4, ..., R} (greedy exact-match on the fixed 500-problem
test set), and the curve is summarised by AURAC (log2 ranks, in %).

Rows:
- ``lora``: plain LoRA at rank R, truncated at evaluation;
- ``dylora``: DyLoRA, frozen mode (one rank b per step, uniform over
  1..R, only component b learns), and ``dylora-nf``: non-frozen mode;
- ``matryoshka``: MatryoshkaLoRA with S = {1, 2, 4, ..., R};
- ``matryoshka, P kept``: a diagnostic, not the method's inference rule
  (which drops P): the training forward B diag(P) A truncated to r
  components. It shows whether the nested components are useful at all;
- ``lora@r``: a separate plain LoRA trained at each rank r, the reference
  each sub-rank could reach if trained on its own (it costs one training
  per rank, which is what the rank-adaptive methods avoid).

The claim under test (Modoranu et al. 2026): MatryoshkaLoRA keeps accuracy
at low sub-ranks where truncated LoRA collapses, and beats DyLoRA at high
ranks, so its AURAC is the highest.

Usage: ``python benchmarks/rank_curves.py [--task sub --digits 3 --rank 32
--steps 600 --seeds 0,1,2] [--json FILE] [--plot FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lora_from_scratch.adapters import adapter_layers
from lora_from_scratch.checkpoint import write_json
from lora_from_scratch.matryoshka import MatryoshkaLoRALinear, aurac
from lora_from_scratch.recipes import FinetuneConfig, PretrainConfig, finetune, load_or_pretrain
from lora_from_scratch.tasks import Task
from lora_from_scratch.train import evaluate

METHOD_ROWS = {  # row name -> FinetuneConfig settings
    "lora": dict(method="lora"),
    "dylora": dict(method="dylora"),
    "dylora-nf": dict(method="dylora", options={"unfrozen": True}),
    "matryoshka": dict(method="matryoshka"),
}


@torch.no_grad()
def p_truncated(model, task, ranks) -> dict[int, float]:
    """Diagnostic, not the method's inference rule: evaluate the training
    forward B diag(P) A truncated to r components (P_i = 0 for i > r)."""
    layers = [m for _, m in adapter_layers(model) if isinstance(m, MatryoshkaLoRALinear)]
    saved = [m.P.clone() for m in layers]
    out = {}
    for r in ranks:
        for m, P in zip(layers, saved):
            m.P.copy_(P)
            m.P[r:] = 0
        out[r] = evaluate(model, task)
    for m, P in zip(layers, saved):
        m.P.copy_(P)
    return out


def run(a) -> dict:
    if a.rank < 1:
        raise SystemExit(f"--rank must be >= 1, got {a.rank}")
    # evaluation ranks {1, 2, 4, ...} up to R, and R itself when it is not a power of two
    ranks = sorted({2 ** i for i in range(a.rank.bit_length()) if 2 ** i <= a.rank} | {a.rank})
    base_cfg = PretrainConfig(task="add", digits=a.base_digits, seed=0, progress=False)
    base, base_metrics = load_or_pretrain(base_cfg)
    print(f"base: add {base_cfg.digits[0]} digits, exact-match {base_metrics.get('test_exact_match')}, "
          f"{base_metrics['path']}", flush=True)
    results = {"settings": vars(a), "ranks": ranks, "rows": {}}
    names = a.methods.split(",")
    unknown = [n for n in names if n not in METHOD_ROWS]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {', '.join(METHOD_ROWS)}")
    jobs = [(name, METHOD_ROWS[name], a.rank) for name in names]
    if not a.no_reference:
        jobs += [(f"lora@{r}", dict(method="lora"), r) for r in ranks]
    for name, kw, rank in jobs:
        per_seed = []
        for seed in map(int, a.seeds.split(",")):
            # S = {1, 2, 4, ..., R} for MatryoshkaLoRA; DyLoRA samples b from 1..R
            # (its default, METHODS.md section 2); LoRA has no rank set
            if kw["method"] == "matryoshka":
                kw = {**kw, "options": {"train_ranks": tuple(ranks)}}
            cfg = FinetuneConfig(rank=rank, alpha=a.alpha, scale=a.scale,
                                 task=a.task, digits=a.digits,
                                 steps=a.steps, lr=a.lr, batch_size=a.batch_size, base=base_cfg,
                                 eval_ranks=tuple(r for r in ranks if r <= rank), seed=seed, progress=False, **kw)
            t0 = time.perf_counter()
            model, m = finetune(cfg, base)
            per_seed.append({"by_rank": {int(r): v for r, v in m["exact_match_by_rank"].items()},
                             "aurac": m["aurac"], "params": m["trainable_parameters"],
                             "seconds": time.perf_counter() - t0})
            if name == "matryoshka":
                per_seed[-1]["p_forward"] = m["p_forward_exact_match"]
                per_seed[-1]["p_truncated"] = p_truncated(model, Task(cfg.task, cfg.digits), ranks)
            print(f"{name} seed {seed}: " + " ".join(f"r{r}={v:.3f}" for r, v in per_seed[-1]["by_rank"].items())
                  + f" AURAC {m['aurac']:.1f}", flush=True)
        results["rows"][name] = per_seed
        if name == "matryoshka":  # the diagnostic curve, as a row of its own
            results["rows"]["matryoshka, P kept (diagnostic)"] = [
                {"by_rank": s["p_truncated"], "params": s["params"], "seconds": 0.0,
                 "aurac": aurac(ranks, [100 * s["p_truncated"][r] for r in ranks])} for s in per_seed]
    return results


def summarise(results: dict) -> str:
    ranks = results["ranks"]
    lines = ["| method | " + " | ".join(f"r={r}" for r in ranks) + " | AURAC | trainable params | seconds |",
             "|---|" + "---:|" * (len(ranks) + 3)]
    for name, per_seed in results["rows"].items():
        cells = []
        for r in ranks:
            vals = [100 * s["by_rank"][r] for s in per_seed if r in s["by_rank"]]
            if not vals:
                cells.append("")
            elif name.startswith("lora@"):
                cells.append(f"{statistics.mean(vals):.1f} ± {_sd(vals):.1f}" if int(name[5:]) == r else "")
            else:
                cells.append(f"{statistics.mean(vals):.1f} ± {_sd(vals):.1f}")
        au = [s["aurac"] for s in per_seed]
        au_cell = f"{statistics.mean(au):.1f} ± {_sd(au):.1f}" if not name.startswith("lora@") else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {au_cell} | {per_seed[0]['params']:,} "
                     f"| {statistics.mean(s['seconds'] for s in per_seed):.1f} |")
    ref = [n for n in results["rows"] if n.startswith("lora@")]
    if ref:  # the reference curve: each rank trained on its own
        vals = [[100 * s["by_rank"][int(n[5:])] for s in results["rows"][n]] for n in ref]
        curve = [statistics.mean(v) for v in vals]
        lines.append("| lora@r (curve) | " + " | ".join(f"{c:.1f}" for c in curve)
                     + f" | {aurac([int(n[5:]) for n in ref], curve):.1f} | | |")
    pf = [100 * s["p_forward"] for s in results["rows"].get("matryoshka", []) if "p_forward" in s]
    if pf:
        lines.append(f"\nMatryoshkaLoRA's training forward B diag(P) A (all of P, no truncation): "
                     f"{statistics.mean(pf):.1f} ± {_sd(pf):.1f}% exact-match")
    return "\n".join(lines)


def _sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no figure")
        return
    ranks = results["ranks"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, per_seed in results["rows"].items():
        if name.startswith("lora@"):
            continue
        mean = [100 * statistics.mean(s["by_rank"][r] for s in per_seed) for r in ranks]
        ax.plot(ranks, mean, marker="o", label=name)
    ref = [n for n in results["rows"] if n.startswith("lora@")]
    if ref:
        rs = [int(n[5:]) for n in ref]
        ax.plot(rs, [100 * statistics.mean(s["by_rank"][r] for s in results["rows"][n]) for n, r in zip(ref, rs)],
                "k--", marker="x", label="lora trained at r")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank used at evaluation")
    ax.set_ylabel("test exact-match (%)")
    s = results["settings"]
    task = Task(s["task"], s["digits"])
    ax.set_title(f"{task.name} {task.digits[0]}-digit, R={s['rank']}, {s['steps']} steps, "
                 f"mean of seeds {s['seeds']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sub", help="fine-tuning task (default sub)")
    ap.add_argument("--digits", help="its operand digits (default: the task's default)")
    ap.add_argument("--base-digits", default="3", help="digits of the addition base (default 3)")
    ap.add_argument("--rank", type=int, default=32, help="maximum rank R (default 32)")
    ap.add_argument("--scale", default="rslora", choices=["lora", "rslora", "none"],
                    help="scale rule c(r) for every method (default rslora, as the MatryoshkaLoRA code)")
    ap.add_argument("--alpha", type=float, default=2 * 32 ** 0.5,
                    help="alpha for every method and rank (default 2 sqrt(32): c(32) = 2 under rslora)")
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps (default 600)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    ap.add_argument("--batch-size", type=int, default=128, help="problems per step (default 128)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    ap.add_argument("--methods", default=",".join(METHOD_ROWS),
                    help=f"rows to run (default {','.join(METHOD_ROWS)})")
    ap.add_argument("--no-reference", action="store_true", help="skip the lora@r rows (one training per rank)")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--plot", help="write the rank-accuracy figure to this PNG file (needs matplotlib)")
    ap.add_argument("--from-json", metavar="FILE", help="re-print and re-plot results saved by --json; no training")
    a = ap.parse_args(argv)
    results = json.loads(Path(a.from_json).read_text()) if a.from_json else run(a)
    if a.from_json:  # JSON keys are strings
        for per_seed in results["rows"].values():
            for s in per_seed:
                s["by_rank"] = {int(r): v for r, v in s["by_rank"].items()}
    table = summarise(results)
    print("\nexact-match (%) by evaluation rank, mean ± sd over seeds\n")
    print(table)
    if a.json and not a.from_json:
        write_json(a.json, {**results, "table": table})
    if a.plot:
        plot(results, a.plot)
    return results


if __name__ == "__main__":
    main()

"""Rank-accuracy curves of LoRA, DyLoRA and MatryoshkaLoRA, in two settings.

All methods fine-tune adapters of maximum rank R on every linear layer of
the same frozen base with the same steps, learning rate and data. Each
adapter is then evaluated truncated to every rank in {1, 2, 4, ..., R}
(greedy exact-match on the task's fixed 500-problem test set), and the curve
is summarised by AURAC (log2 ranks, in %).

Two settings (``--settings``), because the method's analysis predicts that
it works when the trained update is small and fails when it is large:

- ``task-switch``: the addition base (3-digit, solved) learns 3-digit
  subtraction, an operation it never saw: a large change. Scale rule rsLoRA
  with alpha = 2 sqrt(32) (so c(32) = 2, our LoRA default's size).
- ``partly-solved``: a base stopped early on 3-digit addition (it already
  answers part of the test set) is fine-tuned on the same task, as the
  paper fine-tunes an LLM that partly solves GSM8K: a small change. Scale
  rule as in the MatryoshkaLoRA reference code, c(s) = alpha / sqrt(s) with
  alpha = 1.

Rows:
- ``lora``: plain LoRA at rank R, truncated at evaluation;
- ``dylora``: DyLoRA, frozen mode (one rank b per step, uniform over
  1..R, only component b learns), and ``dylora-nf``: non-frozen mode;
- ``matryoshka``: MatryoshkaLoRA with S = {1, 2, 4, ..., R};
- ``matryoshka, P kept``: a diagnostic, not the method's inference rule
  (which drops P): the training forward B diag(P) A truncated to r
  components. At r = R it is the function MatryoshkaLoRA trained;
- ``nested-sum``: the control, the objective MatryoshkaLoRA approximates:
  a plain LoRA trained on the sum of its nested LoRAs' own losses,
  sum_{s in S} L(W + c(s) B_s A_s), one forward per training rank s;
- ``lora@r``: a separate plain LoRA trained at each rank r, the reference
  each sub-rank could reach if trained on its own (it costs one training
  per rank, which is what the rank-adaptive methods avoid).

Next to each row, the size of the trained update: for every adapted layer,
||adapter output|| / ||base output|| (Frobenius norms over the answer-and-
prompt tokens of 256 test problems), at rank R, as the median and the
largest over the layers.

The claim under test (Modoranu et al. 2026): MatryoshkaLoRA keeps accuracy
at low sub-ranks where truncated LoRA collapses, and beats DyLoRA at high
ranks, so its AURAC is the highest.

Usage: ``python benchmarks/rank_curves.py [--settings task-switch,partly-solved
--rank 32 --seeds 0,1,2] [--json FILE] [--plot FILE]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lora_from_scratch.adapters import adapter_layers
from lora_from_scratch.checkpoint import atomic_write, pyplot, save_figure, write_json
from lora_from_scratch.data import encode_batch
from lora_from_scratch.lora import LoRALinear
from lora_from_scratch.matryoshka import MatryoshkaLoRALinear, MatryoshkaOptions, aurac, default_train_ranks
from lora_from_scratch.methods import METHODS, AdapterMethod
from lora_from_scratch.recipes import FinetuneConfig, PretrainConfig, finetune, load_or_pretrain
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer
from lora_from_scratch.train import evaluate

# The partly-solved base: 860 steps of a 860-step schedule on 3-digit addition,
# seed 0. It sits on the plateau where most answer digits are right but few
# whole answers (12% exact-match, loss 0.47); 3-digit addition leaves that
# plateau abruptly, so 870 or 900 steps already give 92% to 98%.
BASE_STEPS = 860
# name -> (label, base model, fine-tuning task and digits, scale rule, alpha, steps)
SETTINGS = {
    "task-switch": dict(label="task switch: 3-digit subtraction on a 3-digit addition base (large update)",
                        base=dict(task="add", digits=3), task="sub", digits="3",
                        scale="rslora", alpha=2 * math.sqrt(32), steps=600),
    "partly-solved": dict(label="partly solved: 3-digit addition on a base stopped early on it (small update)",
                          base=dict(task="add", digits=3, steps=BASE_STEPS, stop_when_solved=False),
                          task="add", digits="3", scale="rslora", alpha=1.0, steps=300),
}

METHOD_ROWS = {  # row name -> FinetuneConfig settings
    "lora": dict(method="lora"),
    "dylora": dict(method="dylora"),
    "dylora-nf": dict(method="dylora", options={"unfrozen": True}),
    "matryoshka": dict(method="matryoshka"),
    "nested-sum": dict(method="nested-sum"),
}


def with_nested_sum(loss_fn, opts):
    """The control: ``sum_{s in S} loss_fn`` at rank s, one forward per rank
    (each nested LoRA c(s) B_s A_s on its own loss, the parameters shared)."""
    def nested_sum_loss(model, batch):
        layers = [m for _, m in adapter_layers(model) if isinstance(m, LoRALinear)]
        ranks = opts.train_ranks or default_train_ranks(layers[0].r)
        total = 0.0
        try:
            for s in ranks:
                for m in layers:
                    m.set_rank(s)
                total = total + loss_fn(model, batch)[0]  # the graph keeps the rank-s factors
        finally:
            for m in layers:
                m.set_rank(None)
        return total, {}
    return nested_sum_loss


# A control, not a method of the library: registered for this script only.
METHODS.setdefault("nested-sum", AdapterMethod(
    "nested-sum", "control: LoRA trained on sum_s L(W + c(s) B_s A_s)",
    lambda rank, alpha, scale, opts: (lambda lin: LoRALinear(lin, rank, alpha, scale=scale)),
    options=MatryoshkaOptions, wrap_loss=with_nested_sum, sub_ranks=True))


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


@torch.no_grad()
def update_size(model, task, rank) -> dict[str, float]:
    """||adapter output|| / ||base output|| per adapted layer, at ``rank``
    (None: each layer's default forward, MatryoshkaLoRA's training forward),
    over the real tokens of 256 test problems fed with their answers."""
    batch = encode_batch(task.test_set()[:256], Tokenizer())
    ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    real = mask.bool()  # (B, T)
    layers = adapter_layers(model)
    saved = [m.rank for _, m in layers]
    ratios, hooks = {}, []

    def hook(name):
        def record(mod, inputs, out):
            y = mod.base(inputs[0])  # (B, T, out)
            ratios[name] = ((out - y)[real].norm() / y[real].norm()).item()
        return record

    try:
        for name, m in layers:
            m.set_rank(rank)
            hooks.append(m.register_forward_hook(hook(name)))
        model(ids, mask)
    finally:
        for h in hooks:
            h.remove()
        for (_, m), r in zip(layers, saved):
            m.rank = r
    return ratios


def run_setting(a, name: str) -> dict:
    st = {**SETTINGS[name], **{k: getattr(a, k) for k in ("scale", "alpha", "steps") if getattr(a, k) is not None}}
    # evaluation ranks {1, 2, 4, ...} up to R, and R itself when it is not a power of two
    ranks = sorted({2 ** i for i in range(a.rank.bit_length()) if 2 ** i <= a.rank} | {a.rank})
    base_cfg = PretrainConfig(**st["base"], seed=0, progress=False)
    base, base_metrics = load_or_pretrain(base_cfg)
    task = Task(st["task"], st["digits"])
    base_acc = evaluate(base, task)
    print(f"[{name}] base: {base_cfg.task} {base_cfg.digits[0]} digits, {base_metrics['steps']} steps; "
          f"exact-match on {task.name} {task.digits[0]} digits before fine-tuning: {base_acc:.3f}", flush=True)
    results = {"label": st["label"], "settings": {**{k: v for k, v in st.items() if k != "label"},
                                                   "rank": a.rank, "lr": a.lr, "batch_size": a.batch_size,
                                                   "seeds": a.seeds},
               "base_steps": base_metrics["steps"], "base_exact_match": base_acc, "ranks": ranks, "rows": {}}
    jobs = [(row, METHOD_ROWS[row], a.rank) for row in a.methods.split(",") if row]
    if not a.no_reference:
        ref_ranks = [int(r) for r in a.reference_ranks.split(",")] if a.reference_ranks else ranks
        jobs += [(f"lora@{r}", dict(method="lora"), r) for r in ref_ranks]
    for row, kw, rank in jobs:
        per_seed = []
        for seed in map(int, a.seeds.split(",")):
            # S = {1, 2, 4, ..., R} for MatryoshkaLoRA and the control; DyLoRA
            # samples b from 1..R (its default); LoRA has no rank set
            if kw["method"] in ("matryoshka", "nested-sum"):
                kw = {**kw, "options": {"train_ranks": tuple(ranks)}}
            cfg = FinetuneConfig(rank=rank, alpha=st["alpha"], scale=st["scale"], task=st["task"],
                                 digits=st["digits"], steps=st["steps"], lr=a.lr, batch_size=a.batch_size,
                                 base=base_cfg, eval_ranks=tuple(r for r in ranks if r <= rank), seed=seed,
                                 progress=False, **kw)
            t0 = time.perf_counter()
            model, m = finetune(cfg, base)
            seconds = time.perf_counter() - t0
            size = update_size(model, task, rank)
            per_seed.append({"seed": seed, "by_rank": {int(r): v for r, v in m["exact_match_by_rank"].items()},
                             "aurac": m["aurac"], "params": m["trainable_parameters"], "seconds": seconds,
                             "update": size})
            if row == "matryoshka":
                per_seed[-1]["p_forward"] = m["p_forward_exact_match"]
                per_seed[-1]["p_truncated"] = p_truncated(model, task, ranks)
                per_seed[-1]["p_update"] = update_size(model, task, None)  # the training forward, with P
            print(f"[{name}] {row} seed {seed}: " + " ".join(f"r{r}={v:.3f}" for r, v in per_seed[-1]["by_rank"].items())
                  + f" AURAC {m['aurac']:.1f} update {statistics.median(size.values()):.3f} ({seconds:.0f} s)",
                  flush=True)
        results["rows"][row] = per_seed
        if row == "matryoshka":  # the diagnostic curve, as a row of its own
            results["rows"]["matryoshka, P kept (diagnostic)"] = [
                {"seed": s["seed"], "by_rank": s["p_truncated"], "params": s["params"], "seconds": 0.0,
                 "update": s["p_update"],
                 "aurac": aurac(ranks, [100 * s["p_truncated"][r] for r in ranks])} for s in per_seed]
    return results


def merge_rows(have: dict, new: dict) -> None:
    """Add ``new`` rows to ``have`` (runs of the same setting, e.g. one per
    seed). A seed both hold must have the same curve (same code, seed and
    threads: the same run); the measurements one lacks come from the other."""
    for row, per_seed in new.items():
        mine = have.setdefault(row, [])
        for p in per_seed:
            twin = next((q for q in mine if q.get("seed") == p.get("seed") is not None), None)
            if twin is None:
                mine.append(p)
            elif {int(r): v for r, v in twin["by_rank"].items()} != {int(r): v for r, v in p["by_rank"].items()}:
                raise SystemExit(f"row {row!r}, seed {p['seed']}: two runs disagree ({twin['by_rank']} "
                                 f"and {p['by_rank']}); they were not run alike")
            else:
                for k, v in p.items():
                    twin.setdefault(k, v)



def run(a) -> dict:
    if a.rank < 1:
        raise SystemExit(f"--rank must be >= 1, got {a.rank}")
    for opt, known in (("settings", SETTINGS), ("methods", METHOD_ROWS)):
        unknown = [n for n in getattr(a, opt).split(",") if n and n not in known]
        if unknown:
            raise SystemExit(f"unknown --{opt} {unknown}; choose from {', '.join(known)}")
    return {"args": vars(a), "settings": {name: run_setting(a, name) for name in a.settings.split(",")}}


def summarise_setting(results: dict) -> str:
    ranks = results["ranks"]
    s = results["settings"]
    head = [f"### {results['label']}", "",
            f"Base: {results['base_steps']} pretraining steps, {100 * results['base_exact_match']:.1f}% exact-match "
            f"on the fine-tuning task before fine-tuning. Fine-tuning: {s['steps']} steps, batch {s['batch_size']}, "
            f"lr {s['lr']}, scale rule {s['scale']} with alpha {s['alpha']:.3g}, R = {s['rank']}. "
            "Mean ± sd over the seeds in the `seeds` column.",
            ""]
    lines = ["| method | " + " | ".join(f"r={r}" for r in ranks)
             + " | AURAC | update at R: median (max) | seeds | trainable params | seconds |",
             "|---|" + "---:|" * (len(ranks) + 5)]
    for name, per_seed in results["rows"].items():
        cells = []
        for r in ranks:
            vals = [100 * p["by_rank"][r] for p in per_seed if r in p["by_rank"]]
            if not vals or (name.startswith("lora@") and int(name[5:]) != r):
                cells.append("")
            else:
                cells.append(f"{statistics.mean(vals):.1f} ± {_sd(vals):.1f}")
        au = [p["aurac"] for p in per_seed]
        au_cell = f"{statistics.mean(au):.1f} ± {_sd(au):.1f}" if not name.startswith("lora@") else ""
        measured = [p["update"] for p in per_seed if "update" in p]
        if measured:
            med = statistics.mean(statistics.median(u.values()) for u in measured)
            top = statistics.mean(max(u.values()) for u in measured)
            size = f"{med:.3f} ({top:.3f})" + (f", {len(measured)} of {len(per_seed)} seeds"
                                                if len(measured) < len(per_seed) else "")
        else:
            size = "not measured"
        secs = statistics.mean(p["seconds"] for p in per_seed)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {au_cell} | {size} | {len(per_seed)} "
                     f"| {per_seed[0]['params']:,} | {secs:.1f} |")
    ref = [n for n in results["rows"] if n.startswith("lora@")]
    if ref:  # the reference curve: each rank trained on its own
        vals = [[100 * p["by_rank"][int(n[5:])] for p in results["rows"][n]] for n in ref]
        curve = [statistics.mean(v) for v in vals]
        lines.append("| lora@r (curve) | " + " | ".join(f"{c:.1f}" for c in curve)
                     + f" | {aurac([int(n[5:]) for n in ref], curve):.1f} | | | | |")
    pf = [100 * p["p_forward"] for p in results["rows"].get("matryoshka", []) if "p_forward" in p]
    if pf:
        lines.append(f"\nMatryoshkaLoRA's training forward B diag(P) A (all of P, no truncation): "
                     f"{statistics.mean(pf):.1f} ± {_sd(pf):.1f}% exact-match")
    return "\n".join(head + lines)


def summarise(results: dict) -> str:
    return "\n\n".join(summarise_setting(r) for r in results["settings"].values())


def _sd(v):
    return statistics.stdev(v) if len(v) > 1 else 0.0


COLORS = ["lora", "dylora", "dylora-nf", "matryoshka", "matryoshka, P kept", "nested-sum"]


def plot(results: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    settings = list(results["settings"].values())
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings) + 2, 4), squeeze=False)
    for ax, res in zip(axes[0], settings):
        ranks = res["ranks"]
        for name, per_seed in res["rows"].items():
            if name.startswith("lora@"):
                continue
            mean = [100 * statistics.mean(p["by_rank"][r] for p in per_seed) for r in ranks]
            kind = name.split(" (")[0].split(",")[0] + (", P kept" if "P kept" in name else "")
            color = f"C{COLORS.index(kind)}" if kind in COLORS else None  # the same colour in every panel
            ax.plot(ranks, mean, marker="o", label=name, color=color, linestyle=":" if "diagnostic" in name else "-")
        ref = [n for n in res["rows"] if n.startswith("lora@")]
        if ref:
            rs = [int(n[5:]) for n in ref]
            ax.plot(rs, [100 * statistics.mean(p["by_rank"][r] for p in res["rows"][n]) for n, r in zip(ref, rs)],
                    "k--", marker="x", label="lora trained at r")
        ax.axhline(100 * res["base_exact_match"], color="grey", linewidth=0.8, label="base, before fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank used at evaluation")
        ax.set_ylabel("test exact-match (%)")
        ax.set_title(res["label"].split(":")[0] + f" (R={res['settings']['rank']}, {res['settings']['steps']} steps)",
                     fontsize=10)
        ax.grid(alpha=0.3)
    labels = {}  # every row of every panel, once
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    axes[0][-1].legend(labels.values(), labels.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    print(f"figure written to {path}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"settings to run (default {','.join(SETTINGS)}; see the module docstring)")
    ap.add_argument("--rank", type=int, default=32, help="maximum rank R (default 32)")
    ap.add_argument("--scale", choices=["lora", "rslora", "none"],
                    help="scale rule c(r) for every method (default: the setting's, rslora in both)")
    ap.add_argument("--alpha", type=float,
                    help="alpha for every method and rank (default: the setting's, 2 sqrt(32) or 1)")
    ap.add_argument("--steps", type=int, help="fine-tuning steps (default: the setting's, 600 or 300)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    ap.add_argument("--batch-size", type=int, default=128, help="problems per step (default 128)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    ap.add_argument("--methods", default=",".join(METHOD_ROWS),
                    help=f"rows to run (default {','.join(METHOD_ROWS)})")
    ap.add_argument("--no-reference", action="store_true", help="skip the lora@r rows (one training per rank)")
    ap.add_argument("--reference-ranks", help="train lora@r only at these ranks (default: every evaluation rank)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--json", help="write all results to this JSON file (and the table beside it, as .txt)")
    ap.add_argument("--plot", help="write the rank-accuracy figure to this PNG file (needs matplotlib)")
    ap.add_argument("--from-json", metavar="FILE", help="re-print and re-plot results saved by --json (several: comma-separated, "
                    "e.g. one file per setting); no training")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.from_json:  # one or more saved runs, their settings side by side
        runs = [json.loads(Path(f).read_text()) for f in a.from_json.split(",")]
        results = {"args": [r["args"] for r in runs], "settings": {}}
        for r in runs:  # the rows of one setting may come from several runs (e.g. one per row, in parallel)
            for k, v in r["settings"].items():
                if k in results["settings"]:
                    steps = v["settings"]["steps"]  # a row trained for other steps says so in its name
                    same = steps == results["settings"][k]["settings"]["steps"]
                    merge_rows(results["settings"][k]["rows"],
                               {(row if same else f"{row} ({steps} steps)"): ps for row, ps in v["rows"].items()})
                else:
                    results["settings"][k] = v
        for res in results["settings"].values():  # JSON keys are strings
            for per_seed in res["rows"].values():
                for p in per_seed:
                    p["by_rank"] = {int(r): v for r, v in p["by_rank"].items()}
    else:
        results = run(a)
    table = summarise(results)
    print("\nexact-match (%) by evaluation rank, mean ± sd over seeds\n")
    print(table)
    if a.json:
        write_json(a.json, {**results, "table": table})
        with atomic_write(Path(a.json).with_suffix(".txt")) as f:
            f.write(table + "\n")
    if a.plot:
        plot(results, a.plot)
    return results


if __name__ == "__main__":
    main()

"""ReMix vs the learned-router baseline (MixLoRA) vs LoRA, at equal active parameters.

Every row fine-tunes adapters on every linear layer of the same frozen base
(TinyGPT pretrained on addition, cached) for a task the base never saw,
with the same steps, learning rate, batches and seeds:

- ``lora r=kr``: one LoRA of rank k r at its default scale c = 2 (alpha = 2 k r);
- ``lora r=kr c=omega``: the same LoRA at ReMix's scale, c = omega = alpha/(k r);
- ``mixlora``: n LoRAs of rank r, top-k of a learned softmax router, weights
  renormalised over the k and scaled by k omega, load-balance loss 0.001;
- ``remix M=2``, ``remix M=4``: the same pool, k drawn per token at the
  constant weight omega = alpha/(k r), router trained by RLOO with M selections.

The mixtures' alpha defaults to 2 (omega = 2/(k r), our reading of the
paper). ``--alpha 16`` gives them LoRA's default update size instead
(omega = 2 for k r = 8): a LoRA's scale matters a lot on this task, so both
are worth running.

Per token, each mixture uses k LoRAs of rank r: the same active rank k r as
the LoRA rows (the mixtures store n/k times more LoRA weights, plus a router).

Reported: greedy exact-match on the task's fixed test set (mean, sd
and each seed), trainable and active parameters, seconds per training
step (from the runs themselves), and the routing over training: ESS of the
weights each token applies (1 / sum pi_i^2; k for uniform weights over k
LoRAs, 1 for one dominant LoRA) and ESS of the router's distribution q over
all n, min and mean over layers, every step. Speed ratios to the LoRA of
rank k r are measured separately in the same process, medians over rounds
that run every row in turn (each round starting at the next row), timing
each row's second step in a row: a training step and an eval (top-k)
forward.

The paper's claims (Qiu et al. 2026): the learned router's ESS collapses
toward 1 while ReMix's stays at k, and ReMix beats it at equal active
parameters.

Usage: ``python benchmarks/remix_vs_mixlora.py [--steps 300 --seeds 0,1,2]``
(``--help`` lists the rest). Writes benchmarks/results/remix_vs_mixlora.json
and .txt, and tutorials/figures/remix_ess.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from lora_from_scratch.adapters import trainable_parameters
from lora_from_scratch.checkpoint import atomic_write, pyplot, save_figure, write_json
from lora_from_scratch.data import train_batches
from lora_from_scratch.model import GPTConfig, TinyGPT
from lora_from_scratch.recipes import PretrainConfig, adapt, load_or_pretrain
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer
from lora_from_scratch.train import TrainConfig, evaluate, make_optimizer, sft_loss, train

ROOT = Path(__file__).resolve().parent.parent
LOGGED = ("ess_min", "ess_mean", "router_ess_min", "router_ess_mean", "max_weight", "loss_spread")


def rows(a) -> dict:
    """Row name -> (method, rank, alpha, options)."""
    n, k, r, alpha = a.experts, a.active, a.rank, a.alpha
    out = {"lora r=kr": ("lora", k * r, 2.0 * k * r, {}),
           "lora r=kr c=omega": ("lora", k * r, alpha, {}),
           "mixlora": ("mixlora", r, alpha, {"experts": n, "active": k})}
    for M in a.selections:
        out[f"remix M={M}"] = ("remix", r, alpha, {"experts": n, "active": k, "selections": M})
    return {name: spec for name, spec in out.items() if name in a.rows or a.rows == ["all"]}


def build(base, spec, seed):
    method, rank, alpha, opts = spec
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # adapter init
    wrap = adapt(model, method, rank, alpha, "lora", opts)
    return model, wrap(sft_loss)


def active_parameters(model, spec) -> int:
    """Parameters one token uses: k of the n LoRAs plus the router, or the whole LoRA."""
    method, rank, _, opts = spec
    if method == "lora":
        return trainable_parameters(model)
    layers = [m for m in model.modules() if hasattr(m, "router")]
    return sum(m.k * m.r * (m.in_features + m.out_features) + m.router.weight.numel() for m in layers)


def run_one(base, task, spec, seed, a) -> dict:
    model, loss_fn = build(base, spec, seed)
    cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup_steps=a.warmup, seed=seed, progress=False)
    res = train(model, loss_fn, train_batches(task, Tokenizer(), a.batch_size, seed + 10_000), cfg)
    return {"exact_match": evaluate(model, task), "final_loss": res.losses[-1],
            "seconds_per_step": res.seconds / max(1, res.steps),
            "trainable": trainable_parameters(model), "active": active_parameters(model, spec),
            "log": {key: [m[key] for m in res.metrics] for key in LOGGED if key in res.metrics[0]}}


def speed(base, task, specs, a) -> dict:
    """Median time of a training step (loss, backward, AdamW) and of an eval
    forward for every row, interleaved, as ratios to the first LoRA row.
    Each round runs every row's step twice and its forward twice and times
    the second of each (training repeats one kind of step), and each round
    starts at the next row, so that every row runs in every position
    equally often: a row timed right after another row's different work
    runs measurably slower (the two identical LoRA rows differed by about 5%
    when the reference always went first)."""
    batch = train_batches(task, Tokenizer(), a.batch_size, 999)(0)
    ids, mask = batch["input_ids"][:, :-1], batch["attention_mask"][:, :-1]
    built = {}
    for name, spec in specs.items():
        model, loss_fn = build(base, spec, 0)
        opt = make_optimizer(model, TrainConfig(lr=1e-4))  # the shared loop's AdamW (foreach)
        built[name] = (model, loss_fn, opt)
    step_t = {name: [] for name in specs}
    eval_t = {name: [] for name in specs}
    for rep in range(a.speed_reps + 2):
        names = list(built)
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotated
            model, loss_fn, opt = built[name]
            model.train()
            for _ in range(2):  # the second is timed
                t0 = time.perf_counter()
                loss, _ = loss_fn(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                t1 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                for _ in range(2):
                    t2 = time.perf_counter()
                    model(ids, mask)
                    t3 = time.perf_counter()
            if rep >= 2:  # two warm-up rounds
                step_t[name].append(t1 - t0)
                eval_t[name].append(t3 - t2)
    ref = next(iter(specs))  # the first row is the reference
    s0, e0 = statistics.median(step_t[ref]), statistics.median(eval_t[ref])
    return {name: {"step_ratio": statistics.median(step_t[name]) / s0,
                   "eval_ratio": statistics.median(eval_t[name]) / e0,
                   "step_ms": 1000 * statistics.median(step_t[name]), "eval_ms": 1000 * statistics.median(eval_t[name])}
            for name in specs}


def run(a) -> dict:
    torch.set_num_threads(a.threads)  # before any work: the thread count changes speed and last digits
    base, _ = load_or_pretrain(PretrainConfig(task="add", digits=a.base_digits, progress=False))
    task = Task(a.task, a.digits)
    specs = rows(a)
    out = {"settings": {**{k: v for k, v in vars(a).items() if k not in ("json", "txt", "plot")},
                        "threads": torch.get_num_threads(), "torch": torch.__version__},
           "base_exact_match": evaluate(base, task), "rows": {}}
    t0 = time.perf_counter()
    for seed in ([] if a.speed_only else a.seeds):
        for name, spec in specs.items():
            r = run_one(base, task, spec, seed, a)
            out["rows"].setdefault(name, []).append(r)
            print(f"seed {seed} {name:20s} exact-match {100 * r['exact_match']:5.1f}%  "
                  f"{r['seconds_per_step'] * 1000:.0f} ms/step  ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    out["speed"] = speed(base, task, specs, a) if a.speed_reps else {}
    if a.speed_width and a.speed_reps:  # the same rows on a wider, untrained TinyGPT: FLOPs outweigh per-op costs
        torch.manual_seed(0)
        wide = TinyGPT(GPTConfig(vocab_size=base.config.vocab_size, n_layer=base.config.n_layer,
                                 n_head=base.config.n_head, n_embd=a.speed_width))
        out["speed_wide"] = speed(wide, task, specs, a)
    out["seconds"] = time.perf_counter() - t0
    return out


def summarise(res: dict) -> str:
    a = res["settings"]
    lines = ["| row | exact-match % (mean ± sd) | per seed | trainable params | active params | s/step | "
             "step time vs LoRA (interleaved) | eval forward vs LoRA | "
             "final ESS of the weights (min / mean over layers) "
             "| final router ESS (min / mean) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, per_seed in res["rows"].items():
        em = [100 * s["exact_match"] for s in per_seed]
        sd = statistics.stdev(em) if len(em) > 1 else 0.0
        sp = res["speed"].get(name, {})

        def last(key):
            vals = [s["log"][key][-1] for s in per_seed if key in s["log"]]
            return f"{statistics.mean(vals):.2f}" if vals else ""
        ess = f"{last('ess_min')} / {last('ess_mean')}" if last("ess_min") else ""
        router = f"{last('router_ess_min')} / {last('router_ess_mean')}" if last("router_ess_min") else ""
        lines.append(f"| {name} | {statistics.mean(em):.1f} ± {sd:.1f} | {', '.join(f'{v:.1f}' for v in em)} | "
                     f"{per_seed[0]['trainable']:,} | {per_seed[0]['active']:,} | "
                     f"{statistics.mean(s['seconds_per_step'] for s in per_seed):.3f} | "
                     + (f"{sp['step_ratio']:.2f}x | {sp['eval_ratio']:.2f}x | " if sp else " |  | ") +
                     f"{ess} | {router} |")
    if res.get("speed_wide"):
        lines.append(f"| (speed at width {a['speed_width']}, untrained) | | | | | | | | | |")
        for name, sp in res["speed_wide"].items():
            lines.append(f"| {name} | | | | | | {sp['step_ratio']:.2f}x | {sp['eval_ratio']:.2f}x | | |")
    lines.append("")
    lines.append(f"{a['task']} {a['digits'] or ''} on the add {a['base_digits']}-digit base (base exact-match "
                 f"{100 * res['base_exact_match']:.1f}%); n={a['experts']}, k={a['active']}, r={a['rank']}, "
                 f"alpha {a.get('alpha', 2.0)} (omega = {a.get('alpha', 2.0) / (a['active'] * a['rank']):.3g}); "
                 f"{a['steps']} steps, batch {a['batch_size']}, lr {a['lr']}, seeds {a['seeds']}; "
                 f"{res['seconds']:.0f} s in all")
    return "\n".join(lines)


def speed_table(res: dict) -> str:
    """The speed ratios alone (a ``--speed-only`` run)."""
    a = res["settings"]
    lines = ["| row | width | step time vs LoRA r=kr | ... per selection (M) | eval forward vs LoRA | step ms | eval ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, width in (("speed", "base"), ("speed_wide", a["speed_width"])):
        for name, sp in res.get(key, {}).items():
            M = int(name.split("M=")[1]) if "M=" in name else 1
            lines.append(f"| {name} | {width} | {sp['step_ratio']:.2f}x | {sp['step_ratio'] / M:.2f} | "
                         f"{sp['eval_ratio']:.2f}x | {sp['step_ms']:.1f} | {sp['eval_ms']:.2f} |")
    threads = a.get("threads", 1)
    lines += ["", f"Interleaved medians of {a['speed_reps']} rounds, {threads} thread{'s' * (threads > 1)}, "
              f"batch {a['batch_size']} problems of "
              f"{a['task']} {a['digits']}; n={a['experts']}, k={a['active']}, r={a['rank']}; torch {a['torch']}"]
    return "\n".join(lines)


def runs_table(runs: list[dict]) -> str:
    """Several speed-only runs side by side (``--from-json a.json,b.json,...``):
    the speed ratios move with the machine's state, so one run is not enough."""
    names = [n for n in runs[0]["speed"] if n.startswith("remix")]
    lines = ["| run | threads | LoRA step ms | " + " | ".join(f"{n}: step per M | {n}: eval" for n in names) + " |",
             "|---:|---:|---:|" + "---:|" * (2 * len(names))]
    per = {n: [] for n in names}
    for i, res in enumerate(runs, 1):
        cells = []
        for n in names:
            sp, M = res["speed"][n], int(n.split("M=")[1])
            per[n].append(sp["step_ratio"] / M)
            cells += [f"{sp['step_ratio'] / M:.2f}", f"{sp['eval_ratio']:.2f}x"]
        lines.append(f"| {i} | {res['settings']['threads']} | {res['speed']['lora r=kr']['step_ms']:.1f} | "
                     + " | ".join(cells) + " |")
    lines.append("")
    for n, v in per.items():
        lines.append(f"{n}, step time per M: min {min(v):.2f}, median {statistics.median(v):.2f}, max {max(v):.2f} "
                     f"over {len(v)} runs")
    a = runs[0]["settings"]
    lines.append(f"Each run: interleaved medians of {a['speed_reps']} rounds at the base width, batch {a['batch_size']} "
                 f"problems of {a['task']} {a['digits']}; n={a['experts']}, k={a['active']}, r={a['rank']}")
    return "\n".join(lines)


def ess_over_steps(res: dict) -> str:
    """A markdown table of the seed-mean ESS at 13 points of training."""
    names = [n for n, per in res["rows"].items() if "ess_min" in per[0]["log"]]
    steps = len(res["rows"][names[0]][0]["log"]["ess_min"]) if names else 0
    every = max(1, steps // 12)
    head = "| step | " + " | ".join(f"{n}: ESS min / mean | {n}: router ESS min / mean" for n in names) + " |"
    lines = [head, "|---:|" + "---:|" * (2 * len(names))]
    for t in sorted(set(list(range(0, steps, every)) + [steps - 1])):
        cells = []
        for n in names:
            per = res["rows"][n]

            def m(key):
                return statistics.mean(s["log"][key][t] for s in per)
            cells += [f"{m('ess_min'):.2f} / {m('ess_mean'):.2f}",
                      f"{m('router_ess_min'):.2f} / {m('router_ess_mean'):.2f}"]
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for name, per in res["rows"].items():
        if "ess_min" not in per[0]["log"]:
            continue
        for ax, (lo, mean) in zip(axes, (("ess_min", "ess_mean"), ("router_ess_min", "router_ess_mean"))):
            steps = range(1, len(per[0]["log"][mean]) + 1)
            avg = [statistics.mean(v) for v in zip(*(s["log"][mean] for s in per))]
            low = [statistics.mean(v) for v in zip(*(s["log"][lo] for s in per))]
            line, = ax.plot(steps, avg, label=f"{name} (mean over layers)")
            ax.plot(steps, low, ls="--", color=line.get_color(), label=f"{name} (min over layers)")
    a = res["settings"]
    axes[0].set_title(f"ESS of the applied weights (k = {a['active']})", fontsize=10)
    axes[1].set_title(f"ESS of the router's q over all n = {a['experts']}", fontsize=10)
    axes[0].set_ylim(0.9, a["active"] + 0.1)  # from full collapse (1) to uniform weights over the k
    axes[1].set_ylim(0.9, a["experts"] + 0.1)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("effective support size")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    print(f"figure written to {path}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sub", help="fine-tuning task (default sub)")
    ap.add_argument("--digits", default="2", help="its operand digits (default 2)")
    ap.add_argument("--base-digits", default="2", help="digits of the addition base (default 2)")
    ap.add_argument("--experts", type=int, default=8, help="n: LoRAs per layer (default 8)")
    ap.add_argument("--active", type=int, default=2, help="k: active LoRAs per token (default 2)")
    ap.add_argument("--rank", type=int, default=4, help="r: rank of each LoRA (default 4; the LoRA rows use k r)")
    ap.add_argument("--selections", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4],
                    help="ReMix's M values, one row each (default 2,4)")
    ap.add_argument("--alpha", type=float, default=2.0,
                    help="alpha of the mixtures (omega = alpha/(k r)) and of the c=omega LoRA row (default 2)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    ap.add_argument("--batch-size", type=int, default=64, help="problems per step (default 64)")
    ap.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    ap.add_argument("--warmup", type=int, default=30, help="warmup steps (default 30)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                    help="seeds (default 0,1,2)")
    ap.add_argument("--rows", type=lambda s: s.split(","), default=["all"], help="rows to run (default all)")
    ap.add_argument("--speed-reps", type=int, default=15, help="interleaved timing rounds (default 15; 0: no timing)")
    ap.add_argument("--speed-width", type=int, default=256,
                    help="also time the rows on an untrained TinyGPT of this width (default 256; 0: skip)")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the interleaved speed ratios, no training (results in remix_vs_mixlora_speed.*)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, the project's default: on a machine shared with other "
                         "work, extra threads wait on each other)")
    ap.add_argument("--json", help="results JSON (default benchmarks/results/remix_vs_mixlora[_speed].json)")
    ap.add_argument("--txt", help="markdown tables (default benchmarks/results/remix_vs_mixlora[_speed].txt)")
    ap.add_argument("--plot", default=str(ROOT / "tutorials/figures/remix_ess.png"), help="ESS figure (PNG)")
    ap.add_argument("--from-json", metavar="FILE", help="re-print and re-plot saved results; no training. "
                    "Several --speed-only results, comma-separated: one table of the runs (results in "
                    "remix_vs_mixlora_speed_runs.*)")
    a = ap.parse_args(argv)
    if a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    if a.from_json and "," in a.from_json:  # several speed-only runs: one table of them all
        runs = [json.loads(Path(f).read_text()) for f in a.from_json.split(",")]
        if any(r["rows"] or not r.get("speed") for r in runs):
            ap.error("a comma-separated --from-json takes only --speed-only results")
        if any(set(r["speed"]) != set(runs[0]["speed"]) for r in runs):
            ap.error("a comma-separated --from-json takes runs of the same rows")
        text = runs_table(runs) + "\n"
        print(text)
        stem = ROOT / "benchmarks/results/remix_vs_mixlora_speed_runs"
        write_json(a.json or f"{stem}.json", {"runs": runs, "table": text})
        with atomic_write(a.txt or f"{stem}.txt") as f:
            f.write(text)
        return {"runs": runs}
    stem = ROOT / "benchmarks/results" / ("remix_vs_mixlora_speed" if a.speed_only else "remix_vs_mixlora")
    a.json, a.txt = a.json or f"{stem}.json", a.txt or f"{stem}.txt"
    res = json.loads(Path(a.from_json).read_text()) if a.from_json else run(a)
    if not res["rows"]:  # a speed-only run
        text = speed_table(res) + "\n"
        a.plot = None
    else:
        text = summarise(res) + "\n\nESS over training (seed mean; min / mean over layers)\n\n" + ess_over_steps(res) + "\n"
    print(text)
    if not a.from_json:
        write_json(a.json, {**res, "table": text})
        with atomic_write(a.txt) as f:
            f.write(text)
    if a.plot:
        plot(res, a.plot)
    return res


if __name__ == "__main__":
    main()

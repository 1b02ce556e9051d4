"""How many CPU threads should `pretrain` and `finetune` use?

Runs ``python -m lora_from_scratch pretrain`` and ``finetune`` with
``--threads 1, 2, 4``, each in a fresh process, in two conditions:

- idle: nothing else started by this script (on a shared machine other
  people's work may still be running; the load average before each run is
  recorded),
- busy: while one other process runs torch matrix products non-stop at
  torch's default thread count (one thread per core), as another user's
  training job would.

The order is interleaved (repeat 1: idle with threads 1, 2, 4, then busy
with 1, 2, 4; repeat 2: the same; ...) so that drifts in the machine's load hit every setting alike. Reported: the
median seconds the command reports (model build, training and the final
evaluation) and, as the number to read, its ratio to the 1-thread median of
the same condition. The sizes are cut down to keep the whole run short (see
the defaults): a 2-digit addition pretraining of --pretrain-steps steps and
a rank-8 LoRA fine-tune on 2-digit subtraction of --finetune-steps steps,
from the cached 2-digit base (trained once, untimed, if missing).

Usage: ``python benchmarks/threads.py [--threads 1,2,4] [--repeats 2]``
Writes benchmarks/results/threads.json and threads.txt (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_from_scratch.checkpoint import atomic_write, write_json

RESULTS = Path(__file__).resolve().parent / "results"
BUSY = ("import torch\n"
        "x = torch.randn(512, 512)\n"
        "while True:\n"
        "    x = torch.tanh(x @ x)\n")


def command(kind: str, threads: int, steps: int, out: Path) -> list[str]:
    cli = [sys.executable, "-m", "lora_from_scratch"]
    common = ["--device", "cpu", "--quiet", "--threads", str(threads), "--metrics-out", str(out)]
    if kind == "pretrain":
        return cli + ["pretrain", "--task", "add", "--digits", "2", "--steps", str(steps),
                      "--out", str(out.with_suffix(".pt"))] + common
    return cli + ["finetune", "--method", "lora", "--rank", "8", "--task", "sub", "--digits", "2",
                  "--base-task", "add", "--base-digits", "2", "--steps", str(steps)] + common


def run_once(kind: str, threads: int, steps: int, workdir: Path) -> dict:
    out = workdir / f"{kind}_{threads}.json"
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(command(kind, threads, steps, out), check=True, capture_output=True)
    wall = time.perf_counter() - t0
    m = json.loads(out.read_text())
    loss = m.get("final_loss")
    return {"kind": kind, "threads": threads, "seconds": m["seconds"], "wall": wall, "load_before": load,
            "test_exact_match": m["test_exact_match"], "final_loss": loss}


def table(runs: list[dict], threads: list[int]) -> str:
    lines = ["| command | condition | threads | seconds in the command (median, range) | ratio to 1 thread "
             "| exact-match (every repeat) |", "|---|---|---:|---:|---:|---|"]
    for kind in ("pretrain", "finetune"):
        for cond in ("idle", "busy"):
            base = None
            for t in threads:
                sel = [r for r in runs if r["kind"] == kind and r["condition"] == cond and r["threads"] == t]
                if not sel:
                    continue
                secs = [r["seconds"] for r in sel]
                med = statistics.median(secs)
                base = med if base is None else base  # the first thread count that ran
                accs = sorted({f"{r['test_exact_match']:.3f}" for r in sel})
                lines.append(f"| {kind} | {cond} | {t} | {med:.1f} ({min(secs):.1f}-{max(secs):.1f}) "
                             f"| {med / base:.2f}x | {', '.join(accs)} |")
    return "\n".join(lines) + "\n"


def save(a, threads: list[int], runs: list[dict], done: bool) -> None:
    """Write the JSON and the markdown table of the runs so far."""
    loads = [r["load_before"] for r in runs]
    header = (f"# threads: `pretrain` ({a.pretrain_steps} steps, 2-digit addition) and `finetune` "
              f"(rank-8 LoRA, {a.finetune_steps} steps, 2-digit subtraction)\n\n"
              f"{os.cpu_count()} CPU cores shared with other users' work (1-minute load average before "
              f"the runs: {min(loads):.1f} to {max(loads):.1f}); torch {torch.__version__}; "
              f"{a.repeats} interleaved repeats; busy = one more process doing torch matrix products "
              f"at torch's default thread count."
              + ("" if done else " PARTIAL: the run was stopped before every repeat finished.") + "\n\n")
    write_json(f"{a.out}.json", {"threads": threads, "repeats": a.repeats, "pretrain_steps": a.pretrain_steps,
                                 "finetune_steps": a.finetune_steps, "cpu_count": os.cpu_count(),
                                 "torch": torch.__version__, "complete": done, "runs": runs}, sort_keys=True)
    with atomic_write(f"{a.out}.txt") as f:
        f.write(header + table(runs, threads))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2,4", help="thread counts to compare, the first is the baseline "
                   "(default 1,2,4)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting and condition (default 2)")
    p.add_argument("--pretrain-steps", type=int, default=100, help="pretraining steps (default 100; the "
                   "recipe's 2-digit run is 800)")
    p.add_argument("--finetune-steps", type=int, default=50, help="LoRA steps (default 50; the CLI's is 600)")
    p.add_argument("--conditions", default="idle,busy", help="idle, busy or both (default idle,busy)")
    p.add_argument("--out", default=str(RESULTS / "threads"), help="results path without suffix "
                   "(default benchmarks/results/threads)")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    conditions = a.conditions.split(",")
    if a.repeats < 1 or any(t < 1 for t in threads) or not set(conditions) <= {"idle", "busy"}:
        p.error("--repeats and --threads must be positive; --conditions takes idle and/or busy")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_once("finetune", 1, 1, work)  # untimed: trains and caches the 2-digit base if it is missing
        for rep in range(a.repeats):
            for cond in conditions:
                busy = subprocess.Popen([sys.executable, "-c", BUSY]) if cond == "busy" else None
                try:
                    time.sleep(1.0 if busy else 0.0)
                    for kind in ("pretrain", "finetune"):
                        for t in threads:
                            steps = a.pretrain_steps if kind == "pretrain" else a.finetune_steps
                            r = {**run_once(kind, t, steps, work), "condition": cond, "repeat": rep}
                            runs.append(r)
                            print(f"repeat {rep} {cond:4} {kind:8} threads {t}: {r['seconds']:.1f} s "
                                  f"(load before {r['load_before']:.2f})", flush=True)
                            save(a, threads, runs, done=False)  # stop any time: what ran is kept
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
    save(a, threads, runs, done=True)
    print("\n" + table(runs, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())

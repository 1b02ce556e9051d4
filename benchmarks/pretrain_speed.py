"""How fast ``pretrain`` learns addition, and what the KV cache buys (issue 2).

Part 1 runs ``python -m lora_from_scratch pretrain --task add --digits N``
with its default settings for each N and seed, each in a fresh process, and
reports the test exact-match on the fixed 500-problem set, the seconds the
command reports (model build, training and final evaluation) and the wall
time of the whole process (Python and torch start-up included).
Targets (medians over the seeds): >= 99% exact-match within 15 s for N = 2
and 45 s for N = 3. The reference is minGPT's adder project, quoted in
issue 2 as reaching 99.8% after about 31 s (N = 2) and 90 s (N = 3) on the
same 2-core CPU.

Part 2 times batched greedy generation, 256 prompts, 16 new tokens, with
and without the KV cache, on an untrained default-size TinyGPT (untrained,
so no row stops early and every call writes all 16 tokens).

Usage: ``python benchmarks/pretrain_speed.py [--digits 2,3] [--seeds 0,1,2] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_from_scratch.model import GPTConfig, TinyGPT
from lora_from_scratch.recipes import PretrainConfig
from lora_from_scratch.tasks import Task
from lora_from_scratch.tokenizer import Tokenizer

TARGET_SECONDS = {2: 15.0, 3: 45.0}
MINGPT_SECONDS = {2: 31.0, 3: 90.0}  # quoted in issue 2, measured on this CPU type


def pretrain_once(digits: int, seed: int, workdir: Path, extra: list[str]) -> dict:
    out = workdir / f"m{digits}_{seed}.json"
    cmd = [sys.executable, "-m", "lora_from_scratch", "pretrain", "--task", "add", "--digits", str(digits),
           "--seed", str(seed), "--device", "cpu", "--quiet", "--out", str(workdir / f"b{digits}_{seed}.pt"),
           "--metrics-out", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    m = json.loads(out.read_text())
    return {"digits": digits, "seed": seed, "exact_match": m["test_exact_match"], "seconds": m["seconds"],
            "wall": wall, "steps": m["steps"]}


def generation_throughput(prompt_task: str, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    tok = Tokenizer()
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size)).eval()
    prompts = [tok.encode(p.prompt, bos=True) for p in Task(prompt_task, 2).test_set()[:256]]
    res = {"prompt_task": prompt_task, "prompt_tokens": statistics.mean(map(len, prompts))}
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            new = model.generate(prompts, 16, greedy=True, use_cache=use_cache)
            best = min(best, time.perf_counter() - t0)
        res["cache" if use_cache else "no_cache"] = new.numel() / best  # new tokens per second
    res["speedup"] = res["cache"] / res["no_cache"]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits", default="2,3", help="addition sizes to pretrain (default 2,3)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    ap.add_argument("--skip-pretrain", action="store_true", help="only time generation")
    ap.add_argument("--pos-init-std", type=float, help="pass this --pos-init-std to pretrain (an ablation)")
    ap.add_argument("--steps", type=int, help="pass this --steps to pretrain (default: its own default)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    a.extra = (["--pos-init-std", str(a.pos_init_std)] if a.pos_init_std is not None else []) \
        + (["--steps", str(a.steps)] if a.steps is not None else [])
    results = {"pretrain_args": a.extra, "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": [], "summary": []}
    if not a.skip_pretrain:
        with tempfile.TemporaryDirectory() as tmp:
            for d in map(int, a.digits.split(",")):
                for s in map(int, a.seeds.split(",")):
                    run = pretrain_once(d, s, Path(tmp), a.extra)
                    results["runs"].append(run)
                    print(f"add {d} digits, seed {s}: exact-match {run['exact_match']:.3f}, "
                          f"{run['seconds']:.1f} s in the command, {run['wall']:.1f} s wall", flush=True)
        print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}\n")
        print("| task | steps | exact-match (median, min) | seconds (median) | process wall (median) "
              "| target | minGPT adder |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for d in map(int, a.digits.split(",")):
            runs = [r for r in results["runs"] if r["digits"] == d]
            em = [r["exact_match"] for r in runs]
            row = {"digits": d, "steps": runs[0]["steps"], "median_exact_match": statistics.median(em),
                   "min_exact_match": min(em), "median_seconds": statistics.median(r["seconds"] for r in runs),
                   "median_wall": statistics.median(r["wall"] for r in runs)}
            results["summary"].append(row)
            target = f">= 99% in <= {TARGET_SECONDS[d]:.0f} s" if d in TARGET_SECONDS else "-"
            ref = f"99.8% in ~{MINGPT_SECONDS[d]:.0f} s" if d in MINGPT_SECONDS else "-"
            print(f"| add, {d} digits | {row['steps']} | {100 * row['median_exact_match']:.1f}%, "
                  f"{100 * row['min_exact_match']:.1f}% | {row['median_seconds']:.1f} | {row['median_wall']:.1f} "
                  f"| {target} | {ref} |")
    gens = [generation_throughput(t) for t in ("add", "wordprob")]
    results["generation"] = gens
    print("\ngreedy generation, batch 256, 16 new tokens, default TinyGPT (new tokens / s):\n")
    print("| prompts | mean prompt tokens | with KV cache | without | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for g in gens:
        print(f"| {g['prompt_task']} | {g['prompt_tokens']:.0f} | {g['cache']:,.0f} | {g['no_cache']:,.0f} "
              f"| {g['speedup']:.1f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

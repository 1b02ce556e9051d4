"""Speed of a LoRA layer against the frozen nn.Linear it wraps.

Forward + backward of 1024 tokens through one layer, at widths d = 256 and
1024 and ranks r = 8 and 64. The input requires grad, as inside a network,
so the frozen layer's backward computes dL/dx. Reports, as ratios to the
frozen ``nn.Linear`` measured in the same run:

- ``ours``: ``LoRALinear`` (training path, hand-written backward);
- ``autograd``: the same math composed from ``F.linear`` calls (what
  ``LoRALinear`` would cost without its custom backward);
- ``peft``: HF PEFT's LoRA layer, when ``peft`` is installed (optional,
  benchmark-only: ``pip install peft``);
- ``merged``: ``LoRALinear`` after ``merge()``, forward only, against the
  plain layer's forward;
- ``floor``: 1 + r (in + out) / (in * out), the extra forward FLOPs (the
  issue's yardstick), and ``fwd+bwd floor``: 1 + 3 r (in + out) / (2 in out),
  the extra FLOPs of what is timed. The frozen layer costs in*out per token
  forward and in*out backward (dL/dx only); LoRA adds r (in + out) forward
  and 2 r (in + out) backward (dL/dA, dL/dB, and dL/dx through A and B).

Each repeat times all variants back to back; the table gives the median
over the repeats of each variant's ratio to the plain layer in the same
repeat, so a machine that speeds up or slows down between repeats does not
bias the ratios. Usage: ``python benchmarks/adapter_speed.py
[--repeats 5] [--iters 20] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from lora_from_scratch.adapters import AdapterLayer
from lora_from_scratch.checkpoint import write_json
from lora_from_scratch.lora import LoRALinear


def time_fwd_bwd(layer, x, iters: int) -> float:
    g = torch.ones(x.shape[0], layer(x).shape[-1])
    for _ in range(3):  # warm up
        layer(x).backward(g)
    t0 = time.perf_counter()
    for _ in range(iters):
        layer(x).backward(g)
    return (time.perf_counter() - t0) / iters


@torch.no_grad()
def time_fwd(layer, x, iters: int) -> float:
    for _ in range(3):
        layer(x)
    t0 = time.perf_counter()
    for _ in range(iters):
        layer(x)
    return (time.perf_counter() - t0) / iters


class ComposedLoRA(nn.Module):
    """LoRALinear's math through plain autograd, for comparison."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.lora = lora

    def forward(self, x):
        return AdapterLayer.forward(self.lora, x)


def peft_layer(base: nn.Linear, r: int, alpha: float):
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        return None
    holder = nn.Module()
    holder.lin = base
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"]), holder)
    nn.init.normal_(holder.lin.lora_B["default"].weight, std=0.02)
    return holder.lin


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="median over this many repeats (default 7)")
    ap.add_argument("--iters", type=int, default=20, help="iterations per timing (default 20)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per batch (default 1024)")
    ap.add_argument("--dims", default="256,1024", help="widths d (default 256,1024)")
    ap.add_argument("--ranks", default="8,64", help="ranks r (default 8,64)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for d in map(int, a.dims.split(",")):
        for r in map(int, a.ranks.split(",")):
            plain = nn.Linear(d, d).requires_grad_(False)
            ours = LoRALinear(nn.Linear(d, d), r, alpha=16)
            ours.base.load_state_dict(plain.state_dict())
            nn.init.normal_(ours.lora_B, std=0.02)  # B != 0, as after training
            composed = ComposedLoRA(ours)
            peft = peft_layer(nn.Linear(d, d).requires_grad_(False), r, 16)
            x = torch.randn(a.tokens, d, requires_grad=True)
            # Each repeat times every variant back to back and keeps the ratios
            # to the plain layer of that same repeat; the median ratio over the
            # repeats is reported, so slow drifts of the machine cancel out.
            ratios = {k: [] for k in ("ours", "autograd", "peft", "merged")}
            plain_ms = []
            for _ in range(a.repeats):
                t_plain = time_fwd_bwd(plain, x, a.iters)
                plain_ms.append(1e3 * t_plain)
                ratios["ours"].append(time_fwd_bwd(ours, x, a.iters) / t_plain)
                ratios["autograd"].append(time_fwd_bwd(composed, x, a.iters) / t_plain)
                if peft is not None:
                    ratios["peft"].append(time_fwd_bwd(peft, x, a.iters) / t_plain)
                ours.merge()
                t_merged = time_fwd(ours, x, a.iters)
                ours.unmerge()
                ratios["merged"].append(t_merged / time_fwd(plain, x, a.iters))
            med = {k: statistics.median(v) if v else None for k, v in ratios.items()}
            row = {"d": d, "r": r, "plain_ms": statistics.median(plain_ms), **med,
                   "floor": 1 + r * (d + d) / (d * d), "floor_fwd_bwd": 1 + 3 * r * (d + d) / (2 * d * d)}
            rows.append(row)
    print(f"forward+backward of {a.tokens} tokens, time / frozen nn.Linear (median of {a.repeats} repeats), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| d | r | nn.Linear ms | LoRALinear | autograd LoRA | HF PEFT | merged (fwd) | FLOP floor (fwd) "
          "| FLOP floor (fwd+bwd) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in rows:
        peft_s = f"{w['peft']:.3f}x" if w["peft"] is not None else "not installed"
        print(f"| {w['d']} | {w['r']} | {w['plain_ms']:.2f} | {w['ours']:.3f}x | {w['autograd']:.3f}x | {peft_s} "
              f"| {w['merged']:.3f}x | {w['floor']:.3f}x | {w['floor_fwd_bwd']:.3f}x |")
    if a.json:
        write_json(a.json, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()

"""Draw the tutorials' figures from the code: ``python tutorials/make_figures.py``.

    lora_diagram.png     the LoRA layer with its shapes (tutorial 01)
    nested.png           nested truncation: which components rank b uses and trains (tutorial 02)
    p_vector.png         MatryoshkaLoRA's P as stacked bars of c(s) (tutorial 03)
    loss_curves_00.png   pretraining 2-digit addition with the recipe (tutorial 00)
    loss_curves_01.png   LoRA fine-tunes of subtraction at ranks 1, 2, 8 (tutorial 01)

Everything is computed by the library (``matryoshka_P``, ``train``,
``adapt``) on one CPU thread with fixed seeds, so a rerun on the same
machine and torch version redraws the same pictures; the loss curves may
move slightly on another machine. matplotlib is needed here only
(``pip install -e ".[plots]"``); the library and its tests never import it.
The two loss figures train (about 30 s on one core); ``--only`` picks some.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

FIGURES = Path(__file__).resolve().parent / "figures"
NAMES = ("lora_diagram", "nested", "p_vector", "loss_curves_00", "loss_curves_01")
FROZEN, TRAINED, USED, UNUSED = "#b0b0b0", "#d95f02", "#fdb863", "#f7f7f7"


def _box(ax, x, y, w, h, color, label=None, **text):
    from matplotlib.patches import Rectangle
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", linewidth=1))
    if label:
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", **text)


def _arrow(ax, start, end):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", linewidth=1.2))


def lora_diagram(plt):
    """y = W x + b + c(r) B A x for a 64 -> 64 projection at r = 8, drawn to scale."""
    d_in, d_out, r = 64, 64, 8
    u = 1 / 16  # drawing units per matrix row or column
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    _box(ax, 0, 2.2, 0.3, d_in * u, "white")
    ax.text(0.15, 2.0, f"x\n({d_in},)", ha="center", va="top")
    _box(ax, 1.2, 4.0, d_in * u, d_out * u, FROZEN, f"W\n(out, in) = ({d_out}, {d_in})\nfrozen")
    _box(ax, 1.2, 1.6, d_in * u, r * u, TRAINED)
    ax.text(1.2 + d_in * u / 2, 1.45, f"A  (r, in) = ({r}, {d_in})", ha="center", va="top")
    _box(ax, 6.2, 0.0, r * u, d_out * u, TRAINED)
    ax.text(6.2 + r * u + 0.1, 1.6, f"B\n(out, r)\n= ({d_out}, {r})", ha="left", va="center")
    ax.text(5.7, 2.0, "A x: (r,)", ha="center", va="bottom", fontsize=9)
    ax.text(7.9, 0.3, "× c(r) = α/r", ha="center", fontsize=11)
    ax.add_patch(plt.Circle((8.6, 4.2), 0.3, facecolor="white", edgecolor="black"))
    ax.text(8.6, 4.2, "+", ha="center", va="center", fontsize=16)
    _box(ax, 9.6, 2.2, 0.3, d_out * u, "white")
    ax.text(9.75, 2.0, f"y\n({d_out},)", ha="center", va="top")
    _arrow(ax, (0.35, 4.6), (1.15, 6.0))
    _arrow(ax, (0.35, 3.6), (1.15, 1.85))
    _arrow(ax, (5.25, 1.85), (6.15, 1.85))
    _arrow(ax, (5.25, 6.0), (8.35, 4.45))
    _arrow(ax, (6.45, 4.05), (8.35, 4.05))
    _arrow(ax, (8.9, 4.2), (9.55, 4.2))
    ax.text(3.2, 8.6, "y = W x + b + c(r) · B A x", ha="center", fontsize=13)
    ax.text(9.9, -0.3, f"trained: r(in + out) = {r * (d_in + d_out):,} numbers; W has {d_in * d_out:,}\n"
            "B starts at 0, A random: at step 0 the layer equals the base", ha="right", va="top", fontsize=9)
    ax.set_xlim(-0.3, 10.3)
    ax.set_ylim(-1.2, 9.0)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig


def nested(plt):
    """Components used and trained at rank b, in frozen and non-frozen DyLoRA."""
    R, d = 8, 12
    fig, axes = plt.subplots(1, 3, figsize=(10, 4))
    for ax, b in zip(axes, (1, 3, 8)):
        for i in range(R):  # component i+1: row i of A, column i of B
            color = TRAINED if i == b - 1 else USED if i < b else UNUSED
            _box(ax, 0, R - 1 - i, d, 1, color)  # A: (R, in), row 0 on top
            _box(ax, d + 1.5 + i, -d - 1.5, 1, d, color)  # B: (out, R)
            ax.text(-0.4, R - 0.5 - i, str(i + 1), ha="right", va="center", fontsize=8)
        ax.text(d / 2, R + 0.4, "A (R, in)", ha="center")
        ax.text(d + 1.0, -d / 2 - 1.5, "B\n(out, R)", ha="right", va="center")
        ax.set_title(f"rank b = {b}: uses components 1..{b}", fontsize=11)
        ax.set_xlim(-1.5, d + R + 2.5)
        ax.set_ylim(-d - 2.0, R + 1.5)
        ax.set_aspect("equal")
        ax.axis("off")
    from matplotlib.patches import Patch
    fig.legend(handles=[Patch(facecolor=TRAINED, edgecolor="black", label="component b: trained in both modes"),
                        Patch(facecolor=USED, edgecolor="black", label="1..b-1: used; trained only when non-frozen"),
                        Patch(facecolor=UNUSED, edgecolor="black", label="b+1..R: not used at rank b")],
               loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle("DyLoRA at maximum rank R = 8: the rank-b update is c(b) B[:, :b] A[:b]")
    return fig


def p_vector(plt):
    """P_i = sum of c(s) over training ranks s >= i, as stacked bars (R = 8, S = {1, 2, 4, 8}, c(s) = 1/s)."""
    from lora_from_scratch.lora import lora_scale
    from lora_from_scratch.matryoshka import matryoshka_P
    R, S = 8, [1, 2, 4, 8]
    P = matryoshka_P(R, S, "lora", alpha=1.0)
    colors = dict(zip(S, ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    bottom = torch.zeros(R)
    for s in S:  # the nested LoRA of rank s adds c(s) to components 1..s
        height = torch.tensor([lora_scale(s, 1.0, "lora") if i < s else 0.0 for i in range(R)])
        ax.bar(range(1, R + 1), height, bottom=bottom, color=colors[s], edgecolor="black",
               label=f"s = {s}: c(s) = 1/{s}")
        bottom += height
    assert torch.allclose(bottom, P)  # the stacks are exactly matryoshka_P
    for i, p in enumerate(P.tolist(), 1):
        ax.text(i, p + 0.03, f"{p:.3f}", ha="center", fontsize=9)
    ax.set_xlabel("component i (row i of A, column i of B)")
    ax.set_ylabel("P_i")
    ax.set_title("P_i = sum over s in S, s >= i, of c(s)   (R = 8, S = {1, 2, 4, 8}, c(s) = α/s, α = 1)")
    ax.legend(title="nested LoRA of rank s", fontsize=9)
    ax.set_xticks(range(1, R + 1))
    return fig


def _smooth(values, k=20):
    out, acc = [], 0.0
    for i, v in enumerate(values):  # running mean over the last k steps
        acc += v - (values[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def loss_curves_00(plt):
    """The pretraining recipe on 2-digit addition: loss per step and test exact-match every 100 steps."""
    from lora_from_scratch.data import train_batches
    from lora_from_scratch.model import GPTConfig, TinyGPT
    from lora_from_scratch.recipes import PretrainConfig
    from lora_from_scratch.tasks import Task
    from lora_from_scratch.tokenizer import Tokenizer
    from lora_from_scratch.train import TrainConfig, evaluate, sft_loss, train
    cfg = PretrainConfig(task="add", digits=2, progress=False)  # the recipe's settings, as `pretrain` uses them
    tok, task = Tokenizer(), Task(cfg.task, cfg.digits)
    torch.manual_seed(cfg.seed)
    model = TinyGPT(GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, pos_init_std=cfg.pos_init_std))
    res = train(model, sft_loss, train_batches(task, tok, cfg.batch_size, cfg.seed),
                TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip,
                            eval_every=100, seed=cfg.seed, progress=False),
                eval_fn=lambda m: {"test_exact_match": evaluate(m, task)})
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.plot(res.losses, color="#bbbbbb", linewidth=0.8, label="loss per step")
    ax.plot(_smooth(res.losses), color="black", label="mean of the last 20 steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax2 = ax.twinx()
    steps, accs = zip(*[(s, 100 * m["test_exact_match"]) for s, m in res.evals])
    ax2.plot(steps, accs, "o-", color=TRAINED, label="test exact-match")
    ax2.set_ylabel("test exact-match (%)", color=TRAINED)
    ax2.set_ylim(-2, 102)
    ax.set_title(f"pretraining TinyGPT on 2-digit addition ({cfg.n_layer} layers, width {cfg.n_embd}, "
                 f"batch {cfg.batch_size}, seed {cfg.seed})", fontsize=10)
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.6), fontsize=9)
    return fig


def loss_curves_01(plt):
    """Rank-1, 2 and 8 LoRA on the cached 2-digit addition base, learning 2-digit subtraction."""
    import copy

    from lora_from_scratch.adapters import trainable_parameters
    from lora_from_scratch.data import train_batches
    from lora_from_scratch.recipes import PretrainConfig, adapt, load_or_pretrain
    from lora_from_scratch.tasks import Task
    from lora_from_scratch.tokenizer import Tokenizer
    from lora_from_scratch.train import TrainConfig, evaluate, sft_loss, train
    base, _ = load_or_pretrain(PretrainConfig(task="add", digits=2, progress=False))
    tok, task = Tokenizer(), Task("sub", 2)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for r, color in zip((1, 2, 8), ("#7570b3", "#1b9e77", TRAINED)):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        wrap = adapt(model, "lora", r, 2.0 * r, "lora")
        res = train(model, wrap(sft_loss), train_batches(task, tok, 128, seed=0),
                    TrainConfig(steps=300, lr=3e-3, warmup_steps=30, seed=0, progress=False))
        acc = evaluate(model, task)
        ax.plot(_smooth(res.losses), color=color, label=f"rank {r} ({trainable_parameters(model):,} trained "
                f"numbers): test exact-match {100 * acc:.0f}% after 300 steps")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of the last 20 steps)")
    ax.set_title("LoRA on every linear layer of the 2-digit addition base, learning subtraction "
                 "(alpha = 2r, lr 3e-3, seed 0)", fontsize=10)
    ax.legend(fontsize=9)
    return fig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated figure names (default: all of " + ", ".join(NAMES) + ")")
    p.add_argument("--out", default=str(FIGURES), help="folder to write the PNGs into (default tutorials/figures)")
    a = p.parse_args(argv)
    names = a.only.split(",") if a.only else list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        p.error(f"unknown figure(s) {unknown}; expected names from {NAMES}")
    from lora_from_scratch.checkpoint import pyplot, save_figure
    plt = pyplot()
    if plt is None:
        return 0
    torch.set_num_threads(1)  # the same numbers on every run of this machine
    plt.rcParams.update({"svg.hashsalt": "lora", "font.size": 10})
    for name in names:
        fig = globals()[name](plt)
        fig.tight_layout()
        path = Path(a.out) / f"{name}.png"
        save_figure(fig, path, dpi=110, metadata={"Software": None})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

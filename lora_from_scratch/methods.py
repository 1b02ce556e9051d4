"""The one table of fine-tuning methods: ``--method NAME`` -> how to build it.

Every adapter method plugs into the recipes (``finetune``, ``rl``) and the
CLI through one ``AdapterMethod`` entry in ``METHODS``, so neither grows a
branch per method. An entry says:

- how to build the adapter for one ``nn.Linear`` from the settings every
  method shares (rank, alpha, scale rule) and the method's own options;
- the method's own options: a small dataclass that lives next to its layer
  (``DyLoRAOptions`` in dylora.py, ...), one field per setting, each made with
  ``option(default, help)``. The CLI turns every field into a flag
  (``--train-ranks``), listed under the method's name in ``--help``;
- how the method changes a training step, if it does: ``wrap_loss`` wraps any
  objective (DyLoRA draws a rank per step), so adapters and objectives compose;
- how it is evaluated: ``sub_ranks`` (also score every truncation to rank r'),
  and ``extra_metrics`` (anything else worth reporting after training).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from .dylora import DyLoRALinear, DyLoRAOptions, with_rank_sampling
from .gralora import GraLoRALinear, GraLoRAOptions
from .lora import SCALE_RULES, LoRALinear
from .matryoshka import MatryoshkaLoRALinear, MatryoshkaOptions
from .mixlora import MixLoRALinear, MixLoRAOptions, with_balance_loss
from .mixture import per_layer_routing
from .remix import ReMixLinear, ReMixOptions, rloo_loss
from .train import evaluate
from .validate import check_choice, check_float, check_int, check_ranks


@dataclass
class NoOptions:
    """A method without settings of its own."""


@dataclass(frozen=True)
class AdapterMethod:
    name: str  # the --method name
    summary: str  # one line for --help
    # build(rank, alpha, scale, options) -> make_adapter(linear) -> AdapterLayer
    build: Callable
    options: type = NoOptions  # dataclass of the method's own settings (fields made with option())
    wrap_loss: Callable | None = None  # (loss_fn, options) -> loss_fn: how a training step differs
    sub_ranks: bool = False  # evaluate every truncation to rank r' <= R after training
    extra_metrics: Callable | None = None  # (model, task, options) -> dict, run before sub-rank evaluation
    default_scale: str = "lora"  # scale rule c(r) when none is given
    default_alpha: Callable = lambda rank: 2.0 * rank  # alpha when none is given

    def make_options(self, given: dict | None = None):
        """The options dataclass filled from ``given``; a key the method does
        not have is an error that lists the ones it has."""
        given = dict(given or {})
        known = {f.name for f in fields(self.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {unknown}; "
                             f"its options are {sorted(known) or 'none'}")
        return self.options(**given)

    def resolve(self, rank, alpha, scale, options: dict | None = None):
        """The settings every method shares, checked and with the method's
        defaults filled in: (rank, alpha, scale, options dataclass). Both the
        fine-tuning and the RL recipe configure adapters through here."""
        rank = check_int("rank", rank, 1)
        scale = self.default_scale if scale is None else scale
        check_choice("scale", scale, SCALE_RULES)
        if scale == "none" and alpha is not None:  # c(r) = 1: an alpha would be recorded, not used
            raise ValueError(f"alpha={alpha!r} does not apply with scale='none' (c(r) = 1); leave alpha None")
        if alpha is None and scale != "none":
            alpha = self.default_alpha(rank)
        if alpha is not None:
            alpha = check_float("alpha", alpha, positive=True)
        opts = self.make_options(options)  # an option the method does not have is an error
        for name, value in vars(opts).items():  # a set of ranks (train_ranks) must fit the rank
            if name.endswith("ranks") and value is not None:
                check_ranks(name, value, 1, rank)
        return rank, alpha, scale, opts


def _lora(rank, alpha, scale, opts):
    return lambda lin: LoRALinear(lin, rank, alpha, scale=scale)


def _dylora(rank, alpha, scale, opts):
    return lambda lin: DyLoRALinear(lin, rank, alpha, frozen=not opts.unfrozen, ranks=opts.train_ranks, scale=scale)


def _matryoshka(rank, alpha, scale, opts):
    return lambda lin: MatryoshkaLoRALinear(lin, rank, alpha, train_ranks=opts.train_ranks, scale=scale)


def _gralora(rank, alpha, scale, opts):
    return lambda lin: GraLoRALinear(lin, rank, alpha, k=opts.k, hybrid_r=opts.hybrid_r, scale=scale)


def _mixture(layer):
    def build(rank, alpha, scale, opts):
        if scale != "lora":  # the mixtures' scale is omega, set by --omega
            raise ValueError(f"--scale does not apply to the LoRA mixtures (got {scale!r}); "
                             "their weight is set by --omega lora|rslora")
        return lambda lin: layer(lin, opts.experts, opts.active, rank, omega=opts.omega, alpha=alpha)
    return build


def _routing(model, task, opts) -> dict:
    # each mixture layer's ESS and largest weight, from the last training step
    return {"routing_by_layer": per_layer_routing(model)}


def _p_forward(model, task, opts) -> dict:
    # the training forward B diag(P) A, to compare with the sub-ranks (a fresh layer is at rank None)
    return {"p_forward_exact_match": evaluate(model, task)}


METHODS: dict[str, AdapterMethod] = {m.name: m for m in (
    AdapterMethod("lora", "LoRA: W + c(R) B A", _lora, sub_ranks=True),
    AdapterMethod("dylora", "DyLoRA: one rank b drawn per step, every rank usable after training", _dylora,
                  options=DyLoRAOptions, wrap_loss=lambda loss_fn, opts: with_rank_sampling(loss_fn),
                  sub_ranks=True),
    # Scale default: the reference code's c(s) = 1/sqrt(s) (rsLoRA rule, alpha 1). On our toy a larger
    # scale (alpha = 2 sqrt(R)) did no better for the sub-ranks (benchmarks/rank_curves.py, tutorial 03).
    AdapterMethod("matryoshka", "MatryoshkaLoRA: all nested ranks trained at once through a fixed P "
                  "(default scale as its reference code: rslora, alpha 1, i.e. c(s) = 1/sqrt(s))",
                  _matryoshka, options=MatryoshkaOptions, sub_ranks=True, extra_metrics=_p_forward,
                  default_scale="rslora", default_alpha=lambda rank: 1.0),
    AdapterMethod("gralora", "GraLoRA: a k x k grid of blocks, each with its own rank-R/k LoRA "
                  "(+ a rank hybrid_r LoRA)", _gralora, options=GraLoRAOptions),
    AdapterMethod("remix", "ReMix: k of n LoRAs per token at a constant weight, router trained by RLOO",
                  _mixture(ReMixLinear), options=ReMixOptions,
                  wrap_loss=lambda loss_fn, opts: rloo_loss(loss_fn, opts.selections),
                  extra_metrics=_routing, default_alpha=lambda rank: 2.0),
    AdapterMethod("mixlora", "MixLoRA-style learned router: top-k of n LoRAs weighted by the router, "
                  "plus a load-balance loss", _mixture(MixLoRALinear), options=MixLoRAOptions,
                  wrap_loss=lambda loss_fn, opts: with_balance_loss(loss_fn, opts.balance),
                  extra_metrics=_routing, default_alpha=lambda rank: 2.0),
)}


def get_method(name: str) -> AdapterMethod:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def option_flags(method: AdapterMethod) -> list[tuple[str, str, object, str, Callable | None]]:
    """(field, flag, default, help, parse) for every option of ``method``."""
    out = []
    for f in fields(method.options):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        out.append((f.name, flag, f.default, meta.get("help", ""), meta.get("parse")))
    return out

"""What every adapter shares: the layer contract and putting adapters into a model.

An adapter wraps one frozen ``nn.Linear`` (``base``, weight ``W`` of shape
(out, in)) and adds a learned change to its output. The contract, kept from
HF PEFT so the ideas and the weights carry over:

- ``delta_weight()``: the (out, in) matrix the adapter adds to ``W``;
- ``merge()``: fold it into ``W`` (inference then costs a plain linear
  layer), ``unmerge()``: take it out again; both are idempotent;
- ``forward(x)``: ``base(x)`` plus the adapter's contribution.

A subclass defines ``delta_weight`` and ``adapter_output(x, y)``, which adds
its contribution to the base output ``y``.

The model-level helpers: ``add_adapters`` (swap named linears for adapters
and freeze everything else), ``adapters_disabled`` (the base model, e.g. as
GRPO's reference policy, without a second copy of the weights),
``merge_adapters``/``unmerge_adapters``, ``trainable_parameters`` and saving
and loading the adapter weights alone.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import MISSING, field
from typing import Callable

import torch
import torch.nn as nn

from .checkpoint import atomic_save, check_finite, jsonable, safe_load
from .validate import check_bool, check_names


class AdapterLayer(nn.Module):
    """Base class: a frozen ``nn.Linear`` plus a trainable change."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear layers, got {type(base).__name__}")
        self.base = base
        base.requires_grad_(False)  # the pretrained weight never trains
        self.merged = False  # True while delta_weight() is folded into base.weight
        self.disabled = False  # True inside adapters_disabled(): act as the base layer

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:  # (out, in)
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base output) plus this adapter's contribution for ``x``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:  # merged: base.weight already holds the change
            return y
        return self.adapter_output(x, y)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def adapter_config(self) -> dict:
        """What, besides the weights, defines the adapter's function (saved
        with the weights and checked on load)."""
        return {"type": type(self).__name__}

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters (not the base layer's)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def add_adapters(model: nn.Module, make_adapter, targets="all-linear") -> list[str]:
    """Replace the targeted ``nn.Linear`` modules with ``make_adapter(linear)``
    and freeze every other parameter of ``model``.

    ``targets``: ``"all-linear"``, one name, or a list of names. A name matches
    a module's full dotted name (``blocks.0.attn.q_proj``) or its last part
    (``q_proj``). Returns the full names of the replaced modules.
    """
    if adapter_layers(model):
        raise ValueError("this model already has adapters; add them to a fresh base model")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(targets, str):
        targets = None if targets == "all-linear" else [targets]
    if targets is not None:
        targets = check_names("targets", targets)
        if not targets:
            raise ValueError("targets is empty; give names such as ('q_proj', 'v_proj') or 'all-linear'")
        unmatched = [t for t in targets if not any(t == n or t == n.rsplit(".", 1)[-1] for n in linears)]
        if unmatched:
            short = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"target(s) {unmatched} match no nn.Linear in the model; "
                             f"available names: {short} (or full names like {next(iter(linears), '?')!r}, "
                             "or 'all-linear')")
    chosen = [n for n in linears if targets is None or any(t == n or t == n.rsplit(".", 1)[-1] for t in targets)]
    # Build every adapter before swapping any in, so a bad rank for one layer
    # leaves the model as it was (building freezes each wrapped layer: undo it)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        adapters = {name: make_adapter(linears[name]) for name in chosen}
        for adapter in adapters.values():
            if not isinstance(adapter, AdapterLayer):
                raise TypeError(f"make_adapter must return an AdapterLayer, got {type(adapter).__name__}")
    except BaseException:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)  # freeze everything; the adapters, attached next, keep their own flags
    for name, adapter in adapters.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, adapter)
    return chosen


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside this block the model computes its base function (exactly when
    unmerged; to float rounding when the adapters were merged, since
    unmerging subtracts what merging added). Blocks may nest."""
    layers = [m for _, m in adapter_layers(model)]
    before = [(m.merged, m.disabled) for m in layers]
    for m in layers:
        m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m, (merged, disabled) in zip(layers, before):
            m.disabled = disabled
            if merged:
                m.merge()


def merge_adapters(model: nn.Module) -> None:
    for _, m in adapter_layers(model):
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, m in adapter_layers(model):
        m.unmerge()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, keyed like PEFT: ``blocks.0.attn.q_proj.lora_A``."""
    return {f"{n}.{k}": p.detach().cpu().clone() for n, m in adapter_layers(model)
            for k, p in m.adapter_parameters().items()}


def adapter_configs(model: nn.Module) -> dict:
    """``adapter_config()`` of every adapter (its type, rank, alpha, scale
    rule...), as JSON would store it: saved with adapter weights and with
    training checkpoints, so a load or a resume can refuse a different setup
    whose parameters happen to have the same names and shapes."""
    return jsonable({n: m.adapter_config() for n, m in adapter_layers(model)})


def base_signature(model: nn.Module) -> dict[str, list[float]]:
    """Three numbers per tensor of the model that is not an adapter parameter
    (its sum, its sum of squares and a fixed weighted sum that notices
    reordering): enough to tell one base model from another, yet tolerant of
    the float rounding that a merge followed by an unmerge leaves behind,
    which an exact hash would not be. Merged layers count with their update
    subtracted, as ``unmerge`` would leave them."""
    layers = adapter_layers(model)
    own = {f"{n}.{k}" for n, m in layers for k in m.adapter_parameters()}
    state = dict(model.state_dict())
    with torch.no_grad():
        for n, m in layers:
            if m.merged:  # base.weight holds W + delta: sign W, without touching the model
                state[f"{n}.base.weight"] = m.base.weight - m.delta_weight().to(m.base.weight.dtype)
    sig = {}
    for k, t in state.items():
        if k in own or not t.is_floating_point():
            continue
        v = t.detach().double().flatten().cpu()
        w = torch.cos(torch.arange(v.numel(), dtype=torch.float64))
        # "q_proj.base.weight" and a plain "q_proj.weight" are the same weight
        sig[k.replace(".base.", ".")] = [v.sum().item(), (v * v).sum().item(), (v * w).sum().item()]
    return sig


def _base_differs(saved: dict, model: nn.Module) -> str | None:
    """None when the model's base matches a saved signature to float
    rounding, else what differs. The tolerance follows the model's dtype:
    rounding each number of a tensor w by a relative eps, with random signs,
    moves its sums by about eps * ||w|| and its sum of squares by about
    2 eps ||w||^2; we allow 50 times that. Two different bases differ in
    their sums by about ||w||, so even in bfloat16 they are told apart."""
    own = base_signature(model)
    if saved.keys() != own.keys():
        return f"its tensors {sorted(saved.keys() ^ own.keys())[:4]}"
    dtypes = {k.replace(".base.", "."): t.dtype for k, t in model.state_dict().items()}
    for k, (s_sum, s_sq, s_w) in saved.items():
        o_sum, o_sq, o_w = own[k]
        tol = 50 * torch.finfo(dtypes[k]).eps * max(s_sq, o_sq) ** 0.5 + 1e-12  # 50 eps ||w||
        if abs(s_sum - o_sum) > tol or abs(s_w - o_w) > tol or abs(s_sq - o_sq) > 2 * tol * max(s_sq, o_sq) ** 0.5:
            return k
    return None


def save_adapters(model: nn.Module, path, **meta) -> None:
    """Write the adapter weights, their settings, a fingerprint of the base
    model and any JSON-able ``meta``, atomically."""
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("the model has no adapters to save")
    check_finite(state, f"not saving {path}")
    atomic_save({"kind": "adapters", "state": state, "configs": adapter_configs(model),
                 "base": base_signature(model), "meta": meta}, path)


def load_adapters(model: nn.Module, path, check_base: bool = True) -> dict:
    """Load weights written by ``save_adapters`` into a model that already has
    adapters of the same kind and settings; returns the saved ``meta``.
    With ``check_base``, the model's base weights must be the ones the
    adapters were saved with (pass False to move adapters to another base
    on purpose)."""
    check_base = check_bool("check_base", check_base)
    ckpt = safe_load(path, "adapter file")
    if ckpt.get("kind") != "adapters" or not isinstance(ckpt.get("state"), dict):
        raise ValueError(f"{path} is not an adapter file (keys: {sorted(ckpt)})")
    layers = dict(adapter_layers(model))
    if any(m.merged for m in layers.values()):
        raise ValueError("unmerge the adapters before loading new weights into them")
    configs = adapter_configs(model)
    for name, saved in ckpt.get("configs", {}).items():
        own = configs.get(name)
        if own is not None and own != saved:
            raise ValueError(f"{path}: adapter {name} was saved as {saved}, this model's is {own}")
    own = {f"{n}.{k}": p for n, m in adapter_layers(model) for k, p in m.adapter_parameters().items()}
    state = ckpt["state"]
    if set(own) != set(state):
        raise ValueError(f"{path} does not fit this model's adapters: missing {sorted(set(own) - set(state))[:4]}, "
                         f"unexpected {sorted(set(state) - set(own))[:4]}")
    for k, p in own.items():
        if not torch.is_tensor(state[k]) or p.shape != state[k].shape:
            found = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
            raise ValueError(f"{path}: {k} is {found}, the model's adapter has shape {tuple(p.shape)}")
    check_finite(state, f"{path} is not a usable adapter file", ValueError)
    differs = _base_differs(ckpt["base"], model) if check_base and ckpt.get("base") else None
    if differs:
        raise ValueError(f"{path} was saved on another base model ({differs} differs from this model's); "
                         "pass check_base=False to load it anyway")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])
    return ckpt.get("meta", {})


# ----- method options -------------------------------------------------------
def option(default=MISSING, help: str = "", flag: str | None = None, parse: Callable | None = None):
    """A field of a method's options dataclass: its default, a one-line help
    (shown by ``--help``), and optionally the CLI flag (default: the field's
    name, ``train_ranks`` -> ``--train-ranks``) and a parser for the flag's
    text (default: the type of the default; bools become on/off switches)."""
    return field(default=default, metadata={"help": help, "flag": flag, "parse": parse})


def int_list(text: str) -> tuple[int, ...]:
    """A flag's text "1,2,4" as (1, 2, 4)."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 1,2,4, got {text!r}") from None

"""Saving and loading files safely.

Writes go to a temporary file in the same folder and are renamed over the
target, so a crash never leaves a half-written checkpoint. Loads use
``weights_only=True``: a checkpoint can hold tensors, numbers, strings, lists
and dicts, never arbitrary pickled code.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from .model import GPTConfig, TinyGPT


def jsonable(d: dict) -> dict:
    """A copy of ``d`` as JSON would store it (tuples become lists), safe to
    put in a checkpoint that is loaded with ``weights_only=True``."""
    return json.loads(json.dumps(d, default=list))


@contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside ``path`` for writing; on success it is
    flushed to disk and renamed over ``path``, on any error removed. Every
    file this project writes goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` through a temp file and a rename."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def write_json(path, obj, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def safe_load(path, what: str = "checkpoint") -> dict:
    """Load a dict saved by ``atomic_save``, with clear errors for a missing
    or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        raise ValueError(f"{path} is not a readable {what}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a {what}: expected a dict, found {type(obj).__name__}")
    return obj


def load_state_strict(module: torch.nn.Module, state: dict, source) -> None:
    """``load_state_dict`` that names every missing, unexpected or
    wrongly-shaped tensor instead of failing half way."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if shapes:
            parts.append("wrong shape " + "; ".join(shapes[:5]))
        raise ValueError(f"{source} does not fit this model: " + ", ".join(parts))
    module.load_state_dict(state)


def save_model(model: TinyGPT, path, **meta) -> None:
    """Save a TinyGPT with its config and any JSON-able metadata (task, metrics)."""
    atomic_save({"kind": "tinygpt", "config": asdict(model.config),
                 "model": model.state_dict(), "meta": meta}, path)


def load_model(path, device="cpu") -> tuple[TinyGPT, dict]:
    """Load a model saved by ``save_model``; returns (model, meta)."""
    ckpt = safe_load(path, "model checkpoint")
    if ckpt.get("kind") != "tinygpt" or "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a TinyGPT checkpoint (keys: {sorted(ckpt)})")
    try:
        cfg = GPTConfig(**ckpt["config"])
    except TypeError as e:
        raise ValueError(f"{path} has an unreadable model config: {e}") from None
    model = TinyGPT(cfg)
    load_state_strict(model, ckpt["model"], path)
    return model.to(device), ckpt.get("meta", {})

"""Saving and loading files safely.

Writes go to a temporary file in the same folder (``.NAME.tmp-PID-XXXX``)
and are renamed over the target, so a crash never leaves a half-written
checkpoint. A file written here gets the permissions a plain ``open()``
would give it: those of the file it replaces, else 0o666 minus the umask.
Temporaries left beside the target by a killed process are removed by the
next write of the same target. A write that fails (disk full, no
permission) raises an ``OSError`` that names the target.

Loads use ``weights_only=True``: a checkpoint can hold tensors, numbers,
strings, lists and dicts, never arbitrary pickled code. A file that is not
a readable checkpoint is reported in one line; a model whose vocabulary is
not the tokenizer's, or that holds non-finite weights, is refused at load.
Non-finite weights are never saved either.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch

from .model import GPTConfig, TinyGPT
from .tokenizer import Tokenizer


def jsonable(d: dict) -> dict:
    """A copy of ``d`` as JSON would store it (tuples become lists), safe to
    put in a checkpoint that is loaded with ``weights_only=True``."""
    return json.loads(json.dumps(d, default=list))


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _remove_stale_temps(path: Path) -> None:
    """Remove temporaries of ``path`` whose writing process has died."""
    for tmp in path.parent.glob(_temp_prefix(path) + "*"):
        pid = tmp.name[len(_temp_prefix(path)):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # it exists but is not ours: leave its file alone
            pass


def _plain_open_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: the existing file's,
    else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextmanager
def atomic_write(path, mode: str = "w"):
    """Open a temporary file beside ``path`` for writing; on success it is
    flushed to disk and renamed over ``path``, on any error removed. Every
    file this project writes goes through here. A symbolic link is followed
    (its target is replaced); a device or pipe such as /dev/stdout is written
    directly. An ``OSError`` (no space, no permission, a folder in the way)
    is re-raised naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        if path.exists() and not path.is_file():
            if path.is_dir():
                raise IsADirectoryError(21, "is a folder, not a file", str(path))
            # a device or a pipe (/dev/stdout): written in place, as renaming over it would destroy it
            with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
                yield f
            return
        if path.is_symlink():  # write the file the link points to, as open() would, not over the link
            path = Path(os.path.realpath(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        tmp = path.parent / f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, _plain_open_mode(path))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": "\n"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def atomic_save(obj, path) -> None:
    """``torch.save`` to ``path`` through a temp file and a rename. The
    object is serialised in memory first, so a failing disk shows up as a
    plain ``OSError`` naming the path."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_write(path, "wb") as f:
        f.write(buf.getbuffer())


def check_finite(state: dict, what, error=FloatingPointError) -> None:
    """Refuse a state dict holding NaN or infinite values, naming a tensor."""
    for k, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise error(f"{what}: {k} holds non-finite values (nan or inf)")


def write_json(path, obj, sort_keys: bool = False) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a
    one-line notice) when matplotlib is not installed: the benchmarks' and
    tutorials' figures are optional (``pip install -e ".[plots]"``), and the
    library itself never imports matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no figure")
        return None
    return plt


def save_figure(fig, path, dpi: int = 110, **savefig_kw) -> None:
    """Write a matplotlib figure as PNG, atomically like every file here (its
    folder is created), then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, **savefig_kw)
    import matplotlib.pyplot as plt
    plt.close(fig)


def safe_load(path, what: str = "checkpoint") -> dict:
    """Load a dict saved by ``atomic_save``, with clear errors for a missing
    or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # truncated, corrupt, not a torch file, or pickled code a safe load refuses
        why = ("it holds Python objects that a safe (weights_only) load does not run"
               if "Unsupported global" in str(e) else "not a file torch.save wrote, or a truncated one")
        raise ValueError(f"{path} is not a readable {what} ({why})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a {what}: expected a dict, found {type(obj).__name__}")
    return obj


def load_state_strict(module: torch.nn.Module, state: dict, source) -> None:
    """``load_state_dict`` that names every missing, unexpected or
    wrongly-shaped tensor instead of failing half way."""
    own = module.state_dict()
    odd = [k for k, v in state.items() if not torch.is_tensor(v)]
    if odd:
        raise ValueError(f"{source} does not fit this model: {odd[:3]} are not tensors")
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
    """Save a TinyGPT with its config and any JSON-able metadata (task, metrics).
    A model with non-finite weights is refused."""
    check_finite(model.state_dict(), f"not saving {path}")
    atomic_save({"kind": "tinygpt", "config": asdict(model.config),
                 "model": model.state_dict(), "meta": meta}, path)


def load_model(path, device="cpu", vocab_size: int | None = Tokenizer().vocab_size) -> tuple[TinyGPT, dict]:
    """Load a model saved by ``save_model``; returns (model, meta). The
    model's vocabulary must be ``vocab_size`` (default: the tokenizer's;
    None accepts any) and its weights finite."""
    ckpt = safe_load(path, "model checkpoint")
    if ckpt.get("kind") != "tinygpt" or not isinstance(ckpt.get("config"), dict) \
            or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is not a TinyGPT checkpoint (keys: {sorted(map(str, ckpt))})")
    try:
        cfg = GPTConfig(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} has an unreadable model config: {e}") from None
    if vocab_size is not None and cfg.vocab_size != vocab_size:
        raise ValueError(f"{path} is a model over {cfg.vocab_size} token ids, the tokenizer has {vocab_size}: "
                         "it was written for another vocabulary")
    check_finite(ckpt["model"], f"{path} is not a usable model checkpoint", ValueError)
    model = TinyGPT(cfg)
    load_state_strict(model, ckpt["model"], path)
    return model.to(device), ckpt.get("meta", {})

"""Small checks for user input, one per kind of value.

Every public function and config of this project checks its arguments
with these before doing any work, so a mistake ends in one clear
``ValueError`` or ``TypeError`` that names the argument and the value,
never in a traceback from deep inside torch or in a silently wrong result:

    check_int("rank", 2.5)          TypeError: rank must be an int, got 2.5 (float)
    check_ranks("train_ranks", 4)   TypeError: train_ranks must be a list of ints, got 4 (int)
    check_float("alpha", nan)       ValueError: alpha must be a finite number, got nan

Integers may be Python or numpy ints (anything with ``__index__``), never
bools or floats: ``rank=2.5`` is an error, not rank 2. Numbers must be
finite. Booleans must be real ``bool``s (``unfrozen="no"`` is an error,
not ``True``).

The ``cli_*`` functions turn the same checks into argparse ``type=``
callables, so a bad flag is reported by argparse with the flag's name.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path


def _show(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _in_range(name: str, value, lo, hi, what: str):
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            bound = f">= {lo}"
        elif lo is None:
            bound = f"<= {hi}"
        else:
            bound = f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {what} {bound}, got {value!r}")
    return value


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as a Python int; ints and numpy ints only, within [lo, hi]."""
    if isinstance(value, (bool, str, bytes)) or type(value).__name__ == "bool_" or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, got {_show(value)}")  # bool_: numpy's bool
    try:
        value = int(value.__index__())
    except TypeError:  # e.g. a tensor with more than one element
        raise TypeError(f"{name} must be an int, got {_show(value)}") from None
    return _in_range(name, value, lo, hi, "an int")


def check_ranks(name: str, values, lo: int = 1, hi: int | None = None) -> tuple[int, ...]:
    """A non-empty list (or tuple) of ints within [lo, hi], as a sorted tuple
    without repeats."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of ints, got {_show(values)}")
    out = [check_int(f"{name}[{i}]", v) for i, v in enumerate(values)]
    where = f">= {lo}" if hi is None else f"within {lo}..{hi}"
    bad = [v for v in out if v < lo or (hi is not None and v > hi)]
    if not out or bad:
        raise ValueError(f"{name} must be a non-empty set of ints {where}, got "
                         + (f"{bad[0]} in {out}" if out else "[]"))
    return tuple(sorted(set(out)))


def check_float(name: str, value, lo: float | None = None, hi: float | None = None,
                positive: bool = False) -> float:
    """``value`` as a finite float within [lo, hi] (``positive``: > 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return _in_range(name, value, lo, hi, "a number")


def check_probability(name: str, value, allow_one: bool = False) -> float:
    """A number in [0, 1) (or [0, 1] with ``allow_one``), e.g. a dropout rate."""
    value = check_float(name, value)
    if not (0.0 <= value < 1.0 or (allow_one and value == 1.0)):
        raise ValueError(f"{name} must be in [0, {'1]' if allow_one else '1)'}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A real bool (numpy bools too), not a truthy string or number."""
    if type(value).__name__ == "bool_":  # numpy.bool_
        value = bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_show(value)}")
    return value


def check_choice(name: str, value, choices) -> str:
    """One of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_names(name: str, value) -> list[str]:
    """One name (a str) or a non-empty list of names."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a str or a list of str, got {_show(value)}")
    return list(value)


SEED_LIMIT = 2**63  # seeds are in 0 .. 2**63 - 1 (torch takes 64 bits; some seeds get an offset added)


def check_seed(name: str, value) -> int:
    return check_int(name, value, 0, SEED_LIMIT - 1)


# ----- files ---------------------------------------------------------------
def check_writable_file(path, name: str = "output") -> Path:
    """Refuse, before any work, an output file that cannot be written: an
    existing folder, a path under a regular file, or a folder without write
    permission. Folders that do not exist yet are fine (they are created)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder, not a file")
    if path.exists() and not path.is_file():  # a device or pipe, e.g. /dev/stdout: written in place
        if not os.access(path, os.W_OK):
            raise ValueError(f"{name} {path} is not writable")
        return path
    _check_parents(Path(os.path.realpath(path)) if path.is_symlink() else path, name)
    return path


def check_writable_dir(path, name: str = "output folder", must_write: bool = True) -> Path:
    """Refuse an output folder that is a regular file, lies under one, or
    (with ``must_write``) cannot be written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file, not a folder")
    if path.is_dir():
        if must_write and not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{name} {path} is not writable")
        return path
    _check_parents(path / "x", name)
    return path


def _check_parents(path: Path, name: str) -> None:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name} {path} lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path} cannot be written: folder {parent} is not writable")


def same_file(a, b) -> bool:
    """True when paths ``a`` and ``b`` name the same file (through links,
    ``..`` or hard links)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


# ----- argparse types --------------------------------------------------------
def cli_int(lo: int | None = None, hi: int | None = None):
    """An argparse ``type=``: an int within [lo, hi]."""
    def parse(text: str) -> int:
        try:
            return check_int("value", int(text), lo, hi)
        except ValueError as e:
            msg = str(e).replace("value must be", "must be") if "must be" in str(e) else f"not an int: {text!r}"
            raise argparse.ArgumentTypeError(msg) from None
    parse.__name__ = "int"
    return parse


def cli_float(lo: float | None = None, hi: float | None = None, positive: bool = False):
    """An argparse ``type=``: a finite float within [lo, hi] (``positive``: > 0)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        try:
            return check_float("value", value, lo, hi, positive)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).replace("value must be", "must be")) from None
    parse.__name__ = "float"
    return parse

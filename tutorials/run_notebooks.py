"""Run every tutorial as a notebook, top to bottom, each in a fresh kernel.

Each ``tutorials/NN_name.md`` is converted with jupytext (its ``python``
blocks become the code cells, the rest markdown) and executed with nbclient
in a fresh Python kernel, with a scratch folder as its working directory.
Prints the seconds each takes; a cell that raises stops with its traceback.

Needs the notebooks extra: ``pip install -e ".[notebooks]"``.

Usage: ``python tutorials/run_notebooks.py [01_lora 03 ...] [--out DIR]``
(``--out`` keeps the executed ``.ipynb`` files; default: a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tutorials(names=()) -> list[Path]:
    """The tutorials whose file name starts with one of ``names`` (all when empty)."""
    found = sorted(HERE.glob("[0-9][0-9]_*.md"))
    chosen = [p for p in found if not names or any(p.stem.startswith(n) for n in names)]
    if names and not chosen:
        raise SystemExit(f"no tutorial matches {list(names)}; choose from {[p.stem for p in found]}")
    return chosen


def run_notebook(path: Path, workdir: Path, timeout: int = 600, threads: int = 1):
    """Convert ``path`` to a notebook and run it in a fresh kernel with cwd
    ``workdir`` and ``threads`` CPU threads for torch (OMP_NUM_THREADS: on a
    busy machine, more threads than free cores slow tiny models down many
    times). Returns (the executed notebook, seconds)."""
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path, fmt="md")
    workdir.mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the kernel inherits it
    try:
        t0 = time.perf_counter()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
        return nb, time.perf_counter() - t0
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="tutorials to run, by name prefix (default: all)")
    ap.add_argument("--out", help="write the executed notebooks (.ipynb) to this folder")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell before giving up (default 600)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads in each kernel (default 1)")
    a = ap.parse_args(argv)
    try:
        import jupytext  # noqa: F401
        import nbclient  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{e.name} is missing: pip install -e \".[notebooks]\"") from None
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for path in tutorials(a.names):
            nb, seconds[path.stem] = run_notebook(path, Path(scratch) / path.stem, a.timeout, a.threads)
            print(f"{path.name}: {seconds[path.stem]:.1f} s", flush=True)
            if a.out:
                import nbformat
                from lora_from_scratch.checkpoint import atomic_write
                with atomic_write(Path(a.out) / f"{path.stem}.ipynb") as f:
                    nbformat.write(nb, f)
    return seconds


if __name__ == "__main__":
    main()

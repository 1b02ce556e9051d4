"""The repository stands on its own: no pointer to files outside it, every
relative markdown link resolves, and the tutorials open as notebooks whose
code cells are exactly the blocks tests/test_tutorials.py runs."""

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

from test_tutorials import TUTORIALS, python_blocks

REPO = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "build", "dist"}
# Written in pieces so that this file does not match its own patterns.
OUTSIDE = [re.compile(re.escape("METHODS" + ".md")), re.compile(re.escape(".." + "/shared")),
           re.compile(r"\bissues?\s+#?\d", re.I)]  # an issue number, in any case, with or without #


def tracked_files() -> list[Path]:
    """``git ls-files`` in a git checkout, else every file but data/checkpoints."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=30)
        names = [n for n in out.stdout.decode().split("\0") if n]
        if names:
            return [REPO / n for n in names if (REPO / n).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    skip = REPO / "data" / "checkpoints"
    return [p for p in REPO.rglob("*") if p.is_file() and skip not in p.parents
            and not SKIP_DIRS.intersection(p.relative_to(REPO).parts) and not p.name.endswith(".egg-info")
            and ".egg-info" not in str(p.relative_to(REPO))]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_outside_patterns_match_what_they_should():
    bad = ["see METHODS" + ".md", "in .." + "/shared/seeds", "as iss" + "ue 2 asks", "Issues" + " 11 and 13",
           "issue" + " #4"]
    good = ["the METHODS table", "shared code", "an issue with 3 digits", "no issues", "tissue 3"]
    for text in bad:
        assert any(p.search(text) for p in OUTSIDE), text
    for text in good:
        assert not any(p.search(text) for p in OUTSIDE), text


def test_no_tracked_file_points_outside_the_repository():
    files = tracked_files()
    assert any(f.name == "README.md" for f in files)
    hits = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in OUTSIDE):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "references to files outside the repository or to issue numbers:\n" + "\n".join(hits)


CODE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)  # fenced blocks
LINK = re.compile(r"\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")  # [text](target "title"), ![alt](target)


def relative_links(text: str) -> list[str]:
    text = re.sub(r"`[^`\n]*`", "", CODE.sub("", text))  # code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I) and not t.startswith("#")]


def test_link_extraction():
    text = ("[a](x.md) ![fig](figures/p.png) [b](https://e.org) [c](#anchor) [d](y.md#sec) [e](mailto:a@b)\n"
            "`[f](inline.md)`\n```python\nlayers[0](x)\n```\n[g](<z.md> \"title\")\n")
    assert relative_links(text) == ["x.md", "figures/p.png", "y.md#sec", "z.md"]


def test_every_relative_markdown_link_resolves():
    missing = []
    for path in (f for f in tracked_files() if f.suffix == ".md"):
        for target in relative_links(path.read_text(encoding="utf-8")):
            file = target.split("#", 1)[0]
            if file and not (path.parent / file).exists():
                missing.append(f"{path.relative_to(REPO)} -> {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


# ----- notebooks -------------------------------------------------------------
def code_cells(path: Path) -> list[str]:
    import jupytext
    nb = jupytext.read(path, fmt="md")
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_tutorials_convert_to_notebooks_with_the_tested_blocks():
    pytest.importorskip("jupytext")
    for path in TUTORIALS:
        want = [b[:-1] if b.endswith("\n") else b for b in python_blocks(path)]
        assert code_cells(path) == want, (
            f"{path.name}: the notebook's code cells differ from the python blocks the tests run "
            "(a ```bash block becomes a %%bash cell: write shell commands as ```shell)")


def _run_notebooks_module():
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO / "tutorials" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shortest_tutorial_runs_as_a_notebook(tmp_path):
    """Top to bottom in a fresh kernel; a cell that raises fails the run."""
    pytest.importorskip("jupytext")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # the quickest to run (it trains least; README, "Tutorials as notebooks", has the times)
    shortest = next((p for p in TUTORIALS if p.name.startswith("00_")), TUTORIALS[0])
    nb, seconds = _run_notebooks_module().run_notebook(shortest, tmp_path)
    executed = [c for c in nb.cells if c.cell_type == "code"]
    assert len(executed) == len(python_blocks(shortest))
    assert all(c.execution_count for c in executed), "a code cell did not run"
    assert not [o for c in executed for o in c.outputs if o.get("output_type") == "error"]


def test_tutorial_03_quotes_the_rank_curves_results_file():
    """Benchmark numbers are quoted from the results file, not typed by hand."""
    rows = [line for line in (REPO / "benchmarks" / "results" / "rank_curves.txt").read_text().splitlines()
            if line.startswith("| ")]
    tutorial = (REPO / "tutorials" / "03_matryoshka_lora.md").read_text(encoding="utf-8")
    assert rows, "no table in benchmarks/results/rank_curves.txt"
    missing = [row for row in rows if row not in tutorial]
    assert not missing, "tutorial 03 does not quote these rows of rank_curves.txt:\n" + "\n".join(missing)

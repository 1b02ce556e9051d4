"""Every ```python block of every tutorial runs, in order, one namespace per
tutorial, so the tutorials cannot drift from the code."""

import re
from pathlib import Path

import pytest
import torch

TUTORIALS = sorted((Path(__file__).resolve().parent.parent / "tutorials").glob("[0-9][0-9]_*.md"))  # not README.md
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def test_tutorials_exist_and_have_code():
    assert TUTORIALS, "no tutorials found"
    for path in TUTORIALS:
        assert python_blocks(path), f"{path.name} has no python block"


def test_block_extraction():
    text = "intro\n```python\nx = 1\n```\nprose\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    p = Path(__file__).with_name("_tmp_tutorial.md")
    try:
        p.write_text(text)
        assert python_blocks(p) == ["x = 1\n", "y = x + 1\n"]
    finally:
        p.unlink()


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a tutorial writes land in a temp folder
    torch.manual_seed(0)
    namespace = {"__name__": f"tutorial_{path.stem}"}
    for i, block in enumerate(python_blocks(path), 1):
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path.name}, python block {i} failed: {type(e).__name__}: {e}\n{block}") from e

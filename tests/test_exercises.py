"""The exercises at the end of every tutorial, checked both ways.

An exercise is a ```py exercise block in tutorials/NN_name.md: a stub
to complete, a ``# --- checks ---`` line, then the checks (asserts). Its
solution is tutorials/solutions/NN_name.py, which defines every name the
stubs define (tutorials/solutions/README.md gives the convention). Each
exercise must pass its checks with the solution and fail them with the
unsolved stub. New tutorials join by following the convention; nothing here
lists them.
"""

import ast
import re
from pathlib import Path

import pytest
import torch

from test_tutorials import TUTORIALS, python_blocks

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = REPO / "tutorials" / "solutions"
EXERCISE = re.compile(r"^```py exercise\n(.*?)^```", re.S | re.M)
CHECKS = "# --- checks ---\n"
WITH_EXERCISES = ("00_toy_world", "01_lora", "02_dylora", "03_matryoshka_lora", "04_gralora", "05_remix", "06_grpo",
                  "07_sgrpo_tspmo", "08_rank_allocation")  # 2-4 exercises each


def exercises(path: Path) -> list[tuple[str, str]]:
    """(stub, checks) of each exercise block, in order."""
    out = []
    for i, block in enumerate(EXERCISE.findall(path.read_text(encoding="utf-8")), 1):
        if block.count(CHECKS) != 1:
            raise ValueError(f"{path.name}, exercise {i}: needs exactly one line {CHECKS.strip()!r}")
        out.append(tuple(block.split(CHECKS)))
    return out


def solution_file(path: Path) -> Path:
    return SOLUTIONS / f"{path.stem}.py"


CASES = [(path, i) for path in TUTORIALS for i in range(len(exercises(path)))]
IDS = [f"{path.stem}-{i + 1}" for path, i in CASES]


def run(code: str, namespace: dict, name: str) -> None:
    exec(compile(code, name, "exec"), namespace)


def defined_names(code: str) -> set[str]:
    return {n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("path,i", CASES, ids=IDS)
def test_solution_passes_the_checks(path, i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    stub, checks = exercises(path)[i]
    solution = solution_file(path)
    assert solution.exists(), f"{path.name} has exercises but no {solution.relative_to(REPO)}"
    source = solution.read_text(encoding="utf-8")
    missing = defined_names(stub) - defined_names(source)
    assert not missing, f"{solution.name} does not define {sorted(missing)} (exercise {i + 1} of {path.name})"
    ns = {"__name__": "exercise"}
    run(stub, ns, f"{path.name}[exercise {i + 1}, stub]")
    run(source, ns, str(solution))  # the solved definitions replace the stubs
    run(checks, ns, f"{path.name}[exercise {i + 1}, checks]")


@pytest.mark.parametrize("path,i", CASES, ids=IDS)
def test_unsolved_stub_fails_the_checks(path, i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    stub, checks = exercises(path)[i]
    ns = {"__name__": "exercise"}
    run(stub, ns, f"{path.name}[exercise {i + 1}, stub]")
    with pytest.raises((AssertionError, NotImplementedError)):
        run(checks, ns, f"{path.name}[exercise {i + 1}, checks]")


def test_solution_files_run_alone_and_belong_to_a_tutorial():
    stems = {p.stem for p in TUTORIALS}
    for solution in sorted(SOLUTIONS.glob("*.py")):
        assert solution.stem in stems, f"{solution.name} matches no tutorial"
        run(solution.read_text(encoding="utf-8"), {"__name__": "solution"}, str(solution))  # own imports


def test_course_tutorials_have_two_to_four_exercises():
    for stem in WITH_EXERCISES:
        n = len(exercises(REPO / "tutorials" / f"{stem}.md"))
        assert 2 <= n <= 4, f"{stem}.md has {n} exercises, expected 2 to 4"


def test_tutorial_runner_skips_exercise_blocks(tmp_path):
    text = ("```python\nx = 1\n```\n```py exercise\ndef f():\n    raise NotImplementedError\n"
            "# --- checks ---\nassert f() == 1\n```\n```python\ny = x + 1\n```\n")
    p = tmp_path / "99_demo.md"
    p.write_text(text)
    assert python_blocks(p) == ["x = 1\n", "y = x + 1\n"]  # the stub never runs with the tutorial
    [(stub, checks)] = exercises(p)
    assert stub.startswith("def f()") and checks == "assert f() == 1\n"

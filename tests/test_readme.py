"""The README's commands are the ones CI runs, and the files it names exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bash_lines(text: str) -> list[str]:
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    test_cmds = [c for c in _bash_lines(readme) if "pytest" in c]
    assert len(test_cmds) >= 1, "the README must give the test command"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_cmds[0] in ci, f"{test_cmds[0]!r} is not a line of .ci/run"


def test_readme_links_point_to_files():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", readme):
        assert (REPO / target).exists(), f"README links to missing {target}"

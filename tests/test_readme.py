"""CI must run what the README tells people to run: the two opening commands, verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    setup_and_demo, tests = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = setup_and_demo.split(" && .venv/bin/python benchmarks/demo.py")[0]
    assert setup != setup_and_demo, "the first command must end by running the demo"
    assert setup in ci
    assert ci[-1] == tests


def test_readme_shows_the_current_benchmark_tables():
    """Every `<!-- begin <path> -->` block of the README is that results file, verbatim
    (benchmarks/compare.py rewrites the block when it writes the file)."""
    text = (ROOT / "README.md").read_text()
    included = re.findall(r"<!-- begin (\S+) -->\n(.*?)<!-- end \1 -->", text, re.S)
    assert included, "the README includes no benchmark table"
    for path, block in included:
        assert block == (ROOT / path).read_text(), f"README's copy of {path} is stale"

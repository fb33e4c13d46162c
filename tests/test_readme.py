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

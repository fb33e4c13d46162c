"""The README and docs/ must say what the repository holds: CI runs the README's two opening
commands verbatim, every included results table is that file, and every link resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_ci_runs_the_readme_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    setup_and_demo, tests = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = setup_and_demo.split(" && .venv/bin/python benchmarks/demo.py")[0]
    assert setup != setup_and_demo, "the first command must end by running the demo"
    # the package declares a torch range; the set-up installs the build CI is run on
    assert re.search(r"pip install torch==\S+ ", setup), "the first command must pin torch"
    assert setup in ci
    assert ci[-1] == tests


def test_docs_show_the_current_benchmark_tables():
    """Every `<!-- begin <path> -->` block of the README and of docs/*.md is that results
    file, verbatim (a benchmark that writes the file rewrites the block too)."""
    found = 0
    for doc in DOCS:
        included = re.findall(r"<!-- begin (\S+) -->\n(.*?)<!-- end \1 -->", doc.read_text(), re.S)
        for path, block in included:
            assert (ROOT / path).is_file(), f"{doc.name} includes {path}, which does not exist"
            assert block == (ROOT / path).read_text(), f"{doc.name}'s copy of {path} is stale"
        found += len(included)
    assert found, "neither the README nor docs/ includes a benchmark table"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_links_resolve():
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", text)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name} links to {target}: no such file"
            if anchor:
                assert anchor in _anchors(file.read_text()), f"{doc.name} links to {target}: no such heading"


def test_each_doc_opens_with_its_contents():
    for doc in DOCS[1:]:
        head = doc.read_text().split("\n## ", 2)
        assert len(head) > 1 and head[1].startswith("Contents"), f"{doc.name} must open with its contents"

"""Copy a results table into the README and docs/, where they include it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))


def include_in_docs(table: Path) -> None:
    """Replace every copy of `table` in the README and docs/ (between `<!-- begin/end <path> -->`
    markers, where a file has them) with the table just written; tests/test_readme.py keeps
    them equal."""
    if not table.resolve().is_relative_to(ROOT):
        return
    name = table.resolve().relative_to(ROOT).as_posix()
    begin, end = f"<!-- begin {name} -->\n", f"<!-- end {name} -->"
    for doc in DOCS:
        text = doc.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            doc.write_text(head + begin + table.read_text() + end + rest.split(end, 1)[1])

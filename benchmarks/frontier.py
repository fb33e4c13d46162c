"""The speed/quality frontier of each cache configuration family, from a `compare.py` run.

    python benchmarks/compare.py --families wavespeed wavespeed-taylor ... --out benchmarks/results/policies-cpu
    python benchmarks/frontier.py benchmarks/results/policies-cpu.json

For each workload and family, the frontier at a quality level q is the best speed-up over
eager among its measured thresholds whose final latents are at least q dB PSNR against eager
(no interpolation: a configuration someone can run). The table gives it at 40, 35 and 30 dB
and each family's ratio to plain First Block Cache (`wavespeed`); the plot draws every
measured point (speed-up against PSNR) with its frontier as a step line. Writes
`<json stem>-frontier.md` and `.png` beside the input, and copies the table into the README and
docs/ where they include it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402
from docs_include import include_in_docs  # noqa: E402

LEVELS = (40.0, 35.0, 30.0)
BASELINE = "wavespeed"


def frontier(rows: list[dict], level: float) -> float | None:
    speeds = [r["speedup_vs_eager"] for r in rows if r["psnr_db"] is None or r["psnr_db"] >= level]
    return max(speeds) if speeds else None


def families(rows: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for r in rows:
        if not r["error"] and r["threshold"] is not None:
            found.setdefault(r["family"], []).append(r)
    return found


def markdown(record: dict, source: Path) -> str:
    """One table: a row per family, a column per workload and quality level."""
    names = list(record["workloads"])
    groups = {name: families(record["workloads"][name]["rows"]) for name in names}
    order = list(dict.fromkeys(f for name in names for f in groups[name]))
    runs = "; ".join(f"{name} {block['finished']}" for name, block in record["workloads"].items())
    lines = [f"Best speed-up over eager among a family's thresholds whose final latents are at least "
             f"the given PSNR against eager; in brackets, the ratio to plain First Block Cache "
             f"(`{BASELINE}`). From `{source.name}` ({record['device']}, {record['threads']} thread(s); {runs}).", "",
             "| family | " + " | ".join(f"{name} {q:g} dB" for name in names for q in LEVELS) + " |",
             "| --- |" + " ---: |" * (len(names) * len(LEVELS))]
    for family in order:
        cells = []
        for name in names:
            rows, base = groups[name].get(family, []), groups[name].get(BASELINE, [])
            for q in LEVELS:
                value, reference = frontier(rows, q), frontier(base, q)
                ratio = f" ({value / reference:.2f})" if value and reference else ""
                cells.append(f"{value:.2f}x{ratio}" if value else "-")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    fig, axes = plots.panels(list(record["workloads"]))
    for ax, name in axes:
        for index, (family, rows) in enumerate(families(record["workloads"][name]["rows"]).items()):
            rows = sorted(rows, key=lambda r: -(r["psnr_db"] or 100.0))
            marker = "os^vD<>ph"[index % 9]
            line, = ax.plot([r["psnr_db"] or 100.0 for r in rows], [r["speedup_vs_eager"] for r in rows],
                            marker=marker, linestyle="none", label=family)
            levels = sorted({r["psnr_db"] or 100.0 for r in rows}, reverse=True)
            ax.step(levels, [frontier(rows, q) for q in levels], where="post", color=line.get_color(), alpha=0.6)
        ax.invert_xaxis()
        plots.label(ax, "PSNR of the final latents vs eager (dB; exact = 100)", "speed-up over eager",
                    f"{name} ({record['device']})")
    plots.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a compare.py .json")
    args = parser.parse_args()
    record = json.loads(args.results.read_text())
    stem = args.results.with_suffix("")
    text = markdown(record, args.results)
    Path(f"{stem}-frontier.md").write_text(text + "\n")
    include_in_docs(Path(f"{stem}-frontier.md"))
    plot(record, Path(f"{stem}-frontier.png"))
    print(text)


if __name__ == "__main__":
    main()

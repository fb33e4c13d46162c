"""The speed/quality frontier of each cache configuration family, from `compare.py` runs.

    python benchmarks/compare.py --families wavespeed wavespeed-predictive ... --out benchmarks/results/policies-cpu
    python benchmarks/frontier.py benchmarks/results/policies-cpu-digits.json \
        benchmarks/results/policies-cpu-photos.json --out benchmarks/results/policies-cpu-frontiers
    python benchmarks/frontier.py benchmarks/results/policies-cpu-steps8.json \
        benchmarks/results/policies-cpu-steps4.json --levels 40 30 --out benchmarks/results/policies-cpu-few-steps

Runs of the same step count are one table (a workload each, from its own run: one run per model
can go in parallel); runs of other step counts are tables of their own.

For each workload and family, the frontier at a quality level q is the best speed-up among its
measured configurations whose final latents are at least q dB PSNR against eager (no
interpolation: a configuration someone can run), in two measures:

- wall: median wall time per image against eager's, timed alternately (`speedup_vs_eager`);
- calls: steps over the calls' cost, a computed call counting 1 and a skipped one what the
  family's skipped call costs compiled, measured against a plain Inductor call
  (`speedup_in_calls`, `compare.skip_cost`): it does not drift with the other processes on the
  machine.

Each cell gives the ratio to plain First Block Cache (`wavespeed`) in brackets; the last rows
are our best policy and the peers' best family at that level, and their ratio. Writes
`<out>.md` (default: `<first json stem>-frontiers`) and, for the first step count, `<out>.png`
(speed-up in calls against PSNR, each family's frontier as a step line); copies the table into
docs/ where it is included.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402
from docs_include import include_in_docs  # noqa: E402

LEVELS = (40.0, 35.0, 30.0, 25.0)
BASELINE = "wavespeed"
OURS = "wavespeed"  # the families of our policies: wavespeed, wavespeed-<policy>
MEASURES = {"wall": ("speedup_vs_eager", "wall time per image against eager's"),
            "calls": ("speedup_in_calls", "steps over the calls' cost (a skipped call at its measured "
                                          "compiled cost, in plain Inductor calls)")}


def frontier(rows: list[dict], level: float, key: str) -> dict | None:
    """The fastest of `rows` (by `key`) whose PSNR is at least `level` (exact counts as any)."""
    fit = [r for r in rows if r["psnr_db"] is None or r["psnr_db"] >= level]
    return max(fit, key=lambda r: r[key]) if fit else None


def families(rows: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for r in rows:
        if not r["error"] and r["threshold"] is not None:
            found.setdefault(r["family"], []).append(r)
    return found


def is_ours(family: str) -> bool:
    return family == OURS or family.startswith(OURS + "-")


def best_of(groups: dict[str, list[dict]], ours: bool, level: float, key: str) -> tuple[str, dict] | None:
    """(family, row) of the fastest configuration at `level` among ours or among the peers."""
    found = [(family, best) for family, rows in groups.items() if is_ours(family) == ours
             and (best := frontier(rows, level, key)) is not None]
    return max(found, key=lambda pair: pair[1][key]) if found else None


def table(record: dict, levels: tuple[float, ...], measure: str) -> list[str]:
    """One table of a measure: a row per family, a column per workload and quality level."""
    key = MEASURES[measure][0]
    names = list(record["workloads"])
    groups = {name: families(record["workloads"][name]["rows"]) for name in names}
    order = list(dict.fromkeys(f for name in names for f in groups[name]))
    lines = ["| family | " + " | ".join(f"{name} {q:g} dB" for name in names for q in levels) + " |",
             "| --- |" + " ---: |" * (len(names) * len(levels))]

    def cell(row, base):
        if row is None:
            return "-"
        ratio = f" ({row[key] / base[key]:.2f})" if base is not None else ""
        return f"{row[key]:.2f}x{ratio}"

    for family in order:
        cells = [cell(frontier(groups[name].get(family, []), q, key), frontier(groups[name].get(BASELINE, []), q, key))
                 for name in names for q in levels]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    summary = {"**ours, best**": [], "**peers, best**": [], "**ours / best peer**": []}
    for name in names:
        for q in levels:
            ours, peers = best_of(groups[name], True, q, key), best_of(groups[name], False, q, key)
            summary["**ours, best**"].append(f"{ours[1][key]:.2f}x {ours[0]}" if ours else "-")
            summary["**peers, best**"].append(f"{peers[1][key]:.2f}x {peers[0]}" if peers else "-")
            summary["**ours / best peer**"].append(f"{ours[1][key] / peers[1][key]:.2f}" if ours and peers else "-")
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in summary.items()]
    return lines


def by_steps(records: list[tuple[Path, dict]]) -> list[tuple[str, dict]]:
    """The runs, those of one step count merged into one record of all their workloads;
    (their file names, the record) in the order of their first run."""
    merged: dict[int, tuple[list[str], dict]] = {}
    for path, record in records:
        names, into = merged.setdefault(record["steps"], ([], {**record, "workloads": {}}))
        names.append(f"`{path.name}`")
        into["workloads"].update(record["workloads"])
    return [(", ".join(names), record) for names, record in merged.values()]


def markdown(record: dict, sources: str, levels: tuple[float, ...]) -> str:
    runs = "; ".join(f"{name} {block['finished']}" for name, block in record["workloads"].items())
    parts = [f"From {sources} ({record['device']}, {record['threads']} thread(s), {record['steps']} steps; "
             f"{runs}). Best speed-up among a family's configurations whose final latents are at least the "
             f"given PSNR against eager; in brackets, its ratio to plain First Block Cache (`{BASELINE}`)."]
    for measure, (_, meaning) in MEASURES.items():
        parts += ["", f"Speed-up in {measure} ({meaning}):", "", *table(record, levels, measure)]
    return "\n".join(parts)


def plot(record: dict, path: Path) -> None:
    key = MEASURES["calls"][0]
    fig, axes = plots.panels(list(record["workloads"]))
    for ax, name in axes:
        for index, (family, rows) in enumerate(families(record["workloads"][name]["rows"]).items()):
            rows = sorted(rows, key=lambda r: -(r["psnr_db"] or 100.0))
            marker = "os^vD<>ph"[index % 9]
            line, = ax.plot([r["psnr_db"] or 100.0 for r in rows], [r[key] for r in rows],
                            marker=marker, linestyle="none", label=family)
            levels = sorted({r["psnr_db"] or 100.0 for r in rows}, reverse=True)
            ax.step(levels, [frontier(rows, q, key)[key] for q in levels], where="post", color=line.get_color(),
                    alpha=0.6)
        ax.invert_xaxis()
        plots.label(ax, "PSNR of the final latents vs eager (dB; exact = 100)", "speed-up in calls",
                    f"{name} ({record['device']}, {record['steps']} steps)")
    plots.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="compare.py .json files")
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="PSNR levels (dB)")
    parser.add_argument("--out", type=Path, default=None, help="output path prefix")
    args = parser.parse_args()
    out = args.out or args.results[0].with_name(f"{args.results[0].stem}-frontiers")
    records = by_steps([(path, json.loads(path.read_text())) for path in args.results])
    text = "\n\n".join(markdown(record, sources, tuple(args.levels)) for sources, record in records)
    Path(f"{out}.md").write_text(text + "\n")
    include_in_docs(Path(f"{out}.md"))
    plot(records[0][1], Path(f"{out}.png"))
    print(text)


if __name__ == "__main__":
    main()

"""First Block Cache on a model whose block stack Dynamo cannot keep in one graph.

The model is `benchmarks/moe.py`'s mixture-of-experts denoiser (dual-stream blocks whose
image feed-forward routes tokens to experts through boolean masks: a graph break in every
block), random weights, `--width` wide, `--depth` blocks, `--tokens` image tokens. Three
configurations sample the same `--steps`-step generation in one process:

* eager: the model as written;
* inductor: `torch.compile(model, backend="inductor")`: Dynamo runs the forward as Python
  and compiles each block's frames;
* wavespeed: `torch.compile(model, backend="wavespeed")` at each `--thresholds` value (run-time
  overrides, one compile): the same frames compiled, the cache around the stack at the module
  level (wavepass.stack_cache).

After one generation per configuration that compiles (timed apart), `--repeats` rounds run
every configuration once, in turns. Reported per configuration: the median s/generation, its
speed-up over eager and over inductor, the steps skipped, and the final latent's PSNR
against eager's (peak: eager's max |value|).

    python benchmarks/graph_breaks.py            # writes benchmarks/results/graph-breaks-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import demo  # noqa: E402
import moe  # noqa: E402

import wavepass  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.15, 0.2, 0.3])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(HERE / "results" / "graph-breaks-cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = moe.Config(width=args.width, heads=max(args.width // 64, 1), depth=args.depth, experts=args.experts)
    model = moe.build(config)
    latent, text = moe.inputs(config, tokens=args.tokens, text_tokens=16)
    explained = torch._dynamo.explain(model)(latent, text, torch.tensor([500.0]))
    torch._dynamo.reset()

    inductor = torch.compile(model, backend="inductor")
    wavespeed = torch.compile(model, backend="wavespeed")
    runs = {"eager": (model, None), "inductor": (inductor, None)}
    runs.update({f"wavespeed {t:g}": (wavespeed, t) for t in args.thresholds})

    def generation(name: str) -> tuple[float, torch.Tensor, wavepass.Stats | None]:
        function, threshold = runs[name]
        wavepass.reset(model)
        started = time.perf_counter()
        if threshold is None:
            out = moe.sample(function, latent, text, args.steps)
        else:
            with wavepass.cache_settings(residual_diff_threshold=threshold):
                out = moe.sample(function, latent, text, args.steps)
        return time.perf_counter() - started, out, wavepass.stats(model) if threshold is not None else None

    compile_s = {name: generation(name)[0] for name in runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs, stats = {}, {}
    for _ in range(args.repeats):
        for name in runs:
            seconds, outputs[name], stats[name] = generation(name)
            times[name].append(seconds)

    eager_s, inductor_s = statistics.median(times["eager"]), statistics.median(times["inductor"])
    rows = []
    for name in runs:
        median = statistics.median(times[name])
        s = stats[name]
        rows.append({
            "configuration": name,
            "s_per_generation": median,
            "times": times[name],
            "first_generation_s": compile_s[name],
            "speedup_vs_eager": eager_s / median,
            "speedup_vs_inductor": inductor_s / median,
            "skipped": s.hits if s else 0,
            "decisions": "".join("X" if d else "." for d in s.decisions) if s else None,
            "psnr_db_vs_eager": demo.accuracy(outputs[name], outputs["eager"])[1],
        })
    result = {
        "what": "MoE denoiser (a graph break in every block), one process, medians of interleaved rounds",
        "command": " ".join(["python benchmarks/graph_breaks.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}",
        "model": {**vars(config), "tokens": args.tokens, "text_tokens": 16, "steps": args.steps},
        "dynamo": {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
                   "first_break": str(explained.break_reasons[0].reason).splitlines()[0] if explained.break_reasons else None},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    m, d = result["model"], result["dynamo"]
    lines = [
        f"# First Block Cache on a graph-breaking model ({result['date']})",
        "",
        f"{result['what']}; {result['machine']}. Model: width {m['width']}, {m['depth']} blocks, "
        f"{m['experts']} experts (top {m['top_k']}), {m['tokens']} image + {m['text_tokens']} text tokens, "
        f"{m['steps']} steps. `torch._dynamo.explain`: {d['graphs']} graphs, {d['graph_breaks']} graph breaks "
        f"(first: {d['first_break']}). Plain Inductor gains little here: Dynamo runs the model's forward "
        "and the experts' loop as Python and compiles the blocks' other frames.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| configuration | s/generation | vs eager | vs inductor | skipped | PSNR vs eager (dB) | first generation (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['configuration']} | {r['s_per_generation']:.3f} | {r['speedup_vs_eager']:.2f}x | "
            f"{r['speedup_vs_inductor']:.2f}x | {r['skipped']} of {m['steps']} | {r['psnr_db_vs_eager']:.1f} | "
            f"{r['first_generation_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

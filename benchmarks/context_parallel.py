"""First Block Cache under context parallelism: one generation on 1 and on N processes.

The model is `benchmarks/demo.py`'s medium random-weight Flux (4 + 8 blocks, 4 heads,
256 image + 16 text tokens, its timestep embedding smoothed so that steps change like a
trained model's). N processes run it with diffusers' Ulysses attention
(`enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`), compiled with
`torch.compile(model, backend="wavespeed")`; one process runs it plainly. Every process
count runs in fresh spawned processes: gloo on the CPU, NCCL (bf16, one GPU per process)
where `--device cuda`.

Each generation is a `--steps` rectified-flow Euler loop from the same noise. After one
generation that compiles (timed apart), `--repeats` rounds run a generation at threshold 0
(nothing skipped) and one at `--threshold` (a `wavepass.cache_settings` override: no
recompile), in turns. Per process count and threshold:

* ms/step: the median over every timed step (computed and skipped alike), and the medians
  of the computed and of the skipped steps apart; s/generation: the median generation;
* skipped: the steps the cache skipped in one generation, and its decisions (X skipped);
* ranks agree: every process made the same decisions (`wavepass.stats(model)`);
* max |diff|: the final latent's largest difference to the 1-process one at that threshold.

Each process uses `--threads` intra-op threads (default 1: on a shared 2-core machine two
OpenMP threads in one process mostly wait on each other, and N processes of two threads
would oversubscribe it), so N processes use N times the CPU of one. Times are rank 0's (the
collectives keep the ranks in step).

    python benchmarks/context_parallel.py                   # CPU, 1 and 2 processes (gloo)
    python benchmarks/context_parallel.py --device cuda --processes 1 2 4 \\
        --out benchmarks/results/context-parallel-cuda       # NCCL, one GPU per process
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))


@contextlib.contextmanager
def one_accelerator_stand_in():
    """Stand-in, only around `enable_parallelism` on a machine without an accelerator:
    diffusers 0.42 places rank r on device `r % torch.accelerator.device_count()`, a division
    by zero there. The count reads 1 (device "cpu:0") while the call runs."""
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(original(), 1)
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _worker(rank: int, world: int, store: str, settings: dict, out: str) -> None:
    import logging
    import warnings

    import diffusers
    import torch.distributed as dist

    import demo
    import wavepass

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # "enable_parallelism is experimental"
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_grad_enabled(False)
    torch.set_num_threads(settings["threads"])
    cuda = settings["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.set_device(device)
    model = demo.build_model("medium", settings["seed"]).to(device, dtype)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.FileStore(store, world), rank=rank,
                                world_size=world, device_id=device if cuda else None)
        with one_accelerator_stand_in():
            model.enable_parallelism(config=diffusers.ContextParallelConfig(ulysses_degree=world))
    compiled = torch.compile(model, backend="wavespeed", options={
        "compiler": settings["compiler"], "residual_diff_threshold": settings["threshold"]})
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype)
              for k, v in demo.make_inputs(settings["seed"]).items()}
    sigmas = torch.linspace(1, 0, settings["steps"] + 1)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def generation() -> tuple[torch.Tensor, list[float], str]:
        wavepass.reset(model)
        x, step_s = inputs["noise"], []
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            sync()
            start = time.perf_counter()
            v = compiled(hidden_states=x, encoder_hidden_states=inputs["encoder_hidden_states"],
                         pooled_projections=inputs["pooled_projections"],
                         timestep=sigma.expand(1).to(device, dtype), img_ids=inputs["img_ids"],
                         txt_ids=inputs["txt_ids"], return_dict=False)[0]
            x = x + (sigma_next - sigma) * v
            sync()
            step_s.append(time.perf_counter() - start)
        stats = wavepass.stats(model)
        if stats.reason is not None:
            raise RuntimeError(f"rank {rank}: the model ran uncached: {stats.reason}")
        return x.float().cpu(), step_s, "".join("X" if d else "." for d in stats.decisions)

    start = time.perf_counter()
    generation()
    first_s = time.perf_counter() - start
    runs: dict[str, dict] = {}
    for _ in range(settings["repeats"]):
        for threshold in (0.0, settings["threshold"]):
            with wavepass.cache_settings(residual_diff_threshold=threshold):
                latent, step_s, decisions = generation()
            run = runs.setdefault(str(threshold), {"step_s": [], "decisions": set()})
            run["step_s"].append(step_s)
            run["decisions"].add(decisions)
            run["latent"] = latent
    torch.save({"first_generation_s": first_s, "runs": runs}, os.path.join(out, f"rank{rank}.pt"))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, settings: dict) -> dict:
    """Spawn `world` processes for one generation setting; their results, rank by rank."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world, os.path.join(folder, "store"), settings, folder),
                           nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(world)]


def summarize(world: int, ranks: list[dict], reference: dict | None, settings: dict) -> list[dict]:
    rows = []
    for threshold, run in ranks[0]["runs"].items():
        decisions = set().union(*(r["runs"][threshold]["decisions"] for r in ranks))
        decision = sorted(decisions)[0]
        steps = [s * 1e3 for generation in run["step_s"] for s in generation]
        computed = [s * 1e3 for generation in run["step_s"] for s, d in zip(generation, decision) if d == "."]
        skipped = [s * 1e3 for generation in run["step_s"] for s, d in zip(generation, decision) if d == "X"]
        latent = run["latent"]
        diff = None if reference is None else (latent - reference["runs"][threshold]["latent"]).abs().max().item()
        rows.append({
            "processes": world,
            "backend": "-" if world == 1 else ("nccl" if settings["device"] == "cuda" else "gloo"),
            "threads_per_process": settings["threads"],
            "threshold": float(threshold),
            "skipped": decision.count("X"),
            "steps": len(decision),
            "decisions": decision,
            "ranks_agree": len(decisions) == 1,
            "ms_per_step": statistics.median(steps),
            "ms_per_computed_step": statistics.median(computed) if computed else None,
            "ms_per_skipped_step": statistics.median(skipped) if skipped else None,
            "s_per_generation": statistics.median(sum(g) for g in run["step_s"]),
            "first_generation_s": ranks[0]["first_generation_s"],
            "max_abs_diff_vs_1_process": diff,
        })
    return rows


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Device: {s['device']} ({result['machine']}), torch {result['torch']}, diffusers {result['diffusers']}; "
        f"demo.py's medium Flux, {s['steps']} Euler steps, compiler `{s['compiler']}`, Ulysses over N processes; "
        f"median of {s['repeats']} generations per row; run {result['date']}, load average "
        f"{result['load_before']:.1f} before, {result['load_after']:.1f} after.",
        "",
        "| processes | backend | threads/process | threshold | skipped | ranks agree | ms/step (median) "
        "| computed step ms | skipped step ms | s/generation | first generation s (compile) "
        "| max abs diff vs 1 process | decisions |",
        "| ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    for row in result["rows"]:
        diff = row["max_abs_diff_vs_1_process"]
        lines.append(
            f"| {row['processes']} | {row['backend']} | {row['threads_per_process']} | {row['threshold']:g} "
            f"| {row['skipped']}/{row['steps']} | {'yes' if row['ranks_agree'] else '**no**'} "
            f"| {ms(row['ms_per_step'])} | {ms(row['ms_per_computed_step'])} | {ms(row['ms_per_skipped_step'])} "
            f"| {row['s_per_generation']:.2f} | {row['first_generation_s']:.1f} "
            f"| {'-' if diff is None else f'{diff:.1e}'} | `{row['decisions']}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="process counts (1 is the reference; each N must divide the 4 heads)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threshold", type=float, default=0.12, help="residual_diff_threshold")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per threshold")
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="path without extension for .json and .md (default results/context-parallel-<device>)")
    args = parser.parse_args()
    processes = sorted(set(args.processes) | {1})
    if args.device == "cuda" and torch.cuda.device_count() < max(processes):
        sys.exit(f"context_parallel: {max(processes)} processes need as many GPUs, found {torch.cuda.device_count()}")
    out = Path(args.out) if args.out else RESULTS / f"context-parallel-{args.device}"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg()[0]
    rows, reference = [], None
    for world in processes:
        settings = dict(device=args.device, steps=args.steps, threshold=args.threshold, repeats=args.repeats,
                        compiler=args.compiler, seed=args.seed, threads=args.threads)
        print(f"context_parallel: {world} process(es)...", flush=True)
        ranks = measure(world, settings)
        reference = reference or ranks[0]
        rows += summarize(world, ranks, None if world == 1 else reference, settings)
    import diffusers

    machine = (torch.cuda.get_device_name(0) if args.device == "cuda" else f"{cpus} CPUs, {platform.machine()}")
    result = dict(torch=torch.__version__, diffusers=diffusers.__version__, machine=machine,
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  load_before=load_before, load_after=os.getloadavg()[0],
                  settings=dict(vars(args), processes=processes, cpus=cpus), rows=rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

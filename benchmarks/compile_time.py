"""Compile time, per-step time and recompiles: `wavespeed` vs plain Inductor vs diffusers'
`compile_repeated_blocks()`, on Flux-architecture and SD3-architecture models of two depths.

Each configuration of each model is measured in subprocesses of its own (a fresh Dynamo):

* cold    -- a fresh, empty TORCHINDUCTOR_CACHE_DIR: time of the first call (compile + run),
             and the part of it Dynamo spent tracing bytecode (the same for every config).
             Before the model is built, the child asks Inductor which vector instructions
             the CPU has (`pick_vec_isa()`): on an empty cache folder Inductor answers by
             compiling and running a test program per instruction set (7-9 s here), once per
             machine and cache folder, whatever the model. That probe is timed on its own
             (`vec_isa_probe_s`, same for every config) and is not part of the cold compile;
* warm    -- a new subprocess on a warm cache folder: first call again, then a scripted
             session counted with Dynamo's counters: 3 prompts (new encoder states, same
             shapes), a LoRA change (weights changed in place with `p.add_(B @ A)`, then
             parameters replaced by new same-shape `nn.Parameter`s), a second and a third
             resolution. Compiled without `dynamic=` (torch's default), so the second
             resolution makes Dynamo recompile once with dynamic sizes, which the third
             reuses; every other recompile counts against the configuration;
* steady  -- a subprocess per model that loads all configurations from the warm cache and
             times them in turns: `--steps` calls of A in a row, as a sampler calls its model,
             then of B, then of C, and again, `--repeats` rounds; each turn gives the median
             of its calls, and each round a ratio to Inductor's turn in it. Run twice, the
             configurations loaded in opposite orders (the order a process builds its models
             in moves a model's step time by a few percent here): ms per step is the median
             of all turns, the ratio to Inductor the median of all rounds' ratios. Turns put
             every configuration under the same machine load, which drifts by more than 5%
             over a minute here; calls alternating one by one would instead measure how fast
             each model recovers its CPU caches from the other two's calls. The same is
             reported for each turn's fastest call: interference here only adds time (a
             turn's median moved between 5.8 and 8.1 ms for one configuration, and so did the
             thread's CPU time), so the fastest calls show a model's own cost most closely.

`--steps-again` measures the per-step times again for the models of an earlier `--json`
result and keeps its compile measurements (after a change of the per-step protocol alone).

Cold and warm compiles are measured `--compile-runs` times (default 3), the configurations
interleaved, each in a fresh subprocess (cold: on a fresh folder), and the median is
reported: on this shared 2-core machine one cold compile varies by 10-20% between runs. The
session is counted on the first warm run.

The warm cache folder is the union of the configurations' cold folders (Inductor's cache
entries are named by content hashes, so they merge without conflicts). `wavespeed` runs
with residual_diff_threshold=0 (nothing is skipped: this measures compiling, not caching).
One intra-op thread per process (on a shared 2-core machine two OpenMP threads mostly wait
on each other); Inductor's compile workers are its default.

    python benchmarks/compile_time.py --json benchmarks/results/compile-time-cpu.json \\
        --md benchmarks/results/compile-time-cpu.md --plot benchmarks/results/compile-time-cpu.png

On a GPU (`--device cuda`: bf16, the GPU synchronized before and after every timed call;
`benchmarks/gpu.sh` runs it), `--scale released` gives the blocks FLUX.1's and SD3.5
medium's widths at 1024x1024, `--configs` can add `inductor-cudagraphs wavespeed-cudagraphs`
(CUDA graphs, mode="reduce-overhead"; each compared with the Inductor of its setting), and
`--no-warm` leaves out the warm compiles and the session. Every configuration's first
result is compared with the eager model's (relative L2, `error vs eager`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import wavepass  # registers "wavespeed" also where the package is not installed (a GPU machine)

CONFIGS = ("inductor", "repeated_blocks", "wavespeed")
# CUDA graphs (mode="reduce-overhead"), on a GPU only: `--configs` names them
CUDA_GRAPH_CONFIGS = ("inductor-cudagraphs", "wavespeed-cudagraphs")
# name -> (architecture, depth): the issue's medium depths and the released models' depths
# (FLUX.1: 19 dual + 38 single blocks; SD3.5 medium: 24 blocks).
MODELS = {
    "flux-24": ("flux", dict(num_layers=8, num_single_layers=16)),
    "flux-57": ("flux", dict(num_layers=19, num_single_layers=38)),
    "sd3-12": ("sd3", dict(num_layers=12)),
    "sd3-24": ("sd3", dict(num_layers=24)),
}
QUICK = {
    "flux-7": ("flux", dict(num_layers=3, num_single_layers=4)),
    "sd3-4": ("sd3", dict(num_layers=4)),
}


@dataclass(frozen=True)
class Scale:
    """Widths and sequence lengths: `small` (a 2-core CPU steps a model in tens of ms) or
    `released` (FLUX.1's and SD3.5 medium's widths at 1024x1024, 512 and 333 text tokens:
    for a GPU)."""

    width: dict  # architecture -> the blocks' width arguments
    sides: dict  # architecture -> latent sides (patches for FLUX): the session's resolutions
    text_tokens: dict  # architecture -> text tokens


SCALES = {
    "small": Scale(
        width={"flux": dict(attention_head_dim=16, num_attention_heads=4, axes_dims_rope=(4, 6, 6)),
               "sd3": dict(attention_head_dim=16, num_attention_heads=4)},
        sides={"flux": (16, 24, 32), "sd3": (16, 24, 32)}, text_tokens={"flux": 16, "sd3": 16}),
    "released": Scale(
        width={"flux": dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56)),
               "sd3": dict(attention_head_dim=64, num_attention_heads=24)},
        sides={"flux": (64, 48, 32), "sd3": (128, 96, 64)}, text_tokens={"flux": 512, "sd3": 333}),
}


@dataclass(frozen=True)
class Setup:
    """Where and at what size a child process measures."""

    scale: Scale
    device: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32

    def build(self, name: str, depth: dict) -> torch.nn.Module:
        """A random-weight diffusers denoiser of the `name` architecture (made on the device)."""
        import diffusers

        torch.manual_seed(0)
        with torch.device(self.device):
            if name == "flux":
                model = diffusers.FluxTransformer2DModel(
                    patch_size=1, in_channels=16, joint_attention_dim=64, pooled_projection_dim=32,
                    guidance_embeds=False, **depth, **self.scale.width[name])
            else:
                model = diffusers.SD3Transformer2DModel(
                    sample_size=32, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=64,
                    caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=64,
                    **depth, **self.scale.width[name])
                model._repeated_blocks = ["JointTransformerBlock"]  # diffusers lists none for SD3
        return model.to(self.dtype).eval()

    def inputs(self, name: str, resolution: int, prompt: int) -> dict:
        """Keyword arguments of one call at the scale's `resolution`-th latent side; `prompt`
        seeds the text states."""
        side, tokens = self.scale.sides[name][resolution], self.scale.text_tokens[name]
        gen = torch.Generator().manual_seed(prompt)
        call = dict(encoder_hidden_states=torch.randn(1, tokens, 64, generator=gen),
                    pooled_projections=torch.randn(1, 32, generator=gen))
        if name == "sd3":
            call.update(hidden_states=torch.randn(1, 16, side, side, generator=gen), timestep=torch.tensor([500.0]))
        else:
            ids = torch.zeros(side, side, 3)
            ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
            call.update(hidden_states=torch.randn(1, side * side, 16, generator=gen), timestep=torch.tensor([0.5]),
                        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(tokens, 3))
        return {k: v.to(self.device, self.dtype) for k, v in call.items()} | {"return_dict": False}

    def timed(self, fn) -> float:
        """Seconds until `fn`'s work is done (on a GPU: synchronized before and after)."""
        synchronize = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - started


def compiled(model: torch.nn.Module, config: str):
    backend, _, cudagraphs = config.partition("-")
    mode = "reduce-overhead" if cudagraphs else None
    if backend == "inductor":
        return torch.compile(model, backend="inductor", mode=mode)
    if backend == "repeated_blocks":
        model.compile_repeated_blocks(backend="inductor")
        return model
    from torch._inductor import list_mode_options  # torch.compile takes options= or mode=, not both

    return torch.compile(model, backend="wavespeed",
                         options={"residual_diff_threshold": 0.0, "inductor": list_mode_options(mode) if mode else {}})


def lora_change(model: torch.nn.Module, rank: int = 4) -> None:
    """What a LoRA loader does: fuse B @ A into the attention weights in place (to_q), and
    replace others by new same-shape parameters (to_k)."""
    gen = torch.Generator().manual_seed(7)
    for module_name, module in model.named_modules():
        if module_name.endswith("attn.to_q"):
            out_f, in_f = module.weight.shape
            delta = 0.01 * torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen)
            module.weight.add_(delta.to(module.weight))
        elif module_name.endswith("attn.to_k"):
            module.weight = torch.nn.Parameter(module.weight.detach() * 1.01)


def child(kind: str, model_name: str, configs: list[str], args) -> dict:
    """One measurement (`cold`, `warm` or `steady`) in this (fresh) process."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    setup = Setup(SCALES[args.scale], args.device)
    probe_s = 0.0
    if args.device == "cpu":
        torch.set_num_threads(1)  # 2 OpenMP threads on a shared 2-core machine wait on each other
        probe_s = setup.timed(_probe_vec_isa)
    name, depth = (QUICK if args.quick else MODELS)[model_name]
    call = setup.inputs(name, 0, prompt=0)
    with torch.no_grad():
        if kind == "steady":
            return steady(setup, name, depth, configs, call, args.steps, args.repeats)
        (config,) = configs
        model = setup.build(name, depth)
        fn = compiled(model, config)
        result = {"first_call_s": setup.timed(lambda: fn(**call)), "vec_isa_probe_s": probe_s,
                  "dynamo_tracing_s": sum(compilation_time_metrics.get("bytecode_tracing", [])),
                  "wavepass": dict(counters["wavepass"])}
        if kind == "warm":  # "first": the first call only
            before = counters["stats"]["unique_graphs"]
            try:
                result["session_s"] = setup.timed(lambda: run_session(setup, name, model, fn))
            except Exception as exc:  # reported in the table, the other rows still run
                result["session_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            result["session_new_graphs"] = counters["stats"]["unique_graphs"] - before
    return result


def _probe_vec_isa() -> None:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    pick_vec_isa()


def steady(setup: Setup, name: str, depth: dict, configs: list[str], call: dict, steps: int, repeats: int) -> dict:
    """ms per call of each configuration, timed in turns: each turn's median and fastest
    call, by round (see the module docstring); and each configuration's first result's
    distance from the eager model's (relative L2)."""
    fns, errors, reference = {}, {}, None
    for config in configs:
        model = setup.build(name, depth)
        if reference is None:
            reference = model(**call)[0].float()
        fns[config] = compiled(model, config)
        result = fns[config](**call)[0].float()
        errors[config] = (torch.linalg.vector_norm(result - reference) / torch.linalg.vector_norm(reference)).item()
    turns: dict = {"median": {c: [] for c in configs}, "best": {c: [] for c in configs}, "error_vs_eager": errors}
    for _ in range(repeats):
        for config, fn in fns.items():
            times = [1000 * setup.timed(lambda: fn(**call)) for _ in range(steps)]
            turns["median"][config].append(statistics.median(times))
            turns["best"][config].append(min(times))
    return turns


def run_session(setup: Setup, name: str, model: torch.nn.Module, fn) -> None:
    for prompt in (1, 2, 3):
        fn(**setup.inputs(name, 0, prompt))
    lora_change(model)
    fn(**setup.inputs(name, 0, 1))
    for resolution in (1, 2):
        fn(**setup.inputs(name, resolution, 1))


def spawn(kind: str, model_name: str, configs: list[str], cache_dir: str, args) -> dict:
    command = [sys.executable, __file__, "--child", kind, model_name, ",".join(configs),
               "--steps", str(args.steps), "--repeats", str(args.repeats),
               "--device", args.device, "--scale", args.scale] + ["--quick"] * args.quick
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}/{kind}/{configs} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    models = QUICK if args.quick else MODELS
    results: dict = {"torch": torch.__version__, "wavepass": wavepass.__version__, "cpus": os.cpu_count(), "device": _device_name(args.device),
                     "scale": args.scale, "load_before": os.getloadavg(), "quick": args.quick,
                     "steps": args.steps, "repeats": args.repeats, "sizes": models, "models": {}}
    for model_name in args.models or list(models):
        rows = results["models"][model_name] = {}
        with tempfile.TemporaryDirectory(prefix=f"wavepass-{model_name}-") as work:
            warm_dir = os.path.join(work, "warm")
            colds: dict[str, list[dict]] = {config: [] for config in args.configs}
            for run in range(args.compile_runs):  # configs interleaved: A, B, C, A, B, C, ...
                for config in args.configs:
                    cold_dir = os.path.join(work, f"{config}-{run}")
                    colds[config].append(spawn("cold", model_name, [config], cold_dir, args))
                    shutil.copytree(cold_dir, warm_dir, dirs_exist_ok=True)
                    shutil.rmtree(cold_dir)
                    print(f"{model_name:8s} {config:16s} cold {colds[config][-1]['first_call_s']:.1f} s",
                          file=sys.stderr, flush=True)
            for config, runs in colds.items():
                rows[config] = {"cold_compile_s": _median(runs, "first_call_s"),
                                "cold_compile_runs_s": [r["first_call_s"] for r in runs],
                                "vec_isa_probe_s": _median(runs, "vec_isa_probe_s"),
                                "dynamo_tracing_s": _median(runs, "dynamo_tracing_s"), "wavepass": runs[0]["wavepass"]}
            warms: dict[str, list[dict]] = {config: [] for config in args.configs}
            for run in range(0 if args.no_warm else args.compile_runs):
                for config in args.configs:
                    warms[config].append(spawn("warm" if run == 0 else "first", model_name, [config], warm_dir, args))
            for config, runs in warms.items():
                if runs:  # the first warm run also ran the session
                    rows[config].update(warm_compile_s=_median(runs, "first_call_s"),
                                        warm_compile_runs_s=[r["first_call_s"] for r in runs],
                                        session_new_graphs=runs[0]["session_new_graphs"],
                                        session_s=runs[0].get("session_s"), session_error=runs[0].get("session_error"))
            steadies = _steadies(model_name, warm_dir, args)
        for config, row in rows.items():
            row["cold_vs_inductor"] = row["cold_compile_s"] / rows[_baseline(config)]["cold_compile_s"]
        _add_per_step(model_name, rows, steadies)
    results["load_after"] = os.getloadavg()
    return results


def measure_steps_again(results: dict, args) -> dict:
    """Measure per-step times again for the models of earlier `results`, leaving their compile
    measurements as they are (for a change of the per-step protocol alone): each
    configuration compiles once into a fresh folder (not timed), then `steady` as in
    `measure`. The results say when this was done and under what load."""
    rerun = {"at": time.strftime("%Y-%m-%d %H:%M"), "steps": args.steps, "repeats": args.repeats,
             "load_before": os.getloadavg()}
    for model_name, rows in results["models"].items():
        with tempfile.TemporaryDirectory(prefix=f"wavepass-{model_name}-") as warm_dir:
            for config in args.configs:
                spawn("first", model_name, [config], warm_dir, args)
            steadies = _steadies(model_name, warm_dir, args)
        _add_per_step(model_name, rows, steadies)
    rerun["load_after"] = os.getloadavg()
    results["per_step_measured_again"] = rerun
    return results


def _steadies(model_name: str, warm_dir: str, args) -> list[dict]:
    """`steady` in two processes that load the configurations in opposite orders."""
    return [spawn("steady", model_name, order, warm_dir, args) for order in (args.configs, args.configs[::-1])]


def _add_per_step(model_name: str, rows: dict, steadies: list[dict]) -> None:
    """Each configuration's per-step figures into its row (`_per_step`); the row, on stderr."""
    for config, row in rows.items():
        row.update(_per_step(steadies, config))
        print(f"{model_name:8s} {config:20s} {json.dumps(row)}", file=sys.stderr, flush=True)


def _per_step(steadies: list[dict], config: str) -> dict:
    """ms per step (median of all turns' medians) and the median of the rounds' ratios to
    its Inductor (the one with the same CUDA graphs setting), by turns' medians and by turns'
    fastest calls; the first result's distance from eager's."""
    baseline = _baseline(config)

    def ratios(kind: str) -> list[float]:
        return [mine / theirs for steady in steadies for mine, theirs in zip(steady[kind][config], steady[kind][baseline])]

    return {"ms_per_step": statistics.median(m for steady in steadies for m in steady["median"][config]),
            "step_vs_inductor": statistics.median(ratios("median")),
            "ms_per_step_best": statistics.median(m for steady in steadies for m in steady["best"][config]),
            "best_step_vs_inductor": statistics.median(ratios("best")),
            "error_vs_eager": max(steady["error_vs_eager"][config] for steady in steadies)}


def _baseline(config: str) -> str:
    """Plain Inductor with the same CUDA graphs setting as `config`."""
    return config.replace(config.split("-")[0], "inductor", 1)


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def markdown(results: dict) -> str:
    """The table; a figure a row does not have (warm compiles or a session not run) is `-`."""
    device = results.get("device", "cpu")
    load = (f", load average before/after {results['load_before'][0]:.1f}/{results['load_after'][0]:.1f}"
            if results.get("load_after") else "")
    lines = [f"torch {results['torch']}, {device}, {results['cpus']} CPUs{load}"
             + (" (--quick sizes)" if results["quick"] else f" ({results.get('scale', 'small')} widths)")
             + _probe(results) + _again(results), "",
             "| model | config | cold compile (s) | vs inductor | of it Dynamo (s) | warm compile (s) "
             "| ms/step | vs inductor | fastest call vs inductor | error vs eager | new graphs in session "
             "| blocks / block graphs |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, rows in results["models"].items():
        for config, row in rows.items():
            counts = row.get("wavepass", {})
            blocks = f"{counts['blocks']} / {counts['block_graphs']}" if counts.get("blocks") else "-"
            session = _figure(row, "session_new_graphs", "") + (" (failed)" if row.get("session_error") else "")
            lines.append(
                f"| {name} | {config} | {_figure(row, 'cold_compile_s', '.1f')} "
                f"| {_figure(row, 'cold_vs_inductor', '.2f', 'x')} | {_figure(row, 'dynamo_tracing_s', '.1f')} "
                f"| {_figure(row, 'warm_compile_s', '.1f')} | {row['ms_per_step']:.2f} "
                f"| {row['step_vs_inductor']:.3f}x | {row['best_step_vs_inductor']:.3f}x "
                f"| {_figure(row, 'error_vs_eager', '.1e')} | {session} | {blocks} |")
    return "\n".join(lines) + "\n"


def _figure(row: dict, key: str, spec: str, unit: str = "") -> str:
    return "-" if row.get(key) is None else f"{row[key]:{spec}}{unit}"


def _probe(results: dict) -> str:
    probes = [row["vec_isa_probe_s"] for rows in results["models"].values() for row in rows.values()
              if row.get("vec_isa_probe_s")]
    if not probes:
        return ""
    return (f"; Inductor's one-time probe of the CPU's vector instructions, not counted in cold "
            f"compile: {statistics.median(probes):.1f} s")


def _again(results: dict) -> str:
    again = results.get("per_step_measured_again")
    if not again:
        return ""
    rounds = f", {again['repeats']} rounds" if "repeats" in again else ""
    return (f"; per-step times measured again on {again['at']} (`--steps-again`{rounds}), load "
            f"average before/after {again['load_before'][0]:.1f}/{again['load_after'][0]:.1f}")


def plot(results: dict, path: str) -> None:
    """Cold compile time against the number of blocks, one line per architecture and config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, arch in zip(axes, ("flux", "sd3")):
        names = [n for n in results["models"] if results["sizes"][n][0] == arch]
        depth = {n: sum(v for k, v in results["sizes"][n][1].items() if k.startswith("num_") and k.endswith("layers"))
                 for n in names}
        for config in [c for c in CONFIGS if all("cold_compile_s" in results["models"][n].get(c, {}) for n in names)]:
            xs = [depth[n] for n in names]
            ys = [results["models"][n][config]["cold_compile_s"] for n in names]
            ax.plot(xs, ys, marker="o", label=config)
        dynamo = [results["models"][n]["inductor"]["dynamo_tracing_s"] for n in names]
        ax.plot([depth[n] for n in names], dynamo, linestyle=":", color="grey", label="of it: Dynamo tracing")
        ax.set_title(f"{arch}: cold compile")
        ax.set_xlabel("blocks")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds to the first result (fresh Inductor cache)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models (development)")
    parser.add_argument("--models", nargs="+", help=f"default: all of {sorted(MODELS)} ({sorted(QUICK)} with --quick)")
    parser.add_argument("--steps", type=int, default=20, help="timed calls in a row per turn")
    parser.add_argument("--repeats", type=int, default=30, help="rounds of turns")
    parser.add_argument("--compile-runs", type=int, default=3,
                        help="cold and warm compiles per config (median reported)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--md", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH", help="PNG of cold compile time against depth (matplotlib)")
    parser.add_argument("--steps-again", action="store_true",
                        help="measure per-step times again for the models in --json, keep its compile times")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs in bf16, cpu in fp32")
    parser.add_argument("--scale", choices=sorted(SCALES), default="small",
                        help="widths and sequence lengths (see `Scale`); released: for a GPU")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS + CUDA_GRAPH_CONFIGS, default=list(CONFIGS),
                        help="configurations (each is compared with the Inductor of its CUDA graphs setting)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the warm compiles and the scripted session (for a short GPU lease)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "CONFIGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    missing = {_baseline(c) for c in args.configs} - set(args.configs)
    if missing:
        parser.error(f"{', '.join(sorted(missing))} must be measured too: the other rows' baseline")
    if args.child:
        kind, model_name, configs = args.child
        print(json.dumps(child(kind, model_name, configs.split(","), args)))
        return
    if args.steps_again:
        with open(args.json) as f:
            results = measure_steps_again(json.load(f), args)
    else:
        results = measure(args)
    table = markdown(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()

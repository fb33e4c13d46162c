"""Compile time, per-step time and recompiles: `wavespeed` vs plain Inductor vs diffusers'
`compile_repeated_blocks()`, on a medium Flux-architecture model and on SD3's architecture.

Every configuration compiles in its own subprocess (a fresh Dynamo):

* cold    -- a fresh, empty TORCHINDUCTOR_CACHE_DIR: time of the first call (compile + run);
* warm    -- a new subprocess on the same cache folder: first call again, then the median
             time per call over `--steps` calls, `--repeats` times (median of the medians);
* session -- in the warm subprocess, a scripted session counted with Dynamo's counters:
             3 prompts (new encoder states, same shapes), a LoRA change (weights changed in
             place with `p.add_(B @ A)`, then parameters replaced by new same-shape
             `nn.Parameter`s), a second and a third resolution. Compiled without `dynamic=`
             (torch's default), so the second resolution makes Dynamo recompile once with
             dynamic sizes, which the third reuses; every other recompile counts against us.

`wavespeed` runs with residual_diff_threshold=0 (no step is skipped: this measures compiling,
not caching). All configurations of one model run on the same machine in one invocation,
with one intra-op thread (on a shared 2-core machine two OpenMP threads mostly wait on each
other: a step took 10x longer).

    python benchmarks/compile_time.py --json benchmarks/results/compile-time-cpu.json \\
        --md benchmarks/results/compile-time-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = ("inductor", "repeated_blocks", "wavespeed")
MODELS = {
    # 8 dual + 16 single blocks, FLUX's layout at a width a 2-core CPU steps in ~0.1 s
    "flux": dict(num_layers=8, num_single_layers=16, attention_head_dim=16, num_attention_heads=4,
                 axes_dims_rope=(4, 6, 6)),
    "sd3": dict(num_layers=12, attention_head_dim=16, num_attention_heads=4),
}
QUICK = {
    "flux": dict(num_layers=3, num_single_layers=4, attention_head_dim=16, num_attention_heads=4,
                 axes_dims_rope=(4, 6, 6)),
    "sd3": dict(num_layers=4, attention_head_dim=16, num_attention_heads=4),
}
SIDES = (16, 24, 32)  # latent sides (in patches for FLUX): the session's three resolutions


def build(name: str, sizes: dict) -> torch.nn.Module:
    """A random-weight diffusers denoiser of the `name` architecture."""
    import diffusers

    torch.manual_seed(0)
    if name == "flux":
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, joint_attention_dim=64, pooled_projection_dim=32,
            guidance_embeds=False, **sizes)
    else:
        model = diffusers.SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=64,
            caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=64, **sizes)
        model._repeated_blocks = ["JointTransformerBlock"]  # diffusers lists none for SD3
    return model.eval()


def inputs(name: str, side: int, prompt: int) -> dict:
    """Keyword arguments of one call at latent side `side`; `prompt` seeds the text states."""
    gen = torch.Generator().manual_seed(prompt)
    text = dict(encoder_hidden_states=torch.randn(1, 16, 64, generator=gen),
                pooled_projections=torch.randn(1, 32, generator=gen))
    if name == "sd3":
        return dict(hidden_states=torch.randn(1, 16, side, side, generator=gen),
                    timestep=torch.tensor([500.0]), return_dict=False, **text)
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    return dict(hidden_states=torch.randn(1, side * side, 16, generator=gen),
                timestep=torch.tensor([0.5]), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(16, 3), return_dict=False, **text)


def compiled(model: torch.nn.Module, config: str):
    if config == "inductor":
        return torch.compile(model, backend="inductor")
    if config == "repeated_blocks":
        model.compile_repeated_blocks(backend="inductor")
        return model
    return torch.compile(model, backend="wavespeed", options={"residual_diff_threshold": 0.0})


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def lora_change(model: torch.nn.Module, rank: int = 4) -> None:
    """What a LoRA loader does: fuse B @ A into the attention weights in place (to_q), and
    replace others by new same-shape parameters (to_k)."""
    gen = torch.Generator().manual_seed(7)
    for module_name, module in model.named_modules():
        if module_name.endswith("attn.to_q"):
            out_f, in_f = module.weight.shape
            module.weight.add_(0.01 * torch.randn(out_f, rank, generator=gen) @ torch.randn(rank, in_f, generator=gen))
        elif module_name.endswith("attn.to_k"):
            module.weight = torch.nn.Parameter(module.weight.detach() * 1.01)


def child(name: str, config: str, quick: bool, steps: int, repeats: int, session: bool) -> dict:
    """One configuration in this (fresh) process: first call, per-step time, session."""
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)  # 2 OpenMP threads on a shared 2-core machine wait on each other
    model = build(name, (QUICK if quick else MODELS)[name])
    fn = compiled(model, config)
    call = inputs(name, SIDES[0], prompt=0)
    with torch.no_grad():
        result = {"first_call_s": timed(lambda: fn(**call))}
        medians = [statistics.median(timed(lambda: fn(**call)) for _ in range(steps)) for _ in range(repeats)]
        result["ms_per_step"] = 1000 * statistics.median(medians)
        if session:
            before = counters["stats"]["unique_graphs"]
            try:
                result["session_s"] = timed(lambda: run_session(name, model, fn))
            except Exception as exc:  # reported in the table, the other rows still run
                result["session_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            result["session_new_graphs"] = counters["stats"]["unique_graphs"] - before
    result["wavepass"] = dict(counters["wavepass"])
    return result


def run_session(name: str, model: torch.nn.Module, fn) -> None:
    for prompt in (1, 2, 3):
        fn(**inputs(name, SIDES[0], prompt))
    lora_change(model)
    fn(**inputs(name, SIDES[0], 1))
    for side in SIDES[1:]:
        fn(**inputs(name, side, 1))


def spawn(name: str, config: str, cache_dir: str, args, session: bool) -> dict:
    command = [sys.executable, __file__, "--child", name, config, "--steps", str(args.steps),
               "--repeats", str(args.repeats)] + ["--quick"] * args.quick + ["--session"] * session
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name}/{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    results: dict = {"torch": torch.__version__, "cpus": os.cpu_count(),
                     "load_before": os.getloadavg(), "quick": args.quick,
                     "sizes": QUICK if args.quick else MODELS, "models": {}}
    for name in args.models:
        rows = results["models"][name] = {}
        for config in CONFIGS:
            with tempfile.TemporaryDirectory(prefix=f"wavepass-{name}-{config}-") as cache_dir:
                cold = spawn(name, config, cache_dir, args, session=False)
                warm = spawn(name, config, cache_dir, args, session=True)
            rows[config] = {"cold_compile_s": cold["first_call_s"], "warm_compile_s": warm["first_call_s"],
                            "ms_per_step": warm["ms_per_step"], "cold_ms_per_step": cold["ms_per_step"],
                            "session_new_graphs": warm["session_new_graphs"],
                            "session_s": warm.get("session_s"), "session_error": warm.get("session_error"),
                            "wavepass": cold["wavepass"]}
            print(f"{name:5s} {config:16s} {json.dumps(rows[config])}", file=sys.stderr, flush=True)
        base = rows["inductor"]
        for row in rows.values():
            row["cold_vs_inductor"] = row["cold_compile_s"] / base["cold_compile_s"]
            row["step_vs_inductor"] = row["ms_per_step"] / base["ms_per_step"]
    results["load_after"] = os.getloadavg()
    return results


def markdown(results: dict) -> str:
    lines = [f"torch {results['torch']}, {results['cpus']} CPUs, load average before/after "
             f"{results['load_before'][0]:.1f}/{results['load_after'][0]:.1f}"
             + (" (--quick sizes)" if results["quick"] else ""), "",
             "| model | config | cold compile (s) | vs inductor | warm compile (s) | ms/step | vs inductor "
             "| new graphs in session | compiled block graphs / blocks |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, rows in results["models"].items():
        for config, row in rows.items():
            counts = row["wavepass"]
            blocks = f"{counts['block_graphs']} / {counts['blocks']}" if counts else "-"
            lines.append(
                f"| {name} | {config} | {row['cold_compile_s']:.1f} | {row['cold_vs_inductor']:.2f}x "
                f"| {row['warm_compile_s']:.1f} | {row['ms_per_step']:.1f} | {row['step_vs_inductor']:.3f}x "
                f"| {row['session_new_graphs']}{' (failed)' if row['session_error'] else ''} | {blocks} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models (development)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--md", metavar="PATH")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--session", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.quick, args.steps, args.repeats, args.session)))
        return
    results = measure(args)
    table = markdown(results)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()

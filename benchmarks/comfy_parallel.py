"""Parallel Model (wavespeed) in ComfyUI: time per step on 1 vs N devices, skipped steps, and
the difference to the one-device latents.

    python benchmarks/comfy_parallel.py --devices cuda:0,cuda:1 --unet models/diffusion_models/flux1-dev.safetensors
    python benchmarks/comfy_parallel.py --devices cuda:0,cuda:1,cuda:2,cuda:3 --compile
    PYTHONPATH=tests python benchmarks/comfy_parallel.py --devices cpu,cpu --setup comfy_support:load_nodes

Each configuration runs the same KSampler workflow (euler, simple, seed 0) through Apply First
Block Cache (and Compile Model+ with --compile), once to warm up (compile), then timed. Without
--unet the model is a random FLUX-shaped model (ComfyUI's own Flux class, --width/--depth), and
the conditioning is random: this measures speed and agreement, not images. On a CPU
(`--devices cpu,cpu`, gloo) it shows correctness only: the same skipped steps and latents within
rounding. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", required=True, help="e.g. cuda:0,cuda:1 (ComfyUI's device first)")
    parser.add_argument("--comfyui", default=str(ROOT / ".cache" / "comfyui" / "ComfyUI"), help="ComfyUI's folder")
    parser.add_argument("--unet", help="a FLUX.1 diffusion model file (default: a random FLUX-shaped model)")
    parser.add_argument("--width", type=int, default=256, help="hidden size of the random model (heads of 64)")
    parser.add_argument("--depth", type=int, default=4, help="double blocks of the random model (2x single)")
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threshold", type=float, default=0.12)
    parser.add_argument("--compile", action="store_true", help="add Compile Model+ (Inductor)")
    parser.add_argument("--setup", help="module:function that this process and every worker run before "
                                        "importing ComfyUI (this repository's CPU test set-up: "
                                        "comfy_support:load_nodes, with PYTHONPATH=tests)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "comfy-parallel"))
    return parser.parse_args()


def load_comfyui(folder: str, devices: list[str], setup: str | None) -> None:
    if setup:
        module, _, function = setup.partition(":")
        getattr(importlib.import_module(module), function)()
    sys.path.insert(0, folder)
    from comfy.cli_args import args

    args.cpu = torch.device(devices[0]).type == "cpu"
    args.use_pytorch_cross_attention = True


def build_model(options):
    """A ModelPatcher of FLUX.1 (a file) or of a random FLUX-shaped model, and its context widths."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    if options.unet:
        patcher = comfy.sd.load_diffusion_model(options.unet)
    else:
        config = comfy.supported_models.Flux({
            "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": options.width, "mlp_ratio": 4.0, "num_heads": options.width // 64,
            "depth": options.depth, "depth_single_blocks": 2 * options.depth, "axes_dim": [16, 24, 24],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [],
        })
        dtype = torch.bfloat16 if torch.device(options.devices[0]).type == "cuda" else torch.float32
        config.set_inference_dtype(dtype, None)
        device = comfy.model_management.get_torch_device()
        model = config.get_model({}, device=device)
        generator = torch.Generator(device="cpu").manual_seed(0)
        with torch.no_grad():  # ComfyUI leaves weights to the checkpoint: fan-in scaled normals
            for name, p in model.diffusion_model.named_parameters():
                noise = torch.randn(p.shape, generator=generator)
                if p.ndim > 1:
                    p.copy_(noise / p[0].numel() ** 0.5)
                else:  # norm scales about 1, biases small
                    p.copy_(noise * 0.1 + (1.0 if name.endswith(("scale", "weight")) else 0.0))
            # as a trained model's, the modulation changes smoothly from step to step: the
            # timestep and guidance MLPs see only the sinusoids that turn slowly over sampling
            for layer in (model.diffusion_model.time_in.in_layer, model.diffusion_model.guidance_in.in_layer):
                half = layer.in_features // 2
                slow = (torch.pow(10000.0, -torch.arange(half) / half) * 1000 <= 10.0).to(layer.weight.dtype)
                layer.weight.mul_(torch.cat([slow, slow]).to(layer.weight.device))
        model.eval()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    config = patcher.model.model_config.unet_config
    return patcher, config.get("context_in_dim", 4096), config.get("vec_in_dim", 768)


def run(patcher, positive, options) -> tuple[torch.Tensor, float]:
    """KSampler's code path once; (latents, seconds)."""
    import nodes

    latent = {"samples": torch.zeros(1, 16, options.size // 8, options.size // 8)}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    samples = nodes.common_ksampler(patcher, 0, options.steps, 1.0, "euler", "simple", positive, positive,
                                    latent)[0]["samples"]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return samples, time.perf_counter() - started


def main() -> None:
    options = arguments()
    options.devices = [d.strip() for d in options.devices.split(",")]
    load_comfyui(options.comfyui, options.devices, options.setup)
    import wavepass
    import wavepass_comfy.parallel as parallel
    from wavepass_comfy.nodes import ApplyFirstBlockCache, CompileModelPlus, ParallelModel

    parallel.worker_setup = options.setup
    patcher, context_dim, pooled_dim = build_model(options)
    generator = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 256, context_dim, generator=generator),
                 {"pooled_output": torch.randn(1, pooled_dim, generator=generator), "guidance": 3.5}]]
    module = patcher.model.diffusion_model
    rows, reference = [], None
    for devices in ([options.devices[0]], options.devices):
        model = ApplyFirstBlockCache.execute(model=patcher, object_to_patch="diffusion_model",
                                             residual_diff_threshold=options.threshold, start=0.0, end=1.0,
                                             max_consecutive_cache_hits=-1).result[0]
        if options.compile:
            model = CompileModelPlus.execute(model=model, object_to_patch="diffusion_model", mode="default",
                                             dynamic="auto", fullgraph=False, options="").result[0]
        if len(devices) > 1:
            model = ParallelModel.execute(model=model, devices=",".join(devices), backend="auto",
                                          timeout_s=600).result[0]
        with torch.no_grad():
            run(model, positive, options)  # warm-up: workers start, compiles
            samples, seconds = run(model, positive, options)
        stats = wavepass.stats(module)
        reference = samples if reference is None else reference
        rows.append({"devices": len(devices), "device_list": devices, "ms_per_step": 1000 * seconds / options.steps,
                     "skipped": stats.hits, "calls": stats.calls, "decisions": list(stats.decisions),
                     "max_abs_diff_vs_1": float((samples.float().cpu() - reference.float().cpu()).abs().max())})
    parallel.shutdown()
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(options).items() if k != "setup"}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "runs": rows}, indent=2) + "\n")
    table = ["| devices | ms/step | skipped | same decisions as 1 | max abs diff vs 1 |", "| ---: | ---: | ---: | --- | ---: |"]
    for row in rows:
        same = "yes" if row["decisions"] == rows[0]["decisions"] else "NO"
        table.append(f"| {row['devices']} | {row['ms_per_step']:.1f} | {row['skipped']}/{row['calls']} | {same} | "
                     f"{row['max_abs_diff_vs_1']:.2e} |")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

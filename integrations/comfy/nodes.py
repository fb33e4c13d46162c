"""The wavepass ComfyUI nodes (V3 schema), category `wavespeed`.

    Apply First Block Cache   (WavepassApplyFirstBlockCache)  MODEL -> MODEL
    Compile Model+            (WavepassCompileModelPlus)      MODEL -> MODEL
    Parallel Model (wavespeed) (WavepassParallelModel)        MODEL -> MODEL (parallel.py, sequence_shards.py)

Each returns a clone of its input MODEL with its settings added (the input is never
changed). Chained in either order they make one `torch.compile(..., backend="wavespeed")`
step: caching and Inductor compilation together. Only Compile Model+'s settings key compiled
code; the cache node's settings are read by the compiled program at run time, so changing
them (or removing the cache node) compiles nothing. Apply First Block Cache alone runs the
cached model uncompiled; Compile Model+ alone compiles without skipping. Node ids carry the
`Wavepass` prefix so that they never collide with another pack's nodes of the same title.
Where compiling fails, sampling goes on with the plain model, said once (sampling.py).
"""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from wavepass import POLICIES

from . import parallel, sequence_shards
from .sampling import install, settings_of

CATEGORY = "wavespeed"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DYNAMIC = {"auto": None, "true": True, "false": False}


def _object_to_patch_input() -> io.String.Input:
    return io.String.Input(
        "object_to_patch", default="diffusion_model", advanced=True,
        tooltip="The attribute of the model (ComfyUI's BaseModel) that is compiled and cached: "
                "the diffusion model, or a submodule of it written with dots.",
    )


def _schema(node_id: str, display_name: str, description: str, inputs: list) -> io.Schema:
    """MODEL, `object_to_patch` and `inputs` in; the patched MODEL out."""
    return io.Schema(
        node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
        inputs=[io.Model.Input("model"), _object_to_patch_input(), *inputs],
        outputs=[io.Model.Output()],
    )


def _patched(model, part: str, values: dict) -> io.NodeOutput:
    """A clone of `model` with `values` as its wavepass `part` settings, wrappers installed."""
    clone = model.clone(disable_dynamic=True)
    settings_of(clone)[part] = values
    install(clone)
    return io.NodeOutput(clone)


class ApplyFirstBlockCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "WavepassApplyFirstBlockCache", "Apply First Block Cache",
            "Skips the diffusion model's remaining blocks on steps where its first block's output "
            "barely changed (First Block Cache), reusing their last residual. Chain Compile "
            "Model+ to compile it in the same step.",
            [
                io.Float.Input(
                    "residual_diff_threshold", default=0.12, min=0.0, max=1.0, step=0.001,
                    tooltip="Skip when the first block's residual changed by less than this "
                            "(relative mean absolute difference) since the last computed step. "
                            "0 never skips; higher skips more and costs quality. FLUX 0.12, "
                            "SD3.5 0.12, LTXV 0.05, HunyuanVideo 0.1, SDXL 0.2. Changing it "
                            "recompiles nothing.",
                ),
                io.Float.Input(
                    "start", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of sampling (through the model's sigmas) before which every "
                            "step computes: 0 caches from the first step.",
                ),
                io.Float.Input(
                    "end", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Fraction of sampling after which every step computes: 1 caches to "
                            "the last step.",
                ),
                io.Int.Input(
                    "max_consecutive_cache_hits", default=-1, min=-1, max=100,
                    tooltip="At most this many skipped steps in a row; -1 no limit, 0 never skip.",
                ),
                io.Combo.Input(
                    "policy", options=list(POLICIES), default="fbcache", optional=True,
                    tooltip="Which steps are skipped and what a skipped step adds. fbcache: the "
                            "residual of the last computed step (First Block Cache). taylor: "
                            "that residual extrapolated along its change between the last two "
                            "computed steps (TaylorSeer, first order; one more residual in "
                            "memory), same skipped steps. predictive: taylor's residual, and a "
                            "step is skipped while the first block's residual stays within the "
                            "threshold of its own extrapolation (more skips at equal quality on "
                            "trained models; use a lower threshold). accumulated: predictive, and a "
                            "run of skipped steps ends once their summed changes reach the threshold "
                            "(use a higher threshold). Changing it recompiles nothing.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, object_to_patch, residual_diff_threshold, start, end,
                max_consecutive_cache_hits, policy="fbcache") -> io.NodeOutput:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"Apply First Block Cache: need 0 <= start <= end <= 1, got "
                             f"start={start}, end={end}")
        return _patched(model, "cache", {
            "object_to_patch": object_to_patch,
            "residual_diff_threshold": float(residual_diff_threshold),
            "start": float(start), "end": float(end),
            "max_consecutive_cache_hits": int(max_consecutive_cache_hits),
            "policy": str(policy),
        })


class CompileModelPlus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "WavepassCompileModelPlus", "Compile Model+",
            "Compiles the diffusion model with torch.compile's `wavespeed` backend: Inductor, plus "
            "the First Block Cache of an Apply First Block Cache node before or after it, in one "
            "compile step. LoRAs and other weight patches take effect without recompiling.",
            [
                io.Combo.Input(
                    "mode", options=list(MODES), default="default",
                    tooltip="Inductor's mode: max-autotune searches kernels (slow compile, "
                            "fastest on GPUs); reduce-overhead adds CUDA graphs.",
                ),
                io.Combo.Input(
                    "dynamic", options=list(DYNAMIC), default="auto",
                    tooltip="auto: static shapes first, one dynamic recompile when a size "
                            "changes; true: dynamic from the start (no recompile per "
                            "resolution); false: recompile for every new size.",
                ),
                io.Boolean.Input(
                    "fullgraph", default=False,
                    tooltip="Never split the model at code torch.compile cannot trace (graph "
                            "breaks): at one, the model runs uncompiled, with a warning naming "
                            "it (turn this off to compile around it).",
                ),
                io.String.Input(
                    "options", default="", multiline=True,
                    tooltip='Inductor config patches as JSON, e.g. {"max_autotune": true}; '
                            "empty for none.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, object_to_patch, mode, dynamic, fullgraph, options) -> io.NodeOutput:
        return _patched(model, "compile", {
            "object_to_patch": object_to_patch,
            "mode": mode,
            "dynamic": DYNAMIC[dynamic],
            "fullgraph": bool(fullgraph),
            "inductor": _inductor_patches(options),
        })


def _inductor_patches(text: str) -> dict:
    if not text.strip():
        return {}
    try:
        patches = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Compile Model+: options must be a JSON object of Inductor config "
                         f"patches, e.g. {{\"max_autotune\": true}}: {exc}") from None
    if not isinstance(patches, dict):
        raise ValueError(f"Compile Model+: options must be a JSON object, got {text!r}")
    return patches


class ParallelModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WavepassParallelModel", display_name="Parallel Model (wavespeed)", category=CATEGORY,
            description="Samples the model on several devices (sequence parallelism: each device "
                        "holds a share of the tokens, attention is Ulysses). Composes with Apply "
                        "First Block Cache and Compile Model+ in either order. Models whose "
                        "forward follows ComfyUI's block convention (FLUX.1, Chroma, HunyuanVideo, "
                        "Qwen-Image, Wan 2.1); others are refused by name.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input(
                    "devices", default="cuda:0,cuda:1",
                    tooltip="The devices, separated by commas; the first is ComfyUI's own (it runs "
                            "the sampler), one worker process is started for each other.",
                ),
                io.Combo.Input(
                    "backend", options=["auto", "nccl", "gloo"], default="auto", advanced=True,
                    tooltip="torch.distributed backend: auto is nccl on CUDA devices, gloo otherwise.",
                ),
                io.Int.Input(
                    "timeout_s", default=300, min=5, max=3600, advanced=True,
                    tooltip="How long a device waits for the others before the run fails with an "
                            "error naming the worker (a worker that dies fails the run at once).",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, devices, backend="auto", timeout_s=300) -> io.NodeOutput:
        import comfy.model_management

        listed = parallel.parse_devices(devices)
        own = comfy.model_management.get_torch_device()
        first = torch.device(listed[0])
        if first.type != own.type or (first.type == "cuda" and first.index != own.index):
            raise parallel.ParallelRefusal(
                f"Parallel Model: the first device must be ComfyUI's own ({own}), where the "
                f"sampler runs; got {listed[0]}. Fix: list {own} first.")
        sequence_shards.check_model(model.get_model_object("diffusion_model"), len(listed))
        clone = model.clone(disable_dynamic=True)
        settings = settings_of(clone)
        settings["parallel"] = {"devices": list(listed), "backend": parallel.backend_for(listed, backend),
                                "timeout_s": float(timeout_s)}
        install(clone)  # the wavespeed wrappers' snapshot now names the devices
        parallel.install(clone, settings)
        return io.NodeOutput(clone)


NODES = [ApplyFirstBlockCache, CompileModelPlus, ParallelModel]

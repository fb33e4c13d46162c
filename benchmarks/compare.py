"""wavespeed against its peers: step caches on three Flux denoisers.

    python benchmarks/compare.py                       # CPU fp32; writes benchmarks/results/compare-cpu.*
    python benchmarks/compare.py --device cuda         # CUDA bf16; writes compare-cuda.*

Workloads (28 FlowMatch Euler steps each, one image per denoiser call):

* digits -- the class-conditional FLUX trained on scikit-learn's digits
  (`benchmarks/digits`, weights committed, 16 image tokens); samples are scored by a classifier
  trained on the same data set, so quality is a number no cache can game.
* photos -- the class-conditional FLUX trained on crops of scikit-learn's sample photographs
  (`benchmarks/photos`, weights committed, 256 image tokens: compute-bound).
* medium -- `benchmarks/demo.py`'s medium random-weight Flux (compute-bound timing).

Configurations: eager; plain Inductor; wavespeed; diffusers' `FirstBlockCacheConfig` (eager
and `torch.compile`); cache-dit's DBCache F1B0 (eager and compiled, and compiled with its
TaylorSeer calibrator); para-attn's FLUX cache as shipped (fails on diffusers 0.42: the error is
the result) and para-attn through a small labelled adapter (`para_attn_adapter`); ComfyUI's
EasyCache through a labelled adapter (`comfy_easycache`); for the policy runs (docs/performance.md),
our policies `taylor`, `predictive` and `accumulated`, diffusers' `MagCacheConfig` (one-sample
calibration), `TaylorSeerCacheConfig` (default and lite) and `SeaCacheConfig` (through a labelled
adapter, `seacache_flux_latents`), and cache-dit's DBCache F1B1 with and without TaylorSeer. Every
cache runs at each `--thresholds` value but those whose knob has another scale (`EASYCACHE_THRESHOLDS`
and the lists beside it).

Figures per configuration: median wall time per image over `--repeats` x images, speed-up over
eager (eager images run alternately with the configuration's, see `measure`), skipped steps
per image, compile time cold (a subprocess with an empty Inductor cache folder) and warm
(first image minus the median image, with the cold probe's cache), Dynamo recompiles and graph
breaks, PSNR and max error of the final latents against eager, (digits) the classifier's
accuracy on the conditioned class, and each family's measured cost of a skipped call with the
speed-up in calls it gives (`skip_cost`, `speedup_in_calls`).

Outputs under `--out` (default benchmarks/results/compare-<device>): .json, .md (docs/performance.md's
table), .png (speed vs quality) and -<workload>.png for the trained models (generated images per
configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # before cache_dit is imported

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir  # noqa: E402

import wavepass  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo  # noqa: E402
import digits  # noqa: E402
from docs_include import ROOT, include_in_docs  # noqa: E402
import photos  # noqa: E402
import plots  # noqa: E402
import trained  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLD_PROBE_THRESHOLD = 0.12  # a compiled family's cold compile is measured once, at this threshold
# The peers whose knob has another scale than First Block Cache's threshold run at these values:
# EasyCache's reuse_threshold bounds an accumulated estimate of the output's change (its node's
# default 0.2, range 0..3); MagCache's threshold bounds its accumulated magnitude error (default
# 0.06); TaylorSeerCache's knob is its cache_interval (default 5); SeaCache's threshold bounds
# its accumulated spectral relative L1 (default 0.25); ours, see ACCUMULATED_THRESHOLDS.
EASYCACHE_THRESHOLDS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)
MAGCACHE_THRESHOLDS = (0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5)
TAYLORSEER_INTERVALS = (2, 3, 4, 6)
SEACACHE_THRESHOLDS = (0.1, 0.25, 0.4, 0.6, 1.0)
# policy="accumulated" bounds a sum of First Block Cache's changes: higher thresholds, same quality
ACCUMULATED_THRESHOLDS = (0.15, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0)
# The knob that computes every call and the one that skips every call a family allows, for
# `skip_cost` (TaylorSeerCache: cache intervals)
NEVER_SKIP, ALWAYS_SKIP = 0.0, 1e9
FORCED_KNOBS = {"diffusers-taylorseer": (1, 1_000_000), "diffusers-taylorseer+compile": (1, 1_000_000),
                "diffusers-taylorseer-lite+compile": (1, 1_000_000)}
SKIP_COST_IMAGES = 5  # timed images per forced setting in `skip_cost`


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda runs in bf16, cpu in fp32")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared CPU, two-thread OpenMP is 20-40x slower "
                             "whenever another process holds a core)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.08, 0.12, 0.2])
    parser.add_argument("--workloads", nargs="+", choices=("digits", "photos", "medium"), default=["digits", "medium"])
    parser.add_argument("--digits-images", type=int, default=10, help="digits images per repeat (label = index %% 10)")
    parser.add_argument("--photos-images", type=int, default=2, help="photos images per repeat (label = index %% 2)")
    parser.add_argument("--medium-images", type=int, default=1, help="medium-model images per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the images")
    parser.add_argument("--families", nargs="+", default=None,
                        help="only these configuration families (names as in the table; eager always runs)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-compile subprocesses")
    parser.add_argument("--skip-costs", type=Path, default=None,
                        help="take each family's skipped-call cost from this earlier run's .json (per workload) "
                             "instead of measuring it (`skip_cost`): it does not depend on the step count")
    parser.add_argument("--out", type=Path, default=None, help="output path prefix")
    parser.add_argument("--append", action="store_true",
                        help="keep the other workloads of an existing <out>.json (each keeps its own run's "
                             "settings and date) and rewrite the outputs with these added")
    parser.add_argument("--cold-probe", nargs=2, metavar=("WORKLOAD", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / f"compare-{args.device}"
    return args


# ----------------------------------------------------------------------------- workloads

@dataclass
class Workload:
    name: str
    build: Callable[[], torch.nn.Module]  # a fresh denoiser (eval, on the device, in the dtype)
    conditions: list  # one dict per image, as `trained.sample` takes it
    labels: list | None = None  # conditioned class per image (the trained models)
    classifier: object = None
    model: trained.TrainedFlux | None = None  # the trained model's geometry, for its samples grid


def dtype_for(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def trained_workload(name, args, classifier=None):
    """A trained model (`digits` or `photos`); image i is class i % classes from noise seed 1000 + i."""
    model = {"digits": digits, "photos": photos}[name].MODEL
    dtype = dtype_for(args.device)
    _, label_encoder = model.load(dtype=dtype, device=args.device)
    labels = [i % model.num_classes for i in range(getattr(args, f"{name}_images"))]
    conditions = [model.make_condition(label_encoder, torch.tensor([label]), 1000 + i)
                  for i, label in enumerate(labels)]
    return Workload(name, lambda: model.load(dtype=dtype, device=args.device)[0], conditions,
                    labels, classifier, model)


def medium_workload(args):
    """demo.py's medium random Flux with its inputs (seeds 0, 1, ...)."""
    dtype = dtype_for(args.device)
    conditions = [{k: v.to(args.device, dtype) for k, v in demo.make_inputs(seed).items()}
                  for seed in range(args.medium_images)]
    return Workload("medium", lambda: trained.to_device(demo.build_model("medium", 0), args.device, dtype),
                    conditions)


def workload_named(name, args, classifier=None):
    return medium_workload(args) if name == "medium" else trained_workload(name, args, classifier)


# ----------------------------------------------------------------------------- configurations

@dataclass
class Runner:
    """How a configuration calls the denoiser: `call(**kwargs)` as FluxPipeline calls it,
    `reset()` before each image, `skipped()` the skipped calls of the last image (None: no cache).
    `calibrate(sample_one)`, where given, runs before the first image: `sample_one()` samples
    one image of the workload through `call` (MagCache's one-sample calibration)."""
    call: Callable
    reset: Callable[[], None] = lambda: None
    skipped: Callable[[], int | None] = lambda: None
    calibrate: Callable[[Callable[[], torch.Tensor]], None] | None = None


@dataclass
class Config:
    name: str
    family: str
    setup: Callable[[torch.nn.Module, float, int], Runner]  # (model, threshold, steps) -> Runner
    threshold: float | None = None
    compiled: bool = False
    note: str = ""


def eager(model, threshold, steps):
    return Runner(model)


def inductor(model, threshold, steps):
    return Runner(torch.compile(model, backend="inductor"))


def wavespeed(policy):
    """The wavespeed backend with a cache `policy` (wavepass.POLICIES)."""

    def setup(model, threshold, steps):
        compiled = torch.compile(model, backend="wavespeed",
                                 options={"residual_diff_threshold": threshold, "policy": policy})
        return Runner(compiled, lambda: wavepass.reset(compiled), lambda: wavepass.stats(compiled).hits)

    return setup


def diffusers_fbc(compiled):
    """diffusers' FirstBlockCacheConfig hooks, called as FluxPipeline does (inside
    `transformer.cache_context("cond")`). Skips are counted by wrapping the leader hook's
    decision function (it is `torch.compiler.disable`d, so this adds no graph break)."""

    def setup(model, threshold, steps):
        from diffusers import FirstBlockCacheConfig

        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        hook = model.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
        decisions = []
        hook._should_compute_remaining_blocks = _recording(hook._should_compute_remaining_blocks, decisions)
        return _hooked_runner(model, compiled, decisions)

    return setup


def _hooked_runner(model, compiled, decisions):
    """The runner of a model carrying a diffusers cache hook whose decisions (True: computed)
    are recorded in `decisions`: called as FluxPipeline calls it (inside
    `cache_context("cond")`), compiled where `compiled`, reset through diffusers."""
    fn = torch.compile(model) if compiled else model

    def call(**kwargs):
        with model.cache_context("cond"):
            return fn(**kwargs)

    def reset():
        model._reset_stateful_cache()
        decisions.clear()

    return Runner(call, reset, lambda: decisions.count(False))


def cache_dit(compiled, taylorseer=False, front=1, back=0):
    """cache-dit DBCache computing the first `front` and the last `back` blocks on every call
    (F1B0 is First Block Cache) on the transformer alone, with its first-order TaylorSeer
    calibrator where `taylorseer`; `refresh_context` starts each image, `summary` gives the
    cached steps."""

    def setup(model, threshold, steps):
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        def config():
            return DBCacheConfig(Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=threshold,
                                 max_warmup_steps=0, num_inference_steps=steps)

        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(model, cache_config=config(), calibrator_config=calibrator)
        fn = torch.compile(model) if compiled else model
        return Runner(fn, lambda: cache_dit.refresh_context(model, cache_config=config()),
                      lambda: len(cache_dit.summary(model, logging=False)[0].cached_steps))

    return setup


def diffusers_magcache(compiled):
    """diffusers' `MagCacheConfig` at its defaults but the threshold (max_skip_steps 3,
    retention_ratio 0.2), with the magnitude ratios of its calibration mode on one image of
    the workload (its first; `calibrate=True` prints them at the last step, as its docs say to
    copy them). Skips are read from the leader hook's state after each call."""

    def setup(model, threshold, steps):
        import contextlib
        import io

        from diffusers import MagCacheConfig

        fn = torch.compile(model) if compiled else model
        decisions = []

        def call(**kwargs):
            with model.cache_context("cond"):
                out = fn(**kwargs)
                decisions.append(not leader()[0].should_compute)
            return out

        def leader():
            hook = model.transformer_blocks[0]._diffusers_hook.get_hook("mag_cache_leader_block_hook")
            return hook.state_manager.get_state(), hook

        def calibrate(sample_one):
            model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                sample_one()
            ratios = json.loads(printed.getvalue().strip().splitlines()[-1])
            model.disable_cache()
            model.enable_cache(MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=ratios))

        def reset():
            model._reset_stateful_cache()
            decisions.clear()

        return Runner(call, reset, lambda: decisions.count(True), calibrate)

    return setup


def diffusers_taylorseer(compiled, lite=False):
    """diffusers' `TaylorSeerCacheConfig`: the "threshold" is its `cache_interval` (a computed
    call every that many calls after `disable_cache_before_step`, 3); first order, factors in
    float32 (its docs' example). Default mode predicts the attention outputs (the feed-forwards
    still run); `lite` (`use_lite_mode`) skips whole blocks and predicts `proj_out`. A call counts
    as skipped where the first hooked module predicted (all hooked modules decide alike)."""

    def setup(model, threshold, steps):
        from diffusers import TaylorSeerCacheConfig

        model.enable_cache(TaylorSeerCacheConfig(cache_interval=int(threshold), max_order=1,
                                                 taylor_factors_dtype=torch.float32, use_lite_mode=lite))
        hook = next(m._diffusers_hook.get_hook("taylorseer_cache") for m in model.modules()
                    if getattr(m, "_diffusers_hook", None) is not None
                    and m._diffusers_hook.get_hook("taylorseer_cache") is not None)
        decisions = []
        measure_should_compute = hook._measure_should_compute

        @torch.compiler.disable
        def recorded():
            should_compute, state = measure_should_compute()
            decisions.append(should_compute)
            return should_compute, state

        hook._measure_should_compute = recorded
        return _hooked_runner(model, compiled, decisions)

    return setup


def seacache_flux_latents(module, args, kwargs):
    """ADAPTER (ours, not diffusers'): SeaCache's `raw_vision_callback` for FLUX, which has no
    built-in one: the packed latent (batch, tokens, channels) as one (channels, 1, side, side)
    latent per image (the 2x2 packing keeps a square grid of tokens; SeaCache filters the
    spatial spectrum of what it is given)."""
    latent = kwargs["hidden_states"]
    side = math.isqrt(latent.shape[1])
    return [x.transpose(0, 1).reshape(-1, 1, side, side) for x in latent]


def diffusers_seacache(compiled):
    """diffusers' `SeaCacheConfig` at its defaults but the threshold (residual_order 1,
    retention_steps 1, cache_end_steps 1, max_consecutive_cached 2), through the labelled
    `seacache_flux_latents` adapter, with the scheduler metadata it needs passed as its docs say:
    `cache_context("cond", step_index=i, sigma=..., num_inference_steps=...)` (these models
    sample with shift 1, so the timestep FluxPipeline passes is the sigma). Skips are read from
    the leader hook's gate after each call."""

    def setup(model, threshold, steps):
        from diffusers import SeaCacheConfig
        from diffusers.hooks import sea_cache

        model.enable_cache(SeaCacheConfig(threshold=threshold, raw_vision_callback=seacache_flux_latents))
        leader = model.transformer_blocks[0]._diffusers_hook.get_hook(sea_cache._SEA_CACHE_LEADER_BLOCK_HOOK)
        fn = torch.compile(model) if compiled else model
        decisions = []

        def call(**kwargs):
            sigma = float(kwargs["timestep"][0])
            with model.cache_context("cond", step_index=len(decisions), sigma=sigma, num_inference_steps=steps):
                out = fn(**kwargs)
                decisions.append(not leader.state_manager.get_state().gate_should_compute)
            return out

        def reset():
            model._reset_stateful_cache()
            decisions.clear()

        return Runner(call, reset, lambda: decisions.count(True))

    return setup


def para_attn(adapter, compiled):
    """para-attn's First Block Cache, one cache context per image. adapter=False uses its own
    FLUX adapter (`apply_cache_on_transformer`); True uses `para_attn_adapter`."""

    def setup(model, threshold, steps):
        from para_attn.first_block_cache import utils
        from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_transformer

        (para_attn_adapter if adapter else apply_cache_on_transformer)(model)
        decisions = []
        utils.are_two_tensors_similar = _recording(_original_similar(utils), decisions)
        fn = torch.compile(model) if compiled else model
        context = []

        def call(**kwargs):
            with utils.cache_context(context[0]):
                return fn(**kwargs)

        def reset():
            context[:] = [utils.create_cache_context(residual_diff_threshold=threshold)]
            decisions.clear()

        reset()
        return Runner(call, reset, lambda: decisions.count(True))

    return setup


def para_attn_adapter(transformer):
    """ADAPTER (ours, not para-attn's): para-attn 0.3.38's FLUX adapter runs the single blocks
    as `block(hidden_states, temb=..., image_rotary_emb=...)`, an older diffusers signature
    (TypeError: missing 'encoder_hidden_states'); diffusers 0.42's single blocks take and return (encoder_hidden_states, hidden_states)
    like the dual blocks. So all blocks go, in order, into para-attn's own
    `CachedTransformerBlocks` as one dual-style list, and the transformer's forward is patched
    the way para-attn's adapter patches it. The caching logic is para-attn's, unchanged."""
    from para_attn.first_block_cache import utils

    blocks = torch.nn.ModuleList([*transformer.transformer_blocks, *transformer.single_transformer_blocks])
    cached = torch.nn.ModuleList([utils.CachedTransformerBlocks(
        blocks, None, transformer=transformer, return_hidden_states_first=False)])
    original_forward = transformer.forward

    def forward(*args, **kwargs):
        with unittest.mock.patch.object(transformer, "transformer_blocks", cached), \
                unittest.mock.patch.object(transformer, "single_transformer_blocks", torch.nn.ModuleList()):
            return original_forward(*args, **kwargs)

    transformer.forward = forward
    return transformer


def comfy_easycache(compiled):
    """ComfyUI's EasyCache, from the copy `scripts/fetch_comfyui.py` fetches, through a small
    ADAPTER (ours, not ComfyUI's): ComfyUI runs `easycache_forward_wrapper` around the diffusion
    model inside its sampler; here it wraps the transformer call, with what ComfyUI's sampler
    puts in `transformer_options` (the step's sigma, one cond uuid), a fresh holder per image
    (as its OUTER_SAMPLE wrapper makes), `skip_current_step` cleared before each call (as its
    calc_cond_batch wrapper does) and the sigma window of the node's defaults (start 0.15,
    end 0.95) from ComfyUI's own flow `ModelSamplingDiscreteFlow` (shift 1, as these models
    sample). subsample_factor is 1: the node's 8 strides a 128x128 latent, and these latents
    are 4 to 16 tokens a side, so it measures the whole input. The latent is handed over as a
    copy: EasyCache adds its cached difference to its input in place."""

    def setup(model, threshold, steps):
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        import comfy_support

        if comfy_support.load_nodes() is None:
            raise RuntimeError(f"ComfyUI is not fetched: run {comfy_support.FETCH_COMMAND}")
        import uuid

        from comfy.model_sampling import ModelSamplingDiscreteFlow
        from comfy_extras import nodes_easycache

        sampling, cond = ModelSamplingDiscreteFlow(None), uuid.uuid4()
        fn = torch.compile(model) if compiled else model
        holder = []

        def call(hidden_states, **kwargs):
            easycache = holder[0]
            easycache.skip_current_step = False
            if easycache.output_channels is None:
                easycache.output_channels = hidden_states.shape[1]
            options = {"easycache": easycache, "sigmas": kwargs["timestep"][:1], "uuids": [cond]}
            out = nodes_easycache.easycache_forward_wrapper(
                lambda x, _: fn(hidden_states=x, **kwargs)[0], hidden_states.clone(), options)
            return (out,)

        def reset():
            holder[:] = [nodes_easycache.EasyCacheHolder(threshold, 0.15, 0.95, subsample_factor=1,
                                                         offload_cache_diff=False).prepare_timesteps(sampling)]

        reset()
        return Runner(call, reset, lambda: holder[0].total_steps_skipped)

    return setup


def _original_similar(utils):
    """para-attn's `are_two_tensors_similar`, unwrapped if an earlier configuration wrapped it."""
    fn = utils.are_two_tensors_similar
    return getattr(fn, "_wrapped_original", fn)


def _recording(fn, decisions):
    """`fn` that also appends each result to `decisions`; kept out of Dynamo graphs."""

    @torch.compiler.disable
    def recorded(*args, **kwargs):
        result = fn(*args, **kwargs)
        decisions.append(bool(result))
        return result

    recorded._wrapped_original = fn
    return recorded


def configurations(thresholds, families=None):
    """Every configuration, eager first (the baseline), cache-dit last (it patches on import)."""
    cached = [
        ("wavespeed", wavespeed("fbcache"), True, ""),
        ("wavespeed-taylor", wavespeed("taylor"), True, "policy='taylor'"),
        ("wavespeed-predictive", wavespeed("predictive"), True, "policy='predictive'"),
        ("wavespeed-accumulated", wavespeed("accumulated"), True, "policy='accumulated'"),
        ("diffusers-fbc", diffusers_fbc(False), False, ""),
        ("diffusers-fbc+compile", diffusers_fbc(True), True, ""),
        ("para-attn", para_attn(False, False), False, "para-attn's own FLUX adapter"),
        ("para-attn-adapter", para_attn(True, False), False, "para-attn cache via our adapter"),
        ("para-attn-adapter+compile", para_attn(True, True), True, "para-attn cache via our adapter"),
        ("cache-dit", cache_dit(False), False, ""),
        ("cache-dit+compile", cache_dit(True), True, ""),
        ("cache-dit-taylorseer+compile", cache_dit(True, taylorseer=True), True, "TaylorSeer order 1"),
        ("cache-dit-F1B1+compile", cache_dit(True, back=1), True, "DBCache F1B1"),
        ("cache-dit-F1B1-taylorseer+compile", cache_dit(True, taylorseer=True, back=1), True,
         "DBCache F1B1, TaylorSeer order 1"),
        ("diffusers-magcache+compile", diffusers_magcache(True), True, "one-sample calibration"),
        ("diffusers-taylorseer+compile", diffusers_taylorseer(True), True, "threshold = cache_interval"),
        ("diffusers-taylorseer-lite+compile", diffusers_taylorseer(True, lite=True), True,
         "use_lite_mode, threshold = cache_interval"),
        ("diffusers-seacache+compile", diffusers_seacache(True), True, "FLUX latents via our adapter"),
        ("comfy-easycache+compile", comfy_easycache(True), True, "ComfyUI EasyCache via our adapter"),
    ]
    configs = [Config("eager", "eager", eager), Config("inductor", "inductor", inductor, compiled=True)]
    own_scales = {"para-attn": thresholds[:1],  # it fails: once is enough
                  "comfy-easycache+compile": EASYCACHE_THRESHOLDS,
                  "diffusers-magcache+compile": MAGCACHE_THRESHOLDS,
                  "diffusers-taylorseer+compile": TAYLORSEER_INTERVALS,
                  "diffusers-taylorseer-lite+compile": TAYLORSEER_INTERVALS,
                  "diffusers-seacache+compile": SEACACHE_THRESHOLDS,
                  "wavespeed-accumulated": ACCUMULATED_THRESHOLDS}
    for family, setup, compiled, note in cached:
        family_thresholds = own_scales.get(family, thresholds)
        configs += [Config(f"{family} {t:g}", family, setup, t, compiled, note) for t in family_thresholds]
    return [c for c in configs if c.family == "eager" or families is None or c.family in families]


# ----------------------------------------------------------------------------- measuring

def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def dynamo_counts():
    """(recompiles, graph breaks) since the last `reset_dynamo`."""
    recompiles = sum(len(reasons) for reasons in torch._dynamo.utils.guard_failures.values())
    return recompiles, sum(torch._dynamo.utils.counters["graph_break"].values())


def reset_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.guard_failures.clear()


def run_image(runner, cond, args):
    """One image: reset the cache, sample, return (seconds, latent, skipped calls)."""
    runner.reset()

    def go():
        latent = trained.sample(runner.call, cond, args.steps)
        synchronize(args.device)
        return latent

    seconds, latent = demo.timed(go)
    return seconds, latent, runner.skipped()


@dataclass
class Measured:
    config: Config
    first_image_s: float = math.nan
    image_times: list = field(default_factory=list)
    eager_times: list = field(default_factory=list)  # eager images timed between this one's
    latents: list = field(default_factory=list)  # final latents of the last repeat, per image
    skipped: list = field(default_factory=list)  # skipped calls per image, last repeat
    recompiles: int = 0
    graph_breaks: int = 0
    cold_compile_s: float | None = None
    skip_cost: float | None = None  # a skipped call's cost over a computed one's (skip_cost)
    skip_cost_skipped: int = 0  # skipped calls of the image that measured it
    error: str | None = None


def measure(workload, config, args, reference=None, expected=None):
    """A fresh model, one untimed-for-speed first image (compiles), then `args.repeats` timed
    passes over the workload's images. With `reference` (an eager Runner), each timed image is
    followed by the same image in eager (`eager_times`), so the speed-up is against eager
    timed in the same minutes: on a shared machine the speed of both drifts by tens of percent
    over a run. The reference must still give `expected` (eager's latents): a peer that patched
    it would make that an error. Errors become the result."""
    result = Measured(config)
    reset_dynamo()
    try:
        runner = config.setup(workload.build(), config.threshold, args.steps)
        with torch.no_grad():
            calibrate(runner, workload, args)
            result.first_image_s = run_image(runner, workload.conditions[0], args)[0]
            for _ in range(args.repeats):
                result.latents, result.skipped = [], []
                for index, cond in enumerate(workload.conditions):
                    seconds, latent, skipped = run_image(runner, cond, args)
                    result.image_times.append(seconds)
                    result.latents.append(latent.float().cpu())
                    result.skipped.append(skipped)
                    if reference is not None:
                        eager_s, eager_latent = run_image(reference, cond, args)[:2]
                        result.eager_times.append(eager_s)
                        if not torch.equal(eager_latent.float().cpu(), expected[index]):
                            raise RuntimeError("the eager reference no longer gives eager's latents")
    except Exception as exc:  # noqa: BLE001 -- a peer that fails is a result, with its reason
        result.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:400]
    result.recompiles, result.graph_breaks = dynamo_counts()
    return result


def calibrate(runner, workload, args):
    """A runner's one-sample calibration, where it has one, on the workload's first image."""
    if runner.calibrate is not None:
        runner.calibrate(lambda: trained.sample(runner.call, workload.conditions[0], args.steps))


def skip_cost(workload, config, args):
    """What one skipped call of `config`'s family costs, in calls of the model compiled by plain
    Inductor, measured: images of the workload's first condition through plain Inductor, and
    through the family with its knob at "compute every call" (`NEVER_SKIP`) and at "skip every
    call it allows" (`ALWAYS_SKIP`), `SKIP_COST_IMAGES` of each, in turn, after one of each that
    compiles. With T_i, T_c and T_s their median times and s the skipped calls of a skipping
    image (k = steps - s computed): a skipped call takes (T_s - k T_c / steps) / s, and counts
    as that over T_i / steps (the sampler's few ops per step are in every term). Returns
    (cost, s); (None, 0) where nothing was skipped or the family failed. A family that
    calibrates calibrates each of its runners first."""
    never, always = FORCED_KNOBS.get(config.family, (NEVER_SKIP, ALWAYS_SKIP))
    cond = workload.conditions[0]
    try:
        reset_dynamo()
        runners = [inductor(workload.build(), None, args.steps)]
        runners += [config.setup(workload.build(), knob, args.steps) for knob in (never, always)]
        times, skipped = ([], [], []), 0
        with torch.no_grad():
            for runner in runners:
                calibrate(runner, workload, args)
                run_image(runner, cond, args)
            for _ in range(SKIP_COST_IMAGES):
                for index, runner in enumerate(runners):
                    seconds, _, skips = run_image(runner, cond, args)
                    times[index].append(seconds)
                    skipped = skips if index == 2 else skipped
    except Exception as exc:  # noqa: BLE001 -- measure() reports the family's error
        print(f" (skip cost not measured: {type(exc).__name__}: {exc})", end="")
        return None, 0
    if not skipped:
        return None, 0
    plain_call, computed_call = (statistics.median(t) / args.steps for t in times[:2])
    skipped_call = (statistics.median(times[2]) - (args.steps - skipped) * computed_call) / skipped
    return skipped_call / plain_call, skipped


def cold_compile(workload_name, config, args):
    """Compile time with an empty Inductor cache, in a subprocess; returns (seconds, cache dir).
    The main process then measures the family with that cache dir (the warm compile)."""
    cache = tempfile.mkdtemp(prefix="wavepass-compare-inductor-")
    command = [sys.executable, __file__, "--device", args.device, "--steps", str(args.steps),
               "--threads", str(args.threads), "--digits-images", "1", "--photos-images", "1", "--medium-images", "1",
               "--thresholds", str(config.threshold if config.threshold is not None else COLD_PROBE_THRESHOLD),
               "--cold-probe", workload_name, config.name]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("COLD ")]
    if done.returncode != 0 or not lines:
        return None, cache
    return json.loads(lines[-1][5:])["cold_compile_s"], cache


def cold_probe(args):
    """Subprocess side of `cold_compile`: first image (compiles) minus a second image."""
    name, config_name = args.cold_probe
    workload = workload_named(name, args)
    config = next(c for c in configurations(args.thresholds) if c.name == config_name)
    runner = config.setup(workload.build(), config.threshold, args.steps)
    with torch.no_grad():
        first = run_image(runner, workload.conditions[0], args)[0]
        second = run_image(runner, workload.conditions[0], args)[0]
    print("COLD " + json.dumps({"cold_compile_s": first - second}))


def measure_workload(workload, configs, args):
    """Every configuration on one workload. A compiled family first gets a cold probe of one
    configuration (threshold COLD_PROBE_THRESHOLD where it has one) and is then measured warm,
    with the probe's Inductor cache; the cold figure goes on the probed configuration's row."""
    results, probes = [], {}  # family -> (cold seconds, cache dir, probed config name)
    costs = {}  # family -> skip_cost(...)
    known_costs = {}  # family -> (cost, skipped) of --skip-costs' run
    if args.skip_costs is not None:
        rows = json.loads(args.skip_costs.read_text())["workloads"][workload.name]["rows"]
        known_costs = {r["family"]: (r["skip_cost"], r["skip_cost_skipped"]) for r in rows if r.get("skip_cost") is not None}
    reference = Runner(workload.build())  # eager, timed between every other configuration's images
    for config in configs:
        paired = (reference, results[0].latents) if results else (None, None)
        if config.compiled and not args.no_cold and config.family not in probes:
            family = [c for c in configs if c.family == config.family]
            probed = next((c for c in family if c.threshold in (None, COLD_PROBE_THRESHOLD)), family[0])
            probes[config.family] = (*cold_compile(workload.name, probed, args), probed.name)
        cold_s, cache, probed_name = probes.get(config.family, (None, None, None))
        print(f"  {workload.name}: {config.name} ...", end="", flush=True)
        with temporary_cache_dir(cache) if cache is not None else contextlib.nullcontext():
            if config.threshold is not None and config.family not in costs:
                costs[config.family] = known_costs.get(config.family) or skip_cost(workload, config, args)
            result = measure(workload, config, args, *paired)
        result.cold_compile_s = cold_s if config.name == probed_name else None
        result.skip_cost, result.skip_cost_skipped = costs.get(config.family, (None, 0))
        print(f" {result.error or f'{statistics.median(result.image_times):.3f} s/image'}", flush=True)
        results.append(result)
    return results


# ----------------------------------------------------------------------------- reporting

def row(result, baseline, workload, args):
    """The table row of one configuration; its speed-up is against the eager images timed
    between its own (the eager baseline of the run where there are none)."""
    config = result.config
    out = dict(config=config.name, family=config.family, threshold=config.threshold,
               compiled=config.compiled, note=config.note, error=result.error)
    if result.error:
        return out
    median_s = statistics.median(result.image_times)
    eager_s = statistics.median(result.eager_times or baseline.image_times)
    reference = torch.cat(baseline.latents)
    max_err, psnr = demo.accuracy(torch.cat(result.latents), reference)
    skipped = [s for s in result.skipped if s is not None]
    warm = result.first_image_s - median_s if config.compiled else None
    skipped_mean = statistics.mean(skipped) if skipped else None
    out.update(
        s_per_image=median_s, eager_s_per_image=eager_s, speedup_vs_eager=eager_s / median_s,
        skipped_per_image=skipped_mean, steps=args.steps,
        skip_cost=result.skip_cost, skip_cost_skipped=result.skip_cost_skipped,
        speedup_in_calls=speedup_in_calls(args.steps, skipped_mean, result.skip_cost),
        compile_cold_s=result.cold_compile_s, compile_warm_s=warm,
        recompiles=result.recompiles, graph_breaks=result.graph_breaks,
        psnr_db=None if math.isinf(psnr) else psnr, max_abs_err=max_err,
        accuracy=classifier_accuracy(workload, result.latents),
    )
    return out


def speedup_in_calls(steps, skipped, cost):
    """steps / the calls' cost in computed calls: a computed call costs 1, a skipped one its
    family's measured `skip_cost` (clamped to 0..1; 1, no saving, where it was not measured);
    1.0 without a cache. Unlike wall time on a shared machine, it does not drift with other
    processes, and a family's slower or faster computed calls do not count."""
    if not skipped:
        return 1.0
    return steps / (steps - skipped + skipped * (1.0 if cost is None else min(max(cost, 0.0), 1.0)))


def classifier_accuracy(workload, latents):
    """Fraction of generated digits the classifier assigns to their conditioned class."""
    if workload.classifier is None:
        return None
    predicted = digits.classify(workload.classifier, digits.to_pixels(torch.cat(latents)))
    return (predicted == torch.tensor(workload.labels)).float().mean().item()


def fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def markdown_table(rows, steps):
    lines = [
        "| config | s/image | speed-up | skipped | skip cost | speed-up in calls | compile cold / warm (s) "
        "| recompiles | graph breaks | PSNR (dB) | max err | accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    failures = []
    for r in rows:
        if r["error"]:
            failures.append(f"- `{r['config']}` ({r['note'] or r['family']}): `{r['error']}`")
            lines.append(f"| {r['config']} | failed (see below) | | | | | | | | | | |")
            continue
        skipped = "-" if r["skipped_per_image"] is None else f"{r['skipped_per_image']:.1f}/{steps}"
        compile_s = ("-" if not r["compiled"] else
                     f"{fmt(r['compile_cold_s'], '.1f')} / {fmt(r['compile_warm_s'], '.1f')}")
        lines.append(
            f"| {r['config']} | {r['s_per_image']:.3f} | {r['speedup_vs_eager']:.2f}x | {skipped} "
            f"| {fmt(r.get('skip_cost'), '.2f')} | {r.get('speedup_in_calls', 1.0):.2f}x | {compile_s} "
            f"| {r['recompiles']} | {r['graph_breaks']} | {fmt(r['psnr_db'], '.1f', 'exact')} "
            f"| {r['max_abs_err']:.2e} | {fmt(r['accuracy'], '.0%')} |")
    return "\n".join(lines + ([""] + failures if failures else []))


def write_markdown(path, record):
    parts = [f"Device: {record['device']} ({record['dtype']}, {record['threads']} threads), "
             f"torch {record['torch']}, diffusers {record['diffusers']}; {record['steps']} FlowMatch Euler "
             f"steps. "
             f"Peers: {', '.join(f'{k} {v}' for k, v in record['peers'].items())}."]
    for name, block in record["workloads"].items():
        title = {"digits": "Trained digits FLUX", "photos": "Trained photos FLUX (256 image tokens)",
                 "medium": "Medium random-weight Flux"}[name]
        extra = (f" Classifier accuracy on real held-out digits: {block['real_accuracy']:.1%}."
                 if block.get("real_accuracy") is not None else "")
        parts += [f"### {title} ({block['params_m']:.2f}M params; median of {block['repeats']} passes "
                  f"over {block['images']} images; run {block['finished']})",
                  extra.strip(), markdown_table(block["rows"], record["steps"])]
    path.write_text("\n\n".join(p for p in parts if p) + "\n")


def write_plot(path, record):
    """Speed-up against quality: classifier accuracy (digits), PSNR vs eager (medium)."""
    fig, axes = plots.panels(list(record["workloads"]))
    for ax, name in axes:
        rows = [r for r in record["workloads"][name]["rows"] if not r["error"]]
        metric = "accuracy" if name == "digits" else "psnr_db"
        families = sorted({r["family"] for r in rows}, key=[r["family"] for r in rows].index)
        for index, family in enumerate(families):
            points = [(r["speedup_vs_eager"], r[metric] if r[metric] is not None else 100.0, r["threshold"])
                      for r in rows if r["family"] == family]
            xs, ys, ts = zip(*points)
            ax.plot(xs, ys, marker="os^vD<>ph"[index % 9], label=family)
            for x, y, t in points:
                if t is not None:
                    ax.annotate(f"{t:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        plots.label(ax, "speed-up over eager (median time per image)",
                    "classifier accuracy" if metric == "accuracy" else "PSNR vs eager (dB; exact = 100)",
                    f"{name} ({record['device']})")
    plots.save(fig, path)


def write_samples_grid(path, results, workload):
    """One row of generated images per configuration (last pass), with its label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = workload.model
    rows = [r for r in results if not r.error]
    width = len(workload.conditions) * model.side / 16 + 2.5
    fig, axes = plt.subplots(len(rows), 1, figsize=(width, len(rows) * max(0.5, model.side / 40)))
    for ax, result in zip(axes, rows):
        images = torch.nn.functional.pad(model.to_unit(torch.cat(result.latents)), (0, 1))  # 1-px gaps
        strip = torch.cat(list(images), dim=2).permute(1, 2, 0)  # (S, n * (S + 1), C)
        if model.channels == 1:
            ax.imshow(strip[..., 0].numpy(), cmap="gray_r", vmin=0, vmax=1)
        else:
            ax.imshow(strip.numpy())
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(result.config.name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{workload.name}, conditioned classes {workload.labels[:10]}...", fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def peer_versions():
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("cache-dit", "para-attn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.cold_probe:
        return cold_probe(args)
    train, held_out = digits.load_splits()
    classifier = digits.fit_classifier(train)
    real_accuracy = (digits.classify(classifier, (held_out.images.squeeze(1) + 1) * 8)
                     == held_out.labels).float().mean().item()
    configs = configurations(args.thresholds, args.families)
    record = dict(device=args.device, dtype=str(dtype_for(args.device)), threads=torch.get_num_threads(),
                  torch=torch.__version__, diffusers=diffusers.__version__, peers=peer_versions(),
                  steps=args.steps, repeats=args.repeats, thresholds=args.thresholds,
                  cold_probe_threshold=COLD_PROBE_THRESHOLD, workloads={},
                  command=" ".join([Path(sys.executable).name, *sys.argv]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__} | diffusers {diffusers.__version__} | {args.device} "
          f"| {len(configs)} configurations | peers {record['peers']}")
    if args.append and args.out.with_suffix(".json").exists():
        record["workloads"] = json.loads(args.out.with_suffix(".json").read_text())["workloads"]
    for name in args.workloads:
        workload = workload_named(name, args, classifier if name == "digits" else None)
        results = measure_workload(workload, configs, args)
        baseline = results[0]
        record["workloads"][name] = dict(
            images=len(workload.conditions), repeats=args.repeats, command=record["command"],
            finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            params_m=sum(p.numel() for p in workload.build().parameters()) / 1e6,
            real_accuracy=real_accuracy if name == "digits" else None,
            rows=[row(r, baseline, workload, args) for r in results])
        if workload.model is not None:
            write_samples_grid(args.out.with_name(f"{args.out.name}-{name}.png"), results, workload)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_markdown(args.out.with_suffix(".md"), record)
    include_in_docs(args.out.with_suffix(".md"))
    write_plot(args.out.with_suffix(".png"), record)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()

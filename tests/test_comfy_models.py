"""KSampler runs of ComfyUI's own model classes with the wavepass node pack (CPU, tiny, random).

For each model class of `tests/comfy_models.py` (built through `comfy.supported_models` and a
`ModelPatcher`), the real KSampler code path (`nodes.common_ksampler`: 8 euler steps, simple
scheduler) samples the unpatched model, then clones made by the pack's Apply First Block
Cache node (`wavepass_comfy.nodes.ApplyFirstBlockCache`, which caches without Inductor):

(a) at threshold 0 the output equals the unpatched model's exactly, and the backend cached
    the expected blocks (no fallback to plain compilation), as it does when the bare
    diffusion model is compiled with `torch.compile(..., backend="wavespeed")`;
(b) at the threshold below, some but not all steps are skipped and the output stays close;
    every call, its decision and its output, equals the independent reference cache
    (`comfy_reference.py`, the rule written from ComfyUI's source: told the roles of each
    block's arguments, where the backend must read them from the graph);
(c) the input ModelPatcher is untouched: same options, wrappers and patches, the same
    diffusion model, and sampling it again gives its original output.

Thresholds, found for these random weights (decisions of the 8 steps, X = skipped; change:
mean |cached - unpatched| / mean |unpatched| of the sampled latent; models with cfg > 1 run
cond and uncond as one batched call per step):

    model          ComfyUI diffusion model           threshold  decisions  change  cached blocks
    flux           flux.model.Flux                   0.10       .X.X....   0.006   double_blocks.0-1, single_blocks.0-1
    sd3            mmdit.OpenAISignatureMMDITWrapper 0.25       .XX.X...   0.015   joint_blocks.0-1
    sdxl           openaimodel.UNetModel             0.04       ....X.XX   0.016   input_blocks.1-3, middle_block.0-2, output_blocks.0-3
    ltxv           lightricks.LTXVModel              0.10       .XX.X...   0.003   transformer_blocks.0-2
    hunyuan_video  hunyuan_video.HunyuanVideo        0.10       .X.X....   0.002   double_blocks.0-1, single_blocks.0-1
    wan            wan.model.WanModel                0.10       .XX.X...   0.004   blocks.0-2
    hidream        hidream.model.HiDreamImage...     0.30       .X.X.X.X   0.024   single_stream_blocks.0-2 (*)
    lumina2        lumina.model.NextDiT              0.10       .XX.X...   0.010   noise_refiner.0-1, layers.0-2
    qwen_image     qwen_image.model.QwenImage...     0.25       .X.X.X..   0.009   transformer_blocks.0-2
    chroma         chroma.model.Chroma               0.15       .X.X....   0.019   double_blocks.0-1, single_blocks.0-1
    chroma_radiance chroma_radiance.model.Chroma...  0.25       .X.X....   0.022   double_blocks.0-1, single_blocks.0-1 (**)

(*) HiDream's mixture of experts breaks the graph in every block: Dynamo runs its forward as
    Python and compiles each block on its own, and the cache sits around its stack at the
    module level (wavepass.stack_cache); its random modulation moves more between steps.
(**) Chroma Radiance decodes pixels with a second, smaller stack (`nerf_blocks`, over the
    pixels of each patch) after the main stacks: it runs every call, in the epilogue.
Lumina 2 runs its context refiner (a stack) on the caption before the cached region; Qwen-Image
is sampled with as many image as text tokens, and its blocks return (text, image).

Every model is sampled and compiled once per threshold (`experiment`, cached for the module,
plus one bare compile; Dynamo compiling is most of the time); the tests check those runs.
Needs `python scripts/fetch_comfyui.py` and the packages `comfy_support.load_nodes` names.
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass

import pytest
import torch

import comfy_support

nodes = comfy_support.require_nodes()

import comfy_models  # noqa: E402
import comfy_reference  # noqa: E402
from comfy.patcher_extension import WrappersMP  # noqa: E402
from fbcache_reference import ReferenceFBCache  # noqa: E402

import wavepass  # noqa: E402
from wavepass.runtime import programs_of  # noqa: E402
from wavepass_comfy.nodes import ApplyFirstBlockCache  # noqa: E402

STEPS = 8
THRESHOLDS = {"flux": 0.10, "sd3": 0.25, "sdxl": 0.04, "ltxv": 0.10, "hunyuan_video": 0.10, "wan": 0.10,
              "hidream": 0.30, "lumina2": 0.10, "qwen_image": 0.25, "chroma": 0.15, "chroma_radiance": 0.25}
RULE_FACTORS = (1, 3)  # the rule is checked at THRESHOLDS and at 3x
CLOSE = 0.03  # mean |cached - unpatched| / mean |unpatched| at THRESHOLDS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are too small to gain from more, and on a shared
    2-core machine OpenMP threads waiting on each other make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Run:
    """One KSampler run of a clone made by Apply First Block Cache."""

    samples: torch.Tensor
    stats: wavepass.Stats
    blocks: list[tuple[str, ...]]  # of each cached program the diffusion model ran
    warnings: list[str]
    model_replaced: bool  # the input patcher's diffusion_model was another object after it
    outputs: list[torch.Tensor]  # of each model call


@dataclass
class ReferenceRun:
    """One KSampler run of the unpatched model with the reference cache on its blocks."""

    samples: torch.Tensor
    decisions: list[bool]
    outputs: list[torch.Tensor]  # of each model call


@dataclass
class Experiment:
    tiny: comfy_models.TinyModel
    reference: torch.Tensor  # the unpatched model's output
    first_call: tuple[tuple, dict]  # the diffusion model's arguments at its first step
    exact: Run  # threshold 0
    cached: Run  # THRESHOLDS[name]
    before: str  # the input patcher's state before patching, and after both runs
    after: str
    again: torch.Tensor  # the input patcher sampled after both runs


def ksample(patcher, tiny: comfy_models.TinyModel, positive: list | None = None) -> torch.Tensor:
    """The KSampler node's code path: 8 euler steps, simple scheduler, seed 0."""
    with torch.no_grad():
        (latent,) = nodes.common_ksampler(patcher, 0, STEPS, tiny.cfg, "euler", "simple",
                                          positive or tiny.positive, tiny.negative, tiny.latent())
    return latent["samples"]


def patcher_state(patcher) -> str:
    """What a node may not change on its input: options, wrappers, callbacks, patches."""
    return repr((patcher.model_options, patcher.wrappers, patcher.callbacks,
                 patcher.object_patches, patcher.patches, patcher.model.diffusion_model))


def recording(patcher, outputs: list):
    """A clone of `patcher` whose model calls append copies of their outputs to `outputs`."""
    clone = patcher.clone()

    def record(executor, *args, **kwargs):
        output = executor(*args, **kwargs)
        outputs.append(output.clone())
        return output

    clone.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "wavepass-test-record", record)
    return clone


def run_reference(tiny: comfy_models.TinyModel, threshold: float) -> ReferenceRun:
    if tiny.name == "sdxl":  # a UNet: the stage reference (comfy_reference.installed)
        cache = comfy_reference.installed("sdxl", tiny.diffusion_model, comfy_reference.unet_cache(threshold))
    else:
        cache = comfy_reference.installed_on_blocks(tiny.name, tiny.diffusion_model, tiny.spec.cached_blocks,
                                                    ReferenceFBCache(threshold))
    outputs = []
    with cache as reference:
        samples = ksample(recording(tiny.patcher, outputs), tiny)
    return ReferenceRun(samples, list(reference.decisions), outputs)


def run_patched(tiny: comfy_models.TinyModel, threshold: float) -> Run:
    (patched,) = ApplyFirstBlockCache.execute(
        model=tiny.patcher, object_to_patch="diffusion_model", residual_diff_threshold=threshold,
        start=0.0, end=1.0, max_consecutive_cache_hits=-1,
    ).result
    assert patched is not tiny.patcher
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = []
        samples = ksample(recording(patched, outputs), tiny)
    return Run(
        samples=samples,
        stats=wavepass.stats(patched),
        blocks=[p.blocks for p in programs_of(tiny.diffusion_model)],
        warnings=[str(w.message) for w in caught if str(w.message).startswith("wavespeed")],
        model_replaced=tiny.patcher.model.diffusion_model is not tiny.diffusion_model,
        outputs=outputs,
    )


def fresh(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of call arguments (tensors cloned, dicts such as transformer_options copied)."""
    return (tuple(a.clone() if torch.is_tensor(a) else a for a in args),
            {k: v.clone() if torch.is_tensor(v) else copy.copy(v) for k, v in kwargs.items()})


def recording_first_call(module: torch.nn.Module, calls: list):
    """A forward pre-hook that keeps copies of the first call's arguments in `calls`."""
    def hook(_module, args, kwargs):
        if not calls:
            calls.append(fresh(args, kwargs))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@functools.cache
def experiment(name: str) -> Experiment:
    tiny = comfy_models.build(name)
    calls = []
    with recording_first_call(tiny.diffusion_model, calls):
        reference = ksample(tiny.patcher, tiny)
    before = patcher_state(tiny.patcher)
    exact = run_patched(tiny, 0.0)
    cached = run_patched(tiny, THRESHOLDS[name])
    after = patcher_state(tiny.patcher)
    return Experiment(tiny, reference, calls[0], exact, cached, before, after,
                      ksample(tiny.patcher, tiny))


@pytest.mark.parametrize("name", comfy_models.MODEL_NAMES)
def test_tiny_model_samples_finite_and_not_degenerate(name):
    e = experiment(name)
    assert e.reference.shape == e.tiny.spec.latent_shape
    assert torch.isfinite(e.reference).all()
    assert e.reference.std() > 0.1
    # the conditioning matters: the negative prompt as the positive one gives another result
    other = ksample(e.tiny.patcher, e.tiny, positive=e.tiny.negative)
    assert (other - e.reference).abs().mean() > 1e-3 * e.reference.abs().mean()


@pytest.mark.parametrize("name", comfy_models.MODEL_NAMES)
def test_backend_caches_the_diffusion_model_directly(name, no_fallback):
    """torch.compile of the bare diffusion model (no node pack) caches the expected blocks."""
    e = experiment(name)
    model = e.tiny.diffusion_model
    args, kwargs = fresh(*e.first_call)
    expected = model(*args, **kwargs)
    compiled = torch.compile(model, backend="wavespeed",
                             options={"residual_diff_threshold": 0.0, "compiler": "eager"})
    args, kwargs = fresh(*e.first_call)
    torch.testing.assert_close(compiled(*args, **kwargs), expected, atol=0, rtol=0)
    assert [p.blocks for p in programs_of(model)] == [e.tiny.spec.cached_blocks]


@pytest.mark.parametrize("name", comfy_models.MODEL_NAMES)
def test_threshold_zero_equals_unpatched(name):
    e = experiment(name)
    assert e.exact.warnings == []  # cached, not compiled whole
    assert e.exact.blocks == [e.tiny.spec.cached_blocks]
    assert e.exact.stats.calls == STEPS and e.exact.stats.hits == 0
    torch.testing.assert_close(e.exact.samples, e.reference, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", comfy_models.MODEL_NAMES)
def test_threshold_skips_some_steps(name):
    e = experiment(name)
    run = e.cached
    assert run.warnings == []
    assert len(run.stats.decisions) == run.stats.calls == STEPS
    assert not run.stats.decisions[0]  # nothing stored yet at the first step
    assert 0 < run.stats.hits < STEPS, run.stats.decisions
    assert not torch.equal(run.samples, e.reference)  # the skips took effect
    change = (run.samples - e.reference).abs().mean() / e.reference.abs().mean()
    assert change < CLOSE, f"cached output differs by {change:.3f} (relative)"


@pytest.mark.parametrize("factor", RULE_FACTORS)
@pytest.mark.parametrize("name", comfy_models.MODEL_NAMES)
def test_every_call_follows_the_rule(name, factor):
    """Decisions and outputs, call by call, equal the independent reference cache's, at the
    test threshold and at a higher one (where a signal measured otherwise than as the first
    block's residual decides otherwise)."""
    e = experiment(name)
    threshold = THRESHOLDS[name] * factor
    ours = e.cached if factor == 1 else run_patched(e.tiny, threshold)
    rule = run_reference(e.tiny, threshold)
    assert list(ours.stats.decisions) == rule.decisions
    assert len(ours.outputs) == len(rule.outputs) == STEPS
    for call, (output, expected) in enumerate(zip(ours.outputs, rule.outputs)):
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"call {call}: {m}")


@pytest.mark.parametrize("name", comfy_models.MODEL_NAMES)
def test_input_model_untouched(name):
    e = experiment(name)
    assert e.after == e.before
    assert not e.exact.model_replaced and not e.cached.model_replaced
    assert e.tiny.patcher.model.diffusion_model is e.tiny.diffusion_model
    assert "wavepass" not in e.tiny.patcher.model_options
    torch.testing.assert_close(e.again, e.reference, atol=0, rtol=0)

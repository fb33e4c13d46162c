"""Wan 2.2's two-expert workflow in ComfyUI, through the node pack (CPU, tiny, random).

Wan 2.2 A14B is two denoisers of Wan 2.1's architecture: a high-noise expert for the first
steps and a low-noise expert for the rest. ComfyUI runs it as two KSamplerAdvanced nodes (the
first returns its leftover noise at step `SWITCH`, the second finishes without adding noise),
each with its own MODEL, and each MODEL goes through Apply First Block Cache on its own.

Each expert keeps its own cache state: its decisions and every call's output equal an
independent reference cache (`comfy_reference.installed_on_blocks`) on that expert alone, and
a second run of the workflow (a new seed) compiles nothing new.
"""

from __future__ import annotations

import pytest
import torch

import comfy_support

nodes = comfy_support.require_nodes()

import comfy_models  # noqa: E402
import comfy_reference  # noqa: E402
import torch._dynamo.utils  # noqa: E402
from fbcache_reference import ReferenceFBCache  # noqa: E402
from test_comfy_models import recording  # noqa: E402
from wavepass_comfy.nodes import ApplyFirstBlockCache  # noqa: E402

import wavepass  # noqa: E402

STEPS, SWITCH = 8, 4
THRESHOLD = 0.2  # random weights: each expert skips some but not all of its 4 steps


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def two_samplers(high, low, tiny: comfy_models.TinyModel, seed: int) -> tuple[torch.Tensor, list]:
    """KSamplerAdvanced (high noise, steps 0-4, leftover noise returned), then
    KSamplerAdvanced (low noise, steps 4-8, no noise added); the samples, and the wavepass
    stats of each model right after its sampler ran."""
    stats = []
    with torch.no_grad():
        (half,) = nodes.common_ksampler(high, seed, STEPS, tiny.cfg, "euler", "simple", tiny.positive,
                                        tiny.negative, tiny.latent(), start_step=0, last_step=SWITCH)
        stats.append(wavepass.stats(high))
        (done,) = nodes.common_ksampler(low, seed, STEPS, tiny.cfg, "euler", "simple", tiny.positive,
                                        tiny.negative, half, disable_noise=True, start_step=SWITCH,
                                        last_step=STEPS, force_full_denoise=True)
        stats.append(wavepass.stats(low))
    return done["samples"], stats


def with_cache(patcher):
    (patched,) = ApplyFirstBlockCache.execute(
        model=patcher, object_to_patch="diffusion_model", residual_diff_threshold=THRESHOLD,
        start=0.0, end=1.0, max_consecutive_cache_hits=-1,
    ).result
    return patched


def test_each_expert_follows_the_rule_with_its_own_state():
    high, low = comfy_models.build("wan", seed=0), comfy_models.build("wan", seed=20)
    blocks = high.spec.cached_blocks

    expected = {"high": [], "low": []}
    references = {"high": ReferenceFBCache(THRESHOLD), "low": ReferenceFBCache(THRESHOLD)}
    with comfy_reference.installed_on_blocks("wan", high.diffusion_model, blocks, references["high"]), \
            comfy_reference.installed_on_blocks("wan", low.diffusion_model, blocks, references["low"]):
        reference, _ = two_samplers(recording(high.patcher, expected["high"]),
                                    recording(low.patcher, expected["low"]), high, seed=0)

    torch._dynamo.reset()
    cached = {"high": with_cache(high.patcher), "low": with_cache(low.patcher)}
    outputs = {"high": [], "low": []}
    samples, stats_of = two_samplers(recording(cached["high"], outputs["high"]),
                                     recording(cached["low"], outputs["low"]), high, seed=0)

    for expert, stats in zip(("high", "low"), stats_of):
        assert stats.reason is None
        assert list(stats.decisions) == references[expert].decisions, expert
        assert stats.calls == SWITCH and 0 < stats.hits < SWITCH, (expert, stats)
        for call, (output, wanted) in enumerate(zip(outputs[expert], expected[expert], strict=True)):
            torch.testing.assert_close(output, wanted, atol=1e-5, rtol=1e-4, msg=lambda m: f"{expert} call {call}: {m}")
    torch.testing.assert_close(samples, reference, atol=1e-5, rtol=1e-4)
    # both experts run one compiled graph; each keeps its own stats after the other ran
    assert [wavepass.stats(cached[expert]) for expert in ("high", "low")] == stats_of

    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, stats_of = two_samplers(cached["high"], cached["low"], high, seed=1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing recompiled
    assert [stats.calls for stats in stats_of] == [SWITCH, SWITCH]

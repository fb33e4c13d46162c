"""The `wavespeed` backend on the families of `families.py`: LTX-Video, Wan, HunyuanVideo,
Qwen-Image, Chroma, Lumina 2, FLUX.2, Sana, CogView4 and HunyuanVideo 1.5.

As in `test_backend.py`, cached runs are compared with `ReferenceFBCache` over the eager
model's stages and uncached ones with the eager or plain-Inductor model.
"""

from __future__ import annotations

import pytest
import torch

import families
import wavepass
from fbcache_reference import ReferenceFBCache
from test_backend import STEPS, assert_matches_reference, compiled, run_backend, run_reference
from wavepass.runtime import programs_of

FAMILIES = ("ltx_video", "wan", "hunyuan_video", "qwen_image", "chroma", "lumina2", "flux2", "sana", "cogview4")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def case(family):
    return getattr(families, family)()


def test_stages_are_the_model(case, no_fallback):
    """The reference at threshold 0 runs every stage: it must be the eager model, bit for bit."""
    latent, outputs = run_backend(case, case.model, steps=3)
    ref_latent, ref_outputs = run_reference(case, ReferenceFBCache(0.0), steps=3)
    for out, ref in zip([*outputs, latent], [*ref_outputs, ref_latent]):
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_threshold_zero_equals_the_uncached_model(case, compiler, no_fallback):
    plain_latent, plain_outputs = run_backend(case, case.model, steps=3)  # eager: no second cold compile
    latent, outputs = run_backend(case, compiled(case.model, residual_diff_threshold=0.0, compiler=compiler), steps=3)
    tolerance = 0 if compiler == "eager" else 1e-5
    for out, ref in zip([*outputs, latent], [*plain_outputs, plain_latent]):
        torch.testing.assert_close(out, ref, atol=tolerance, rtol=tolerance)
    assert wavepass.stats(case.model) == wavepass.Stats(3, 0, (False,) * 3)


def test_sampling_matches_reference(case, no_fallback):
    threshold = case.mixed_threshold
    cache = ReferenceFBCache(threshold)
    assert_matches_reference(case, compiled(case.model, residual_diff_threshold=threshold, compiler="eager"), cache)
    assert 0 < sum(cache.decisions) < STEPS, "the test needs both skipped and computed steps"


def test_discovers_the_expected_blocks(case, no_fallback):
    run_backend(case, compiled(case.model, compiler="eager"), steps=1)
    (program,) = programs_of(case.model)
    assert program.blocks == case.blocks


def test_hunyuan_video15_stages_are_the_model(no_fallback):
    """The case below is right about the model: its reference at threshold 0 is the eager model."""
    test_stages_are_the_model(families.hunyuan_video15(), no_fallback)


def test_hunyuan_video15_follows_the_rule(no_fallback):
    """Its prologue sorts the context by boolean masks in a loop (a graph break in a loop:
    Dynamo runs the forward as Python, and the rest of it after the first break as its resume
    function): the split path, which reads the streams from that resume function's frame."""
    case = families.hunyuan_video15()
    cache = ReferenceFBCache(case.mixed_threshold)
    model = compiled(case.model, residual_diff_threshold=case.mixed_threshold, compiler="eager")
    assert_matches_reference(case, model, cache)
    assert 0 < sum(cache.decisions) < STEPS
    (program,) = programs_of(case.model)
    assert program.blocks == case.blocks

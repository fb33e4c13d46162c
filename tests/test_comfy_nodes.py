"""The ComfyUI nodes through a sampling run: start/end, hit limits, the run lifecycle, chunked
CFG, stats of a MODEL, and LoRA-safe compilation.

All on ComfyUI's own tiny Flux (tests/comfy_models.py) with ComfyUI's sampling code
(`comfy.sample.sample`, the code under KSampler) and ComfyUI's `LoraLoaderModelOnly` node.
Apply First Block Cache alone runs the cached program uncompiled (fast); the LoRA tests
compile with Inductor through Compile Model+.
"""

from __future__ import annotations

import logging

import pytest
import torch

import comfy_support

nodes = comfy_support.require_nodes()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy_models  # noqa: E402
import comfy_reference  # noqa: E402
import folder_paths  # noqa: E402
from wavepass_comfy.nodes import ApplyFirstBlockCache, CompileModelPlus  # noqa: E402

import wavepass  # noqa: E402

STEPS = 8
THRESHOLD = 0.3  # skips 4-6 of 8 steps of this tiny Flux
PREDICTIVE_THRESHOLD = 0.08  # where policy="predictive" decides otherwise than fbcache on it


@pytest.fixture(scope="module")
def tiny():
    return comfy_models.build("flux")


def fbcache(model, threshold=THRESHOLD, start=0.0, end=1.0, max_hits=-1, policy="fbcache"):
    return ApplyFirstBlockCache.execute(
        model=model, object_to_patch="diffusion_model", residual_diff_threshold=threshold,
        start=start, end=end, max_consecutive_cache_hits=max_hits, policy=policy,
    ).result[0]


def compile_plus(model):
    return CompileModelPlus.execute(model=model, object_to_patch="diffusion_model", mode="default",
                                    dynamic="auto", fullgraph=False, options="").result[0]


def sample(tiny, model, negative=None, sigmas=None, callback=None, cfg=None):
    latent = tiny.latent()["samples"]
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(
        model, noise, STEPS, tiny.cfg if cfg is None else cfg, "euler", "simple", tiny.positive,
        negative if negative is not None else tiny.negative, latent, sigmas=sigmas,
        callback=callback, disable_pbar=True, seed=0,
    )


def decisions(model) -> tuple[bool, ...]:
    return wavepass.stats(model).decisions


def test_skips_and_logs_one_line_per_run(tiny, caplog):
    model = fbcache(tiny.patcher)
    with caplog.at_level(logging.INFO, logger="wavepass"):
        sample(tiny, model)
    stats = wavepass.stats(model)  # the MODEL the node returned
    assert stats.calls == STEPS and 0 < stats.hits < STEPS
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wavespeed: skipped")]
    assert lines == [f"wavespeed: skipped {stats.hits} of {STEPS} model calls"]


@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.4, 1.0), (0.0, 0.6), (0.3, 0.7)])
def test_start_and_end_bound_the_skipping_window(tiny, start, end):
    """Steps whose sigma lies outside [percent_to_sigma(end), percent_to_sigma(start)] compute."""
    model = fbcache(tiny.patcher, threshold=1.0, start=start, end=end)
    sample(tiny, model)
    sampling = tiny.patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", STEPS)[:-1]
    inside = [sampling.percent_to_sigma(end) <= s <= sampling.percent_to_sigma(start) for s in sigmas.tolist()]
    d = decisions(model)
    assert not any(skip for skip, allowed in zip(d, inside) if not allowed)
    assert any(d[1:]) and sum(inside) < STEPS or start == 0.0 and end == 1.0


def test_max_consecutive_cache_hits(tiny):
    model = fbcache(tiny.patcher, threshold=1.0, max_hits=1)
    sample(tiny, model)
    d = decisions(model)
    assert any(d) and not any(a and b for a, b in zip(d, d[1:]))


def test_a_reused_model_output_caches_again_with_the_same_result(tiny):
    """ComfyUI's execution cache hands the same MODEL to the next prompt's sampler."""
    model = fbcache(tiny.patcher)
    first = sample(tiny, model)
    first_decisions = decisions(model)
    second = sample(tiny, model)
    assert any(first_decisions) and decisions(model) == first_decisions
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_a_schedule_too_short_for_a_skip_is_said_once(tiny, recwarn):
    """A 4-step run with the cache node: one warning naming the fix, once; none for the same
    run without a threshold, nor for 8 steps."""
    sampling = tiny.patcher.get_model_object("model_sampling")
    four = comfy.samplers.calculate_sigmas(sampling, "simple", 4)
    for model, sigmas in ((fbcache(tiny.patcher), None), (fbcache(tiny.patcher, threshold=0.0), four),
                          (fbcache(tiny.patcher), four), (fbcache(tiny.patcher), four)):
        sample(tiny, model, sigmas=sigmas)
    said = [str(w.message) for w in recwarn if issubclass(w.category, wavepass.WavespeedWarning)]
    assert len(said) == 1 and said[0].startswith("wavespeed: a 4-step schedule is too short"), said


def test_rising_sigma_starts_a_new_generation(tiny):
    falling = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0])
    rising = torch.tensor([1.0, 0.9, 0.8, 0.95, 0.85, 0.75, 0.0])  # a second pass from 0.95
    model = fbcache(tiny.patcher, threshold=1.0)
    sample(tiny, model, sigmas=falling)
    assert decisions(model)[3]  # the control: this call skips on a falling schedule
    sample(tiny, model, sigmas=rising)
    assert wavepass.stats(model).calls == 3  # stats since the reset at sigma 0.95
    assert not decisions(model)[0]


def test_an_exception_mid_run_leaves_no_state(tiny):
    model = fbcache(tiny.patcher)
    clean = sample(tiny, model)

    def fail_at_step_4(step, *args):
        if step == 4:
            raise KeyboardInterrupt  # what ComfyUI's "cancel" raises through the sampler

    with pytest.raises(KeyboardInterrupt):
        sample(tiny, model, callback=fail_at_step_4)
    assert wavepass.stats(model).calls == 0
    torch.testing.assert_close(sample(tiny, model), clean, atol=0, rtol=0)


def test_cond_and_uncond_chunks_of_a_step_decide_together(tiny):
    """A negative prompt of 7 tokens cannot share a batch with a positive one of 6 (ComfyUI
    repeats contexts to a common length only up to 4x), so ComfyUI calls the model twice per
    step, one chunk each."""
    longer = comfy_models.conditioning(tiny.spec, seed=5)
    longer[0][0] = torch.cat([longer[0][0], longer[0][0][:, :1]], dim=1)
    model = fbcache(tiny.patcher)
    sample(tiny, model, negative=longer, cfg=2.0)
    d = decisions(model)
    assert len(d) == 2 * STEPS and any(d)
    assert d[0::2] == d[1::2]


# --- LoRA ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    return [comfy_models.write_lora(folder, f"random-{seed}.safetensors", tiny.diffusion_model, seed) for seed in (1, 2)]


def with_lora(model, name: str, strength: float):
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def test_lora_before_or_after_the_nodes_takes_effect_without_recompiles(tiny, loras):
    expected = {
        (name, strength): sample(tiny, with_lora(tiny.patcher, name, strength))
        for name, strength in ((loras[0], 1.0), (loras[0], 0.5), (loras[1], 1.0))
    }
    plain = sample(tiny, tiny.patcher)
    assert all((out - plain).abs().max() > 1e-3 for out in expected.values())  # the LoRAs matter

    compiled = compile_plus(fbcache(tiny.patcher, threshold=0.0))
    torch.testing.assert_close(sample(tiny, compiled), plain, atol=1e-4, rtol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for (name, strength), reference in expected.items():
        after = with_lora(compiled, name, strength)
        before = compile_plus(fbcache(with_lora(tiny.patcher, name, strength), threshold=0.0))
        for model in (after, before):
            torch.testing.assert_close(sample(tiny, model), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sample(tiny, compiled), plain, atol=1e-4, rtol=1e-4)  # unpatched again
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["recompiles"]


@pytest.mark.parametrize("node, inputs, message", [
    (ApplyFirstBlockCache, dict(start=0.6, end=0.4), "need 0 <= start <= end <= 1"),
    (CompileModelPlus, dict(options="{max_autotune: true}"), "options must be a JSON object"),
    (CompileModelPlus, dict(options="[1, 2]"), "options must be a JSON object"),
])
def test_bad_inputs_name_the_fix(tiny, node, inputs, message):
    defaults = {
        ApplyFirstBlockCache: dict(residual_diff_threshold=0.1, start=0.0, end=1.0, max_consecutive_cache_hits=-1),
        CompileModelPlus: dict(mode="default", dynamic="auto", fullgraph=False, options=""),
    }[node]
    with pytest.raises(ValueError, match=message):
        node.execute(model=tiny.patcher, object_to_patch="diffusion_model", **{**defaults, **inputs})


def test_hidream_with_compile_model_plus_skips_and_threshold_zero_is_the_model():
    """ComfyUI's HiDream: its mixture of experts breaks the graph in every block, so the
    stack is cached at the module level while Inductor compiles each block's graphs.
    Through KSampler's code path with both nodes: threshold 0 gives the unpatched model's
    latent, a threshold skips steps, and tuning it compiles nothing."""
    hidream = comfy_models.build("hidream")
    reference = sample(hidream, hidream.patcher)
    compiled = compile_plus(hidream.patcher)
    exact_model = fbcache(compiled, threshold=0.0)
    exact = sample(hidream, exact_model)
    stats = wavepass.stats(exact_model)
    assert (stats.calls, stats.hits, stats.reason) == (STEPS, 0, None)
    torch.testing.assert_close(exact, reference, atol=1e-4, rtol=1e-4)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cached_model = fbcache(compiled, threshold=0.3)
    cached = sample(hidream, cached_model)
    stats = wavepass.stats(cached_model)
    assert stats.reason is None and 0 < stats.hits < STEPS, stats
    assert (cached - reference).abs().mean() < 0.05 * reference.abs().mean()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_policy_input_changes_skipped_steps_only(tiny):
    """The node's `policy` input: taylor makes the same decisions as fbcache and another
    latent; predictive makes other decisions, those of the reference; switching it compiles
    nothing."""
    plain_model = fbcache(tiny.patcher)
    plain = sample(tiny, plain_model)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    taylor_model = fbcache(tiny.patcher, policy="taylor")
    taylor = sample(tiny, taylor_model)
    assert decisions(taylor_model) == decisions(plain_model) and any(decisions(plain_model))
    assert not torch.allclose(taylor, plain)
    references = {policy: comfy_reference.flux_cache(PREDICTIVE_THRESHOLD, policy) for policy in ("fbcache", "predictive")}
    for reference in references.values():
        with comfy_reference.installed("flux", tiny.diffusion_model, reference):
            expected = sample(tiny, tiny.patcher)
    predictive_model = fbcache(tiny.patcher, threshold=PREDICTIVE_THRESHOLD, policy="predictive")
    torch.testing.assert_close(sample(tiny, predictive_model), expected)
    assert decisions(predictive_model) == tuple(references["predictive"].decisions)
    assert references["predictive"].decisions != references["fbcache"].decisions
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs

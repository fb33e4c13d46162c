"""`wavepass_diffusers.apply_wavespeed` on real diffusers pipelines built from tiny components
with random weights (no downloads): Flux, SDXL, SD3 and Wan, called with precomputed prompt
embeddings (no text encoders) and `output_type="latent"`.

Most tests use `compile=False` (the same cached program, without Inductor: fast); one runs
Flux with Inductor. Random weights change little from step to step in some places and a lot
in others, so thresholds here are high and picked per pipeline to give some, not all, skips.
"""

from __future__ import annotations

import contextlib

import families
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

import wavepass
from fbcache_reference import ReferenceFBCache
from models import tiny_sdxl_unet
from wavepass_diffusers import apply_wavespeed, remove_wavespeed

STEPS = 6


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=2, sample_size=16,
    ).eval()


def flux_pipe():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g))
    # 16x16 pixels -> 8x8 latent (vae factor 2) -> 4x4 = 16 packed tokens
    return pipe, dict(height=16, width=16, **embeds)


def flux_cfg_kwargs(kwargs: dict) -> dict:
    """Flux's true CFG: one denoiser call per branch, under cache_context("cond"/"uncond")."""
    g = torch.Generator().manual_seed(2)
    return dict(kwargs, true_cfg_scale=2.0, negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))


def sdxl_pipe():
    torch.manual_seed(0)
    unet = tiny_sdxl_unet()
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(4), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))
    return pipe, dict(height=16, width=16, guidance_scale=5.0, **embeds)  # batched CFG: one call per step


def sd3_pipe():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
    ).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))
    return pipe, dict(height=16, width=16, guidance_scale=5.0, **embeds)


def wan_pipe():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    ).eval()
    # no VAE: with output_type="latent" it is never run (the pipeline's defaults are factor 4 and 8)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  negative_prompt_embeds=torch.randn(1, 6, 16, generator=g))
    # 5 frames, 64x64 -> latent 2 x 8 x 8; CFG as separate "cond"/"uncond" calls
    return pipe, dict(num_frames=5, height=64, width=64, guidance_scale=5.0, **embeds)


PIPES = {"flux": flux_pipe, "sdxl": sdxl_pipe, "sd3": sd3_pipe, "wan": wan_pipe}


def run(pipe, kwargs, steps=STEPS, seed=0):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
               output_type="latent", return_dict=False)[0]
    return out


def denoiser(pipe):
    return getattr(pipe, "transformer", None) or pipe.unet


@pytest.mark.parametrize("name", list(PIPES))
def test_threshold_zero_equals_plain_pipeline(name, no_fallback):
    pipe, kwargs = PIPES[name]()
    plain = run(pipe, kwargs)
    apply_wavespeed(pipe, residual_diff_threshold=0.0, compile=False)
    cached = run(pipe, kwargs)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert wavepass.stats(denoiser(pipe)).calls > 0


def decisions(pipe) -> str:
    return "".join("X" if skip else "." for skip in wavepass.stats(denoiser(pipe)).decisions)


# (pipeline, threshold giving some but not all skips with these random weights)
MIXED = {"flux": 0.3, "sdxl": 0.3, "sd3": 0.3, "wan": 0.3}


@pytest.mark.parametrize("name", list(MIXED))
def test_skips_and_each_call_is_a_new_generation(name, no_fallback):
    pipe, kwargs = PIPES[name]()
    model = denoiser(pipe)
    apply_wavespeed(pipe, residual_diff_threshold=MIXED[name], compile=False)
    assert denoiser(pipe) is model and model.config is not None  # compiled in place
    first, first_decisions = run(pipe, kwargs), decisions(pipe)
    stats = wavepass.stats(model)
    assert 0 < stats.hits < stats.calls, first_decisions
    # the same seed again: the stored residuals of the first call must not leak into the second
    second = run(pipe, kwargs)
    assert decisions(pipe) == first_decisions
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("start, end, computed", [(0.5, 1.0, slice(0, 3)), (0.0, 0.5, slice(3, 6))])
def test_start_end_window(start, end, computed, no_fallback):
    pipe, kwargs = flux_pipe()
    apply_wavespeed(pipe, residual_diff_threshold=0.5, start=start, end=end, compile=False)
    run(pipe, kwargs)
    d = decisions(pipe)
    assert len(d) == STEPS and "X" not in d[computed] and "X" in d, d


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_cfg_branches_keep_separate_state(name, no_fallback):
    """Flux (true CFG) and Wan call the denoiser once per branch, under cache_context("cond") and
    ("uncond"): the uncond call of step 0 has nothing stored in its own context, so it computes.
    With one shared state (the wrapper of cache_context taken away) each call is compared with the
    other branch's signal, which decides differently (Wan: the uncond call of step 0 skips)."""
    pipe, kwargs = PIPES[name]()
    if name == "flux":
        kwargs = flux_cfg_kwargs(kwargs)
    apply_wavespeed(pipe, residual_diff_threshold=0.3, compile=False)
    run(pipe, kwargs)
    separate = decisions(pipe)
    assert len(separate) == 2 * STEPS and separate[:2] == ".." and "X" in separate, separate
    del pipe.transformer.__dict__["cache_context"]
    run(pipe, kwargs)
    shared = decisions(pipe)
    assert shared != separate and (name != "wan" or shared[:2] == ".X"), (separate, shared)


def test_remove_restores_the_plain_pipeline(no_fallback):
    pipe, kwargs = flux_pipe()
    model = pipe.transformer
    plain = run(pipe, kwargs)
    handle = apply_wavespeed(pipe, residual_diff_threshold=0.5, compile=False)
    cached = run(pipe, kwargs)
    assert wavepass.stats(model).hits > 0 and not torch.equal(cached, plain)
    handle.remove()
    assert model._compiled_call_impl is None and "cache_context" not in vars(model)
    before = wavepass.stats(model)
    torch.testing.assert_close(run(pipe, kwargs), plain, rtol=0, atol=0)
    assert wavepass.stats(model) == before  # no wavespeed call since
    # applying again works; remove_wavespeed undoes it too
    apply_wavespeed(pipe, residual_diff_threshold=0.5, compile=False)
    remove_wavespeed(pipe)
    remove_wavespeed(pipe)  # a pipeline without wavespeed is left as it is
    torch.testing.assert_close(run(pipe, kwargs), plain, rtol=0, atol=0)


def test_inductor_matches_eager_cached_program(no_fallback):
    pipe, kwargs = flux_pipe()
    apply_wavespeed(pipe, residual_diff_threshold=0.3, compile=False)
    eager, eager_decisions = run(pipe, kwargs), decisions(pipe)
    remove_wavespeed(pipe)
    torch._dynamo.reset()
    apply_wavespeed(pipe, residual_diff_threshold=0.3)
    compiled = run(pipe, kwargs)
    assert decisions(pipe) == eager_decisions and "X" in eager_decisions
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_mode_and_dynamic_reach_torch_compile(no_fallback):
    """torch.compile refuses options= with mode=; apply_wavespeed passes both to the backend."""
    pipe, kwargs = flux_pipe()
    apply_wavespeed(pipe, residual_diff_threshold=0.3, compile=False, mode="max-autotune-no-cudagraphs",
                    dynamic=False)
    run(pipe, kwargs)
    assert wavepass.stats(pipe.transformer).hits > 0


@pytest.mark.parametrize("start, end", [(-0.1, 1.0), (0.5, 0.5), (0.0, 1.5), (0.7, 0.2), (float("nan"), 1.0)])
def test_bad_window_names_the_valid_values(start, end):
    pipe, _ = flux_pipe()
    with pytest.raises(ValueError, match=r"0 <= start < end <= 1"):
        apply_wavespeed(pipe, start=start, end=end)
    assert pipe.transformer._compiled_call_impl is None


def test_errors_name_the_fix():
    class NoDenoiser:
        scheduler = None

    with pytest.raises(ValueError, match=r"no `transformer` or `unet`.*torch.compile\(model"):
        apply_wavespeed(NoDenoiser())
    pipe, _ = flux_pipe()
    apply_wavespeed(pipe, compile=False)
    with pytest.raises(RuntimeError, match=r"remove_wavespeed\(pipe\)"):
        apply_wavespeed(pipe, compile=False)


def test_window_with_a_scheduler_without_step_index(no_fallback):
    """DDIM keeps no step_index: the step is counted from the denoiser's calls instead."""
    from diffusers import DDIMScheduler

    pipe, kwargs = sdxl_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert not hasattr(pipe.scheduler, "step_index")
    apply_wavespeed(pipe, residual_diff_threshold=0.5, start=0.5, compile=False)
    for _ in range(2):  # the count starts again with each pipeline call
        run(pipe, kwargs)
        d = decisions(pipe)
        assert len(d) == STEPS and d[:3] == "..." and "X" in d, d


def test_policy_is_a_run_time_setting(no_fallback):
    """apply_wavespeed(policy="taylor"): the same decisions as First Block Cache, another
    result on skipped steps (the residual extrapolated); configure() switches it back and
    forth, and to predictive (other decisions) and accumulated, without compiling."""
    pipe, kwargs = flux_pipe()
    handle = apply_wavespeed(pipe, residual_diff_threshold=MIXED["flux"], compile=False, policy="taylor")
    taylor, taylor_decisions = run(pipe, kwargs, steps=10), decisions(pipe)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    handle.configure(policy="fbcache")
    plain, plain_decisions = run(pipe, kwargs, steps=10), decisions(pipe)
    handle.configure(policy="taylor")
    assert torch.equal(run(pipe, kwargs, steps=10), taylor)
    assert taylor_decisions == plain_decisions and "X" in plain_decisions.lstrip(".")[2:]
    assert not torch.allclose(taylor, plain)
    handle.configure(policy="predictive")
    run(pipe, kwargs, steps=10)
    assert decisions(pipe) != plain_decisions
    handle.configure(policy="accumulated")
    run(pipe, kwargs, steps=10)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(ValueError, match="policy must be one of"):
        handle.configure(policy="magic")


def test_a_schedule_too_short_for_a_skip_is_said_once(no_fallback):
    """A 4-step schedule (a distilled model's) with the cache on: one warning naming the fix,
    at the first pipeline call only; none at threshold 0 (nothing to skip) or at 6 steps."""
    pipe, kwargs = flux_pipe()
    handle = apply_wavespeed(pipe, residual_diff_threshold=MIXED["flux"], compile=False)
    run(pipe, kwargs, steps=6)
    with pytest.warns(wavepass.WavespeedWarning, match=r"a 4-step schedule is too short .* remove the cache"):
        run(pipe, kwargs, steps=4)
    run(pipe, kwargs, steps=4)  # said once (no_fallback turns a second one into an error)
    handle.configure(residual_diff_threshold=0.0)
    wavepass.notices._warned.clear()
    run(pipe, kwargs, steps=4)


def wan22_pipe():
    """Wan 2.2's two experts: `transformer` above the boundary timestep, `transformer_2` below."""
    experts = families.wan(seed=0), families.wan(seed=5)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=experts[0].model,
                       transformer_2=experts[1].model, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       boundary_ratio=0.5)
    _, kwargs = wan_pipe()
    return pipe, kwargs, experts


@contextlib.contextmanager
def reference_experts(pipe, experts, threshold):
    """The independent reference cache on each expert: the stages of `families.wan`, one cache
    per expert and CFG branch (the pipeline's `cache_context`)."""
    caches: dict[tuple[str, str], ReferenceFBCache] = {}
    for name, case in zip(("transformer", "transformer_2"), experts):
        module, branch = case.model, {"name": "default"}

        @contextlib.contextmanager
        def cache_context(context, *_, branch=branch, **__):
            branch["name"] = context
            yield

        def forward(hidden_states, timestep, encoder_hidden_states, *_, name=name, case=case, branch=branch, **__):
            cache = caches.setdefault((name, branch["name"]), ReferenceFBCache(threshold))
            return (cache(*case.stages, dict(hidden_states=hidden_states, timestep=timestep,
                                              encoder_hidden_states=encoder_hidden_states)),)

        module.__dict__["cache_context"], module.__dict__["forward"] = cache_context, forward
    try:
        yield caches
    finally:
        for case in experts:
            del case.model.__dict__["cache_context"], case.model.__dict__["forward"]


def test_two_experts_each_follow_the_rule_with_their_own_state(no_fallback):
    pipe, kwargs, experts = wan22_pipe()
    threshold, steps = 0.1, 10
    plain = run(pipe, kwargs, steps)
    with reference_experts(pipe, experts, threshold) as caches:
        expected = run(pipe, kwargs, steps)
    handle = apply_wavespeed(pipe, residual_diff_threshold=threshold, compile=False)
    assert set(handle.denoisers) == {"transformer", "transformer_2"}
    out = run(pipe, kwargs, steps)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    for name in ("transformer", "transformer_2"):
        stats = wavepass.stats(getattr(pipe, name))
        # each step calls the expert for "cond", then "uncond"
        decisions = [d for step in zip(caches[name, "cond"].decisions, caches[name, "uncond"].decisions) for d in step]
        assert stats.reason is None and 0 < stats.hits < stats.calls, (name, stats)
        assert list(stats.decisions) == decisions, name
    handle.remove()
    for case in experts:
        assert case.model._compiled_call_impl is None and "cache_context" not in case.model.__dict__
    torch.testing.assert_close(run(pipe, kwargs, steps), plain, atol=0, rtol=0)

"""Never a crash, never silent: whatever Dynamo, Inductor or wavepass's passes raise in a
ComfyUI or diffusers run, sampling goes on with the plain model (its own results), said once
(`WavespeedWarning`) with the cause and the fix, which `wavepass.stats(model).reason` keeps
saying; the model's own errors, out of memory and interrupts still reach the user.

ComfyUI through the nodes and the KSampler node's code (`nodes.common_ksampler`);
diffusers through a real FluxPipeline with `apply_wavespeed`. Failures are real (a tiny
ComfyUI HunyuanDiT, which builds its rope grid with numpy, crashes Dynamo under a guard
filter that lacks the fix in `_skip_transformer_options_guards`; Unsupported code under
fullgraph=True) or injected (a pass or a compiled program that raises).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

import comfy_support

import wavepass  # noqa: E402
import wavepass.backend  # noqa: E402
from wavepass.runtime import CachedProgram  # noqa: E402

nodes = comfy_support.load_nodes()
needs_comfy = pytest.mark.skipif(nodes is None, reason="ComfyUI's source or node packages are missing "
                                 f"(run `{comfy_support.FETCH_COMMAND}`)")
if nodes is not None:
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy_models
    from wavepass_comfy import sampling
    from wavepass_comfy.nodes import ApplyFirstBlockCache, CompileModelPlus

STEPS = 4
FALLBACK = "ran uncompiled and uncached"


@pytest.fixture
def said():
    """The fallback messages said (WavespeedWarning) inside the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught
                       if issubclass(w.category, wavepass.WavespeedWarning) and FALLBACK in str(w.message)]


# --- the guard filter and numpy values ----------------------------------------------------------


def _numpy_across_a_graph_break(x, n):
    grid = np.arange(n, dtype=np.float32)  # a numpy array live across the break
    torch._dynamo.graph_break()
    return x + torch.from_numpy(grid).sum()


@needs_comfy
def test_guard_filter_builds_guards_of_numpy_values():
    """Dynamo builds guards twice under a filter; a numpy array across a graph break made the
    second build raise InternalTorchDynamoError. The guard on it is kept: another length
    recompiles and gives its own result."""
    compiled = torch.compile(_numpy_across_a_graph_break, backend="eager",
                             options={"guard_filter_fn": sampling._skip_transformer_options_guards})
    x = torch.ones(3)
    torch.testing.assert_close(compiled(x, 4), x + 6)
    torch.testing.assert_close(compiled(x, 5), x + 10)
    torch.testing.assert_close(compiled(x, 4), x + 6)


# --- which errors are the compiler's ---------------------------------------------------------------


def _raised(make):
    try:
        make()
    except BaseException as error:  # noqa: BLE001
        return error
    raise AssertionError("nothing raised")


def _backend_failed(inner):
    return torch._dynamo.exc.BackendCompilerFailed(wavepass.wavespeed, inner, None)


def _inductor_error():
    raise torch._inductor.exc.InductorError(RuntimeError("injected lowering failure"), "")


def test_compile_failure_names_the_compiler_and_the_fix():
    import torch._inductor.exc

    unsupported = torch._dynamo.exc.Unsupported("injected graph break")
    assert "fullgraph off" in wavepass.compile_failure(unsupported)
    internal = wavepass.compile_failure(torch._dynamo.exc.InternalTorchDynamoError("injected"))
    assert "InternalTorchDynamoError: injected" in internal and "PyTorch" in internal
    inductor = wavepass.compile_failure(_backend_failed(_raised(_inductor_error)))
    assert "Inductor failed" in inductor and "injected lowering failure" in inductor
    ours = _raised(lambda: wavepass.runtime.module_of(3))  # a TypeError raised in wavepass
    assert "wavespeed backend failed" in wavepass.compile_failure(_backend_failed(ours))
    assert "wavespeed's cached program failed" in wavepass.compile_failure(ours)
    graph = torch.fx.symbolic_trace(lambda a, b: a @ b)  # code the compiler generates
    assert wavepass.compile_failure(_raised(lambda: graph(torch.ones(2), torch.ones(3)))) is not None


def test_errors_of_the_model_and_interrupts_are_not_the_compilers():
    assert wavepass.compile_failure(_raised(lambda: torch.ones(2) @ torch.ones(3))) is None
    assert wavepass.compile_failure(ValueError("the model's own")) is None
    out_of_memory = torch.OutOfMemoryError("injected")
    assert wavepass.compile_failure(out_of_memory) is None
    assert wavepass.compile_failure(_backend_failed(out_of_memory)) is None
    chained = torch._dynamo.exc.InternalTorchDynamoError("while tracing")
    chained.__cause__ = KeyboardInterrupt()
    assert wavepass.compile_failure(chained) is None

    class Interrupt(BaseException):
        pass

    chained.__cause__ = Interrupt()
    assert wavepass.compile_failure(chained) is not None
    assert wavepass.compile_failure(chained, (Interrupt,)) is None


# --- ComfyUI ---------------------------------------------------------------------------------------

HUNYUAN_DIT = {
    "image_model": "hydit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
    "depth": 4, "num_heads": 2, "mlp_ratio": 2.0, "text_states_dim": 16, "text_states_dim_t5": 16,
    "text_len": 4, "text_len_t5": 6, "qk_norm": True, "learn_sigma": True,
}


def hunyuan_dit(seed=0):
    """ComfyUI's HunyuanDiT (calc_rope: numpy in every forward, a graph break), tiny: a
    ModelPatcher and its positive and negative conditioning."""
    config = comfy.supported_models.HunyuanDiT(dict(HUNYUAN_DIT))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    comfy_models.randomize_(model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    g = torch.Generator().manual_seed(seed + 1)

    def conditioning():
        return [[torch.randn(1, 4, 16, generator=g),
                 {"attention_mask": torch.ones(1, 4), "conditioning_mt5xl": torch.randn(1, 6, 16, generator=g),
                  "attention_mask_mt5xl": torch.ones(1, 6)}]]

    return patcher, conditioning(), conditioning()


def sample(patcher, positive, negative, latent_shape, cfg=2.0):
    """The KSampler node's code (`nodes.common_ksampler`), seed 0, euler, from an empty latent."""
    latent = {"samples": torch.zeros(latent_shape)}
    return nodes.common_ksampler(patcher, 0, STEPS, cfg, "euler", "simple", positive, negative, latent)[0]["samples"]


def sample_dit(dit, model=None):
    patcher, positive, negative = dit
    return sample(patcher if model is None else model, positive, negative, (1, 4, 8, 8))


def fbcache(model, threshold=0.3):
    return ApplyFirstBlockCache.execute(
        model=model, object_to_patch="diffusion_model", residual_diff_threshold=threshold,
        start=0.0, end=1.0, max_consecutive_cache_hits=-1,
    ).result[0]


@pytest.fixture(scope="module")
def flux():
    return comfy_models.build("flux")


def sample_tiny(tiny, model=None, positive=None):
    """A comfy_models.TinyModel sampled, through `model` (default: its plain MODEL)."""
    return sample(tiny.patcher if model is None else model, positive or tiny.positive, tiny.negative,
                  tiny.spec.latent_shape, tiny.cfg)


@needs_comfy
def test_hunyuan_dit_caches_through_the_nodes(said):
    """The model of the report: with the guard filter fixed it compiles and caches."""
    dit = hunyuan_dit()
    plain = sample_dit(dit)
    exact = fbcache(dit[0], threshold=0.0)
    torch.testing.assert_close(sample_dit(dit, exact), plain, atol=1e-5, rtol=1e-5)
    cached = fbcache(dit[0], threshold=1.0)
    sample_dit(dit, cached)
    stats = wavepass.stats(cached)
    assert stats.reason is None and 0 < stats.hits < STEPS, stats
    assert said() == []


def _filter_without_the_fix(calls):
    def skip_transformer_options_guards(guard_entries):
        calls.append(1)
        return ["transformer_options" not in entry.name for entry in guard_entries]

    return skip_transformer_options_guards


@needs_comfy
def test_a_dynamo_crash_falls_back_to_the_plain_model(said, monkeypatch, caplog):
    """The crash of the report (the filter without its fix): KSampler's sampling completes
    with the plain model's latent, said once, the reason in stats, no compile retried per step;
    re-running the node retries once; the MODEL without our nodes is the model as it was."""
    dit = hunyuan_dit(seed=3)  # its own module: compiled versions live on the module
    plain = sample_dit(dit)
    compiles = []
    monkeypatch.setattr(sampling, "_skip_transformer_options_guards", _filter_without_the_fix(compiles))
    model = fbcache(dit[0])
    with caplog.at_level(logging.INFO, logger="wavepass"):
        first = sample_dit(dit, model)
    torch.testing.assert_close(first, plain, atol=0, rtol=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wavespeed: skipped")]
    assert len(lines) == 1 and lines[0].startswith(f"wavespeed: skipped 0 of {STEPS} model calls (not cached: "
                                                   "torch.compile failed on it (InternalTorchDynamoError"), lines
    messages = said()
    assert len(messages) == 1 and "InternalTorchDynamoError" in messages[0], messages
    assert "re-add" in messages[0] and "restart ComfyUI" in messages[0]
    stats = wavepass.stats(model)
    assert stats.calls == STEPS and stats.hits == 0, stats  # cond and uncond share a batch
    assert "InternalTorchDynamoError" in stats.reason and "Fix:" in stats.reason
    tried = len(compiles)
    assert tried >= 1

    torch.testing.assert_close(sample_dit(dit, model), plain, atol=0, rtol=0)  # the next run
    assert len(compiles) == tried and len(said()) == 1  # nothing retried, nothing said again
    assert wavepass.stats(model).calls == STEPS and wavepass.stats(model).reason == stats.reason

    again = fbcache(dit[0])  # the node runs again: one more try
    torch.testing.assert_close(sample_dit(dit, again), plain, atol=0, rtol=0)
    assert len(compiles) > tried and len(said()) == 1

    torch.testing.assert_close(sample_dit(dit), plain, atol=0, rtol=0)  # without our nodes
    assert dit[0].model.diffusion_model.__class__.__name__ == "HunYuanDiT"


@needs_comfy
def test_unsupported_code_under_fullgraph_falls_back(said):
    """Compile Model+ with fullgraph=True on a model with a graph break: Dynamo raises
    Unsupported before anything is compiled; the plain model runs, and the message says to
    turn fullgraph off."""
    dit = hunyuan_dit(seed=5)
    plain = sample_dit(dit)
    model = CompileModelPlus.execute(model=fbcache(dit[0]), object_to_patch="diffusion_model",
                                     mode="default", dynamic="auto", fullgraph=True, options="").result[0]
    torch.testing.assert_close(sample_dit(dit, model), plain, atol=0, rtol=0)
    messages = said()
    assert len(messages) == 1 and "fullgraph off" in messages[0], messages
    assert "Unsupported" in wavepass.stats(model).reason


def _raise_in_a_pass(*args, **kwargs):
    raise RuntimeError("injected failure of a pass")


def _raise_in_the_program(error):
    def call(self, *args):
        raise error

    return call


@needs_comfy
@pytest.mark.parametrize("where", ["pass", "program"])
def test_a_failing_pass_or_program_falls_back(flux, said, monkeypatch, where):
    plain = sample_tiny(flux)
    if where == "pass":  # at compile time: Dynamo's BackendCompilerFailed around it
        monkeypatch.setattr(wavepass.backend, "partition", _raise_in_a_pass)
        cause = "injected failure of a pass"
    else:  # at run time, from compiled code
        error = torch._dynamo.exc.InternalTorchDynamoError("injected failure at run time")
        monkeypatch.setattr(CachedProgram, "__call__", _raise_in_the_program(error))
        cause = "injected failure at run time"
    model = fbcache(flux.patcher)
    torch.testing.assert_close(sample_tiny(flux, model), plain, atol=0, rtol=0)
    torch.testing.assert_close(sample_tiny(flux, model), plain, atol=0, rtol=0)
    messages = said()
    assert len(messages) == 1 and cause in messages[0], messages
    stats = wavepass.stats(model)
    assert (stats.calls, stats.hits) == (STEPS, 0) and cause in stats.reason
    monkeypatch.undo()
    torch.testing.assert_close(sample_tiny(flux), plain, atol=0, rtol=0)  # without our nodes


@needs_comfy
def test_a_failure_on_the_split_path_falls_back_exactly(said, monkeypatch):
    """HiDream's stack is split by graph breaks and cached at the module level (its blocks'
    `forward` patched by wavepass.stack_cache): a compiled fragment that fails leaves the
    plain model's latent, run after run, and the MODEL without our nodes is exact too."""
    from wavepass.stack_cache import FragmentProgram

    hidream = comfy_models.build("hidream")
    plain = sample_tiny(hidream)
    error = torch._dynamo.exc.InternalTorchDynamoError("injected failure of a fragment")
    monkeypatch.setattr(FragmentProgram, "__call__", _raise_in_the_program(error))
    model = fbcache(hidream.patcher, threshold=1.0)
    for _ in range(2):
        torch.testing.assert_close(sample_tiny(hidream, model), plain, atol=0, rtol=0)
    messages = said()
    assert len(messages) == 1 and "injected failure of a fragment" in messages[0], messages
    assert wavepass.stats(model).hits == 0
    monkeypatch.undo()
    torch.testing.assert_close(sample_tiny(hidream), plain, atol=0, rtol=0)


def _interrupt():
    return comfy.model_management.InterruptProcessingException()


def _wrapped_interrupt():
    try:
        raise comfy.model_management.InterruptProcessingException()
    except BaseException as interrupt:  # as KeyboardInterrupt, not an Exception
        error = torch._dynamo.exc.InternalTorchDynamoError("while tracing")
        error.__cause__ = interrupt
        return error


@needs_comfy
@pytest.mark.parametrize("make_error", [
    _interrupt, _wrapped_interrupt, KeyboardInterrupt, lambda: torch.OutOfMemoryError("injected OOM"),
], ids=["interrupt", "interrupt-inside-dynamo-error", "keyboard-interrupt", "out-of-memory"])
def test_interrupts_and_out_of_memory_propagate(flux, said, monkeypatch, make_error):
    error = make_error()
    monkeypatch.setattr(CachedProgram, "__call__", _raise_in_the_program(error))
    model = fbcache(flux.patcher, threshold=0.3)
    with pytest.raises(type(error)) as raised:
        sample_tiny(flux, model)
    assert raised.value is error
    monkeypatch.undo()
    sample_tiny(flux, model)  # no fallback was kept: it caches
    stats = wavepass.stats(model)
    assert stats.reason is None and stats.hits > 0, stats
    assert said() == []


@needs_comfy
def test_a_bad_input_shape_is_the_models_error(flux, said):
    """Conditioning of the wrong width fails in the model itself: the user gets the model's
    error (not a Dynamo one), nothing is said, and the next good run caches."""
    model = fbcache(flux.patcher)
    wrong = [[torch.randn(1, 6, flux.spec.context_dim + 1), dict(flux.positive[0][1])]]
    with pytest.raises(RuntimeError) as raised:
        sample_tiny(flux, model, positive=wrong)
    assert not isinstance(raised.value, torch._dynamo.exc.TorchDynamoException), raised.value
    with pytest.raises(type(raised.value)):
        sample_tiny(flux, positive=wrong)  # the same error without our nodes
    sample_tiny(flux, model)
    stats = wavepass.stats(model)
    assert stats.reason is None and stats.hits > 0, stats
    assert said() == []


# --- diffusers -------------------------------------------------------------------------------------


@pytest.fixture
def flux_pipeline():
    pytest.importorskip("diffusers")
    from test_diffusers_integration import flux_pipe

    return flux_pipe()


def run(pipe, kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="latent", return_dict=False)[0]


def test_diffusers_falls_back_and_remove_restores(flux_pipeline, said, monkeypatch):
    from wavepass_diffusers import apply_wavespeed, remove_wavespeed

    pipe, kwargs = flux_pipeline
    plain = run(pipe, kwargs)
    monkeypatch.setattr(wavepass.backend, "partition", _raise_in_a_pass)
    apply_wavespeed(pipe, residual_diff_threshold=0.5, compile=False)
    torch.testing.assert_close(run(pipe, kwargs), plain, atol=0, rtol=0)
    torch.testing.assert_close(run(pipe, kwargs), plain, atol=0, rtol=0)
    messages = said()
    assert len(messages) == 1 and "injected failure of a pass" in messages[0], messages
    assert "remove_wavespeed(pipe)" in messages[0]
    stats = wavepass.stats(pipe.transformer)
    assert (stats.calls, stats.hits) == (STEPS, 0) and "injected failure of a pass" in stats.reason
    remove_wavespeed(pipe)
    assert pipe.transformer._compiled_call_impl is None
    torch.testing.assert_close(run(pipe, kwargs), plain, atol=0, rtol=0)


def test_diffusers_errors_of_the_model_and_out_of_memory_propagate(flux_pipeline, said, monkeypatch):
    from wavepass_diffusers import apply_wavespeed

    pipe, kwargs = flux_pipeline
    apply_wavespeed(pipe, residual_diff_threshold=0.5, compile=False)
    wrong = dict(kwargs, prompt_embeds=torch.randn(1, 6, 17))  # joint_attention_dim is 16
    with pytest.raises(RuntimeError) as raised:
        run(pipe, wrong)
    assert not isinstance(raised.value, torch._dynamo.exc.TorchDynamoException), raised.value
    out_of_memory = torch.OutOfMemoryError("injected OOM")
    monkeypatch.setattr(CachedProgram, "__call__", _raise_in_the_program(out_of_memory))
    with pytest.raises(torch.OutOfMemoryError):
        run(pipe, kwargs)
    monkeypatch.undo()
    run(pipe, kwargs)  # no fallback was kept: it caches
    stats = wavepass.stats(pipe.transformer)
    assert stats.reason is None and stats.hits > 0, stats
    assert said() == []

"""The `wavespeed` backend on real diffusers models, real Dynamo and (where it matters) Inductor.

Every cached run is compared with `ReferenceFBCache`, a plain-Python First Block Cache that
runs the eager model's stages; every uncached run with the eager or plain-Inductor model.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import models
import wavepass
from fbcache_reference import ReferenceFBCache
from wavepass.runtime import programs_of

STEPS = 10


def compiled(model, **options):
    return torch.compile(model, backend="wavespeed", options=options)


def run_backend(case, model, steps=STEPS):
    return models.sample(case, lambda x, t: model(**case.call_kwargs(x, t))[0], steps)


def run_reference(case, cache, steps=STEPS):
    return models.sample(case, lambda x, t: case.reference_call(cache, x, t), steps)


def assert_matches_reference(case, model, cache, atol=1e-5):
    latent, outputs = run_backend(case, model)
    ref_latent, ref_outputs = run_reference(case, cache)
    assert wavepass.stats(case.model).decisions == tuple(cache.decisions)
    for out, ref in zip(outputs, ref_outputs):
        torch.testing.assert_close(out, ref, atol=atol, rtol=atol)
    torch.testing.assert_close(latent, ref_latent, atol=atol, rtol=atol)


@pytest.fixture(scope="module")
def flux():
    return models.flux()


@pytest.fixture(scope="module")
def sd3():
    return models.sd3()


@pytest.fixture(scope="module")
def sdxl_unet():
    return models.sdxl_unet()


@pytest.mark.parametrize("name", ["flux", "sd3", "sdxl_unet"])
def test_threshold_zero_equals_the_model_under_inductor(name, request, no_fallback):
    """Inductor compiles every piece; at threshold 0 the outputs are the model's, to
    Inductor's rounding (compared with eager: a plain Inductor compile of the same model,
    cold in CI, would double the test's time for the same check)."""
    case = request.getfixturevalue(name)
    plain_latent, plain_outputs = run_backend(case, case.model, steps=3)
    latent, outputs = run_backend(case, compiled(case.model, residual_diff_threshold=0.0), steps=3)
    for out, ref in zip(outputs, plain_outputs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert wavepass.stats(case.model) == wavepass.Stats(3, 0, (False,) * 3)


@pytest.mark.parametrize(
    "name, compiler",
    [("flux", "eager"), ("sd3", "eager"), ("sdxl_unet", "eager"), ("flux", "inductor")],
)
def test_sampling_matches_reference(name, compiler, request, no_fallback):
    case = request.getfixturevalue(name)
    cache = ReferenceFBCache(case.mixed_threshold)
    model = compiled(case.model, residual_diff_threshold=case.mixed_threshold, compiler=compiler)
    assert_matches_reference(case, model, cache, atol=1e-5 if compiler == "eager" else 1e-4)
    assert 0 < sum(cache.decisions) < STEPS, "the test needs both skipped and computed steps"


@pytest.mark.parametrize("policy", ["taylor", "predictive", "accumulated"])
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_extrapolating_policies_match_their_reference(name, policy, request, no_fallback):
    """The policies are run-time settings. taylor: the same decisions as First Block Cache; a
    skipped step adds the residual extrapolated from the last two computed steps, as the
    reference computes it, which is not the First Block Cache result. predictive: those
    residuals, and decisions against the extrapolated first-block residual (other decisions).
    accumulated: predictive's, with the changes summed over a run of skipped steps (on flux,
    a run that predictive continues ends sooner)."""
    case = request.getfixturevalue(name)
    model = compiled(case.model, residual_diff_threshold=case.mixed_threshold, compiler="eager")
    reference = ReferenceFBCache(case.mixed_threshold, policy=policy)
    with wavepass.cache_settings(policy=policy):
        assert_matches_reference(case, model, reference, atol=1e-5)
    plain = ReferenceFBCache(case.mixed_threshold)
    latent, _ = run_reference(case, plain)
    assert any(plain.decisions) and (any(reference.decisions) or name == "sd3")  # sd3: predictive never skips
    assert (plain.decisions == reference.decisions) == (policy == "taylor")
    assert not torch.allclose(latent, run_reference(case, ReferenceFBCache(case.mixed_threshold, policy=policy))[0])
    if policy == "accumulated" and name == "flux":
        predictive = ReferenceFBCache(case.mixed_threshold, policy="predictive")
        run_reference(case, predictive)
        assert sum(reference.decisions) < sum(predictive.decisions)


def test_controlnet_residuals_between_blocks(flux, no_fallback):
    """FLUX adds ControlNet samples after every block: a skipped step must stay a correct
    program (the samples picked by index move out of the skipped blocks)."""
    generator = torch.Generator().manual_seed(1)
    samples = {
        "controlnet_block_samples": [0.1 * torch.randn(1, 16, 16, generator=generator)],
        "controlnet_single_block_samples": [0.1 * torch.randn(1, 16, 16, generator=generator) for _ in range(2)],
    }
    case = models.Case(**{**vars(flux), "inputs": {**flux.inputs, **samples}})
    stages_latent, _ = run_reference(case, ReferenceFBCache(0.0), steps=2)
    torch.testing.assert_close(stages_latent, run_backend(case, case.model, steps=2)[0])  # stages == model
    cache = ReferenceFBCache(case.mixed_threshold)
    assert_matches_reference(case, compiled(case.model, residual_diff_threshold=case.mixed_threshold, compiler="eager"), cache)
    assert any(cache.decisions)


def test_discovers_the_expected_blocks(flux, sd3, sdxl_unet, no_fallback):
    for case in (flux, sd3, sdxl_unet):
        run_backend(case, compiled(case.model, compiler="eager"), steps=1)
        (program,) = programs_of(case.model)
        assert program.blocks == case.blocks


@pytest.mark.parametrize(
    "options",
    [
        dict(max_consecutive_cache_hits=2),
        dict(max_consecutive_cache_hits=0),
        dict(warmup_steps=4),
        dict(warmup_steps=2, max_consecutive_cache_hits=1),
    ],
)
def test_limits_follow_the_reference(flux, options, no_fallback):
    threshold = 10.0  # everything may skip: the limits alone decide
    cache = ReferenceFBCache(threshold, options.get("max_consecutive_cache_hits", -1), options.get("warmup_steps", 0))
    assert_matches_reference(flux, compiled(flux.model, residual_diff_threshold=threshold, compiler="eager", **options), cache)
    decisions = "".join("X" if d else "." for d in wavepass.stats(flux.model).decisions)
    max_hits = options.get("max_consecutive_cache_hits", -1)
    if max_hits >= 0:
        assert "X" * (max_hits + 1) not in decisions
    assert "X" not in decisions[: options.get("warmup_steps", 0)]
    assert "X" in decisions or max_hits == 0


def test_skipping_window(flux, no_fallback):
    """Outside the window every step computes; inside, the cache works from what they stored."""
    model = compiled(flux.model, residual_diff_threshold=10.0, compiler="eager")
    window = range(3, 7)
    steps = iter(range(STEPS))

    def call(latent, t):
        with wavepass.skipping(next(steps) in window):
            return model(**flux.call_kwargs(latent, t))[0]

    models.sample(flux, call, STEPS)
    decisions = wavepass.stats(model).decisions
    assert decisions == tuple(step in window for step in range(STEPS))


def test_reset_starts_a_new_generation(flux, no_fallback):
    model = compiled(flux.model, residual_diff_threshold=flux.mixed_threshold, compiler="eager")
    first_latent, _ = run_backend(flux, model)
    first = wavepass.stats(model)
    run_backend(flux, model)  # without reset: the second generation sees the first one's residuals
    assert wavepass.stats(flux.model).calls == 2 * STEPS
    wavepass.reset(model)
    latent, _ = run_backend(flux, model)
    assert wavepass.stats(flux.model) == first
    assert not first.decisions[0] and any(first.decisions)
    torch.testing.assert_close(latent, first_latent, atol=0, rtol=0)


def test_two_models_alternating_on_one_graph_each_keep_their_state(no_fallback):
    """Two checkpoints of one architecture run one compiled graph (Dynamo guards on the
    structure, not on which weights): called in turn, each is decided against its own history
    and keeps its own stats, as two processes would."""
    cases = models.flux(), models.flux(seed=1)
    threshold = cases[0].mixed_threshold
    runs = [compiled(case.model, residual_diff_threshold=threshold, compiler="eager") for case in cases]
    caches = [ReferenceFBCache(threshold) for _ in cases]
    latents = [case.inputs[case.latent_key] for case in cases]
    counters.clear()
    for t in torch.linspace(1, 0, STEPS + 1)[:-1]:
        for i, case in enumerate(cases):
            timestep = (t * case.timestep_scale).expand(1)
            out = runs[i](**case.call_kwargs(latents[i], timestep))[0]
            expected = case.reference_call(caches[i], latents[i], timestep)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
            latents[i] = latents[i] - out / STEPS
    assert counters["stats"]["unique_graphs"] == 1  # one graph serves both
    for case, cache in zip(cases, caches):
        assert wavepass.stats(case.model).decisions == tuple(cache.decisions)
        assert any(cache.decisions)


def test_cache_context_keeps_separate_state(flux, no_fallback):
    """CFG as two calls per step: each branch is decided against its own history."""
    model = compiled(flux.model, residual_diff_threshold=flux.mixed_threshold, compiler="eager")
    caches = {"cond": ReferenceFBCache(flux.mixed_threshold), "uncond": ReferenceFBCache(flux.mixed_threshold)}
    prompts = {"cond": flux.inputs["encoder_hidden_states"], "uncond": torch.zeros_like(flux.inputs["encoder_hidden_states"])}
    decisions = []

    def cfg_step(latent, t):
        outs = {}
        for name in ("cond", "uncond"):
            kwargs = {**flux.call_kwargs(latent, t), "encoder_hidden_states": prompts[name]}
            with wavepass.cache_context(name):
                outs[name] = model(**kwargs)[0]
            reference_kwargs = {k: v for k, v in kwargs.items() if k != "return_dict"}
            expected = caches[name](*flux.stages, reference_kwargs)
            torch.testing.assert_close(outs[name], expected, atol=1e-5, rtol=1e-5)
            decisions.append(caches[name].decisions[-1])
        return outs["uncond"] + 2.0 * (outs["cond"] - outs["uncond"])

    models.sample(flux, cfg_step, STEPS)
    assert wavepass.stats(model).decisions == tuple(decisions)
    assert any(decisions)


def test_same_step_calls_follow_the_first_decision(flux, no_fallback):
    """Two calls per step in separate contexts under one `same_step` key: the first call
    decides as the reference does, the second follows it."""
    model = compiled(flux.model, residual_diff_threshold=flux.mixed_threshold, compiler="eager")
    leader = ReferenceFBCache(flux.mixed_threshold)
    prompts = {"cond": flux.inputs["encoder_hidden_states"],
               "uncond": 3.0 * torch.randn_like(flux.inputs["encoder_hidden_states"])}
    steps = iter(range(STEPS))

    def cfg_step(latent, t):
        outs = {}
        with wavepass.same_step(next(steps)):
            for name in ("cond", "uncond"):
                kwargs = {**flux.call_kwargs(latent, t), "encoder_hidden_states": prompts[name]}
                with wavepass.cache_context(name):
                    outs[name] = model(**kwargs)[0]
                if name == "cond":
                    leader(*flux.stages, {k: v for k, v in kwargs.items() if k != "return_dict"})
        return outs["uncond"] + 2.0 * (outs["cond"] - outs["uncond"])

    models.sample(flux, cfg_step, STEPS)
    decisions = wavepass.stats(model).decisions
    assert decisions[0::2] == tuple(leader.decisions) and any(leader.decisions)
    assert decisions[1::2] == decisions[0::2]


def test_new_resolution_starts_a_new_generation(no_fallback):
    """Under dynamic=True one graph serves every size; its state resets when the size changes."""
    torch.manual_seed(0)
    model = Blocks().eval()
    c = torch.compile(model, backend="wavespeed", dynamic=True,
                      options=dict(residual_diff_threshold=0.05, compiler="eager"))
    expected = []
    for shape in [(2, 4, 8), (2, 6, 8), (3, 6, 8), (2, 4, 8)]:
        cache = ReferenceFBCache(0.05)  # the reference starts afresh at each size
        x = torch.randn(shape)
        for step in range(4):
            x = x + 0.01 * torch.randn(shape)
            torch.testing.assert_close(c(x), cache(*model.stages(), x), atol=1e-5, rtol=1e-5)
        expected += cache.decisions
    assert wavepass.stats(model).decisions == tuple(expected)
    assert any(expected)
    assert len(programs_of(model)) == 1


def test_exception_mid_call_leaves_nothing_stale(flux, no_fallback):
    model = compiled(flux.model, residual_diff_threshold=10.0, compiler="eager")
    run_backend(flux, model, steps=3)
    (program,) = programs_of(flux.model)
    tail = program._tail

    def failing_tail(*args):  # fault injection: the epilogue raises once
        raise RuntimeError("injected failure")

    program._tail = failing_tail
    with pytest.raises(RuntimeError, match="injected failure"):
        model(**flux.call_kwargs(flux.inputs["hidden_states"], torch.tensor([0.5])))
    program._tail = tail
    before = wavepass.stats(flux.model).calls
    model(**flux.call_kwargs(flux.inputs["hidden_states"], torch.tensor([0.5])))
    stats = wavepass.stats(flux.model)
    assert stats.calls == before + 1 and stats.decisions[-1] is False  # no stale residual reused


def test_grad_mode_compiles_plainly_and_keeps_autograd(flux):
    model = compiled(flux.model, residual_diff_threshold=10.0, compiler="eager")
    kwargs = flux.call_kwargs(flux.inputs["hidden_states"], torch.tensor([0.5]))
    with torch.enable_grad(), pytest.warns(UserWarning, match="grad mode"):
        out = model(**kwargs)[0]
        out2 = model(**kwargs)[0]
        assert out.requires_grad and out2.requires_grad
        out.sum().backward()
    assert flux.model.proj_out.weight.grad is not None
    flux.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.detach(), flux.model(**kwargs)[0])
    stats = wavepass.stats(flux.model)  # both calls ran uncached, and stats says why
    assert (stats.calls, stats.hits) == (2, 0) and "grad mode is on" in stats.reason
    assert str(stats).startswith("wavespeed: skipped 0 of 2 model calls (not cached: grad mode is on")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"residual_diff_treshold": 0.1}, "unknown option.*residual_diff_threshold"),
        ({"residual_diff_threshold": -0.1}, "residual_diff_threshold must be a finite number >= 0"),
        ({"residual_diff_threshold": float("nan")}, "residual_diff_threshold must be"),
        ({"max_consecutive_cache_hits": -2}, "max_consecutive_cache_hits must be -1"),
        ({"warmup_steps": 1.5}, "warmup_steps must be an integer >= 0"),
        ({"compiler": "tensorrt"}, "compiler must be one of"),
        ({"outline_blocks": "yes"}, "outline_blocks must be True or False"),
        ({"bundle_kernels": 1}, "bundle_kernels must be True or False"),
    ],
)
def test_bad_options_name_the_fix(flux, options, message):
    model = compiled(flux.model, **options)
    with pytest.raises(Exception, match=message):
        model(**flux.call_kwargs(flux.inputs["hidden_states"], torch.tensor([0.5])))


class NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x).relu() + x


class Blocks(torch.nn.Module):
    """A tiny block stack, with an optional graph break in the prologue or inside block 2."""

    def __init__(self, graph_break: str | None = None):
        super().__init__()
        self.embed = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(Block(graph_break == "block" and i == 2) for i in range(4))
        self.out = torch.nn.Linear(8, 8)
        self.graph_break = graph_break

    def forward(self, x):
        x = self.embed(x)
        if self.graph_break == "prologue":
            torch._dynamo.graph_break()
        for block in self.blocks:
            x = block(x)
        return self.out(x)

    def stages(self):
        """head, rest, tail for `ReferenceFBCache`."""

        def head(x):
            x = self.embed(x)
            return x, {"img": self.blocks[0](x)}, None

        def rest(first, aux):
            x = first["img"]
            for block in self.blocks[1:]:
                x = block(x)
            return {"img": x}

        return head, rest, lambda final, aux: self.out(final["img"])


class Block(torch.nn.Module):
    def __init__(self, graph_break: bool):
        super().__init__()
        self.graph_break = graph_break
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.a(x).tanh()
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.b(x).tanh()


def test_inference_mode_weights_and_calls(no_fallback):
    """ComfyUI loads and runs models under torch.inference_mode(): inference tensors have no
    version counter, and the cache must still work."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = Blocks().eval()
        c = compiled(model, residual_diff_threshold=10.0, compiler="eager")
        x = torch.randn(2, 8)
        outputs = [c(x), c(x)]
    torch.testing.assert_close(outputs[0], model(x))
    torch.testing.assert_close(outputs[1], outputs[0])
    assert wavepass.stats(model).decisions == (False, True)


def test_model_without_blocks_warns_once_and_stays_correct():
    """Said at the second call, when no cached program ran since the first: until then the
    graph might be one piece of a model that another graph caches."""
    model = NoBlocks()
    c = compiled(model, compiler="eager")
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", wavepass.WavespeedWarning)
        torch.testing.assert_close(c(x), model(x))
    assert "no stack of repeated blocks" in wavepass.stats(model).reason  # stats say it at once
    with pytest.warns(UserWarning, match="no stack of repeated blocks") as record:
        torch.testing.assert_close(c(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c(x)
        torch.compile(NoBlocks(), backend="wavespeed", options={"compiler": "eager"})(x)
    assert len([w for w in record if "wavespeed" in str(w.message)]) == 1


class InPlaceBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        x += self.a(x).tanh()
        return x


class ReadsWhatTheBlocksWrite(torch.nn.Module):
    """The epilogue reads the first block's output, which the next blocks update in place:
    skipping them would leave it unwritten, so the cut is unsafe."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(InPlaceBlock() for _ in range(3))

    def forward(self, x):
        x = self.blocks[0](self.embed(x))
        first = x[:, :4]
        for block in self.blocks[1:]:
            x = block(x)
        return self.out(x), first


def test_unsafe_cut_warns_and_stays_correct():
    torch.manual_seed(0)
    model = ReadsWhatTheBlocksWrite().eval()
    c = compiled(model, residual_diff_threshold=10.0, compiler="eager")
    with pytest.warns(UserWarning, match="write in place into"):
        for _ in range(3):
            x = torch.randn(2, 8)
            for out, ref in zip(c(x), model(x)):
                torch.testing.assert_close(out, ref)
    stats = wavepass.stats(model)  # counted as uncached, with the reason
    assert (stats.calls, stats.hits) == (3, 0) and "write in place into" in stats.reason


class Residual(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))

    def forward(self, x):
        return x + self.mlp(x)


class TwoWidths(torch.nn.Module):
    """Two stacks joined by a projection to another width: nothing leads from the second
    stack's output back to a first-block output of the first (no residual path, no
    concatenation, no value of its shape), so the region of both cannot be cut; one stack can."""

    def __init__(self):
        super().__init__()
        self.embed, self.widen, self.out = torch.nn.Linear(8, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.narrow = torch.nn.ModuleList(Residual(8) for _ in range(3))
        self.wide = torch.nn.ModuleList(Residual(16) for _ in range(3))

    def forward(self, x):
        x = self.embed(x)
        for block in self.narrow:
            x = block(x)
        x = self.widen(x)
        for block in self.wide:
            x = block(x)
        return self.out(x)


def test_a_smaller_region_is_cached_and_said_where_the_larger_cannot_be_cut(caplog):
    torch.manual_seed(0)
    model = TwoWidths().eval()
    c = compiled(model, residual_diff_threshold=0.0, compiler="eager")
    with caplog.at_level("INFO", logger="wavepass"):
        for _ in range(2):
            x = torch.randn(2, 8)
            torch.testing.assert_close(c(x), model(x))
    assert wavepass.stats(model).reason is None
    cached = programs_of(model)[0].blocks
    assert cached in (tuple(f"narrow.{i}" for i in range(3)), tuple(f"wide.{i}" for i in range(3)))
    assert "not the larger region narrow[3 x Residual], wide[3 x Residual]" in caplog.text
    assert "continues no first-block output" in caplog.text


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
@pytest.mark.parametrize("where", ["prologue", "block"])
def test_graph_breaks_stay_correct(compiler, where):
    """A graph that holds the whole stack still caches, and the prologue's graph, without
    blocks, says nothing (a cached program runs between its calls); a stack split by a break
    in a block is cached around the stack at the module level (stack_cache.py), silently.
    Either way the results are the model's."""
    torch.manual_seed(0)
    model = Blocks(graph_break=where).eval()
    c = compiled(model, residual_diff_threshold=0.0, compiler=compiler)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(3):
            x = torch.randn(2, 8)
            torch.testing.assert_close(c(x), model(x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 2  # the break did split the model
    stats = wavepass.stats(model)  # model calls, not calls of each graph of the split model
    assert (stats.calls, stats.hits, stats.reason) == (3, 0, None)
    said = [str(w.message) for w in record if str(w.message).startswith("wavespeed")]
    assert said == []
    if where == "block":
        assert programs_of(model)[0].blocks == tuple(f"blocks.{i}" for i in range(4))


def test_no_recompiles_across_generations(flux, no_fallback):
    model = compiled(flux.model, residual_diff_threshold=flux.mixed_threshold, compiler="eager")
    run_backend(flux, model, steps=1)
    frames = dict(counters["frames"])
    decisions = []
    for _ in range(3):
        wavepass.reset(model)
        run_backend(flux, model)
        decisions.append(wavepass.stats(model).decisions)
    assert dict(counters["frames"]) == frames
    assert not counters["recompiles"]
    assert all(any(d) and not all(d) for d in decisions)  # hits and misses in every generation


def test_backend_registers_without_import():
    code = (
        "import sys, torch\n"
        "assert 'wavepass' not in sys.modules\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "c = torch.compile(m, backend='wavespeed', options={'compiler': 'eager'})\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(c(torch.ones(2, 4)), m(torch.ones(2, 4)))\n"
        "print('wavepass' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"


def test_weights_are_static_inputs_of_the_pieces(flux, monkeypatch, no_fallback):
    """Under CUDA graphs (here on the CPU, where Inductor compiles as for them and records
    none), Inductor is told which inputs of each piece are the model's weights (static
    inputs), as it is for Dynamo's whole graph: CUDA graphs copy every other input into the
    graph's memory at every replay. Over the pieces, the static inputs are plain Inductor's."""
    import torch._inductor.compile_fx as compile_fx

    static: list[int] = []
    static_input_idxs = compile_fx.get_static_input_idxs

    def counting(num_fixed):
        idxs = static_input_idxs(num_fixed)
        static.append(len(idxs))
        return idxs

    monkeypatch.setattr(compile_fx, "get_static_input_idxs", counting)
    call = flux.call_kwargs(flux.inputs["hidden_states"], torch.tensor([0.5]))
    with torch._functorch.config.patch(enable_autograd_cache=False):  # Inductor runs
        torch.compile(flux.model, backend="inductor", mode="reduce-overhead")(**call)
        (plain,) = static
        torch._dynamo.reset()
        static.clear()
        compiled(flux.model, residual_diff_threshold=0.0, inductor={"triton.cudagraphs": True})(**call)
    assert plain > 0 and sum(static) == plain, (plain, static)

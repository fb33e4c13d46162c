"""Models whose block stack Dynamo splits into several graphs: the module-level cache.

A graph break inside a block (a data-dependent `nonzero`, MoE routing, `.item()`, a print)
or between blocks makes Dynamo run the model's forward as Python and compile each block's
frames on their own; `wavepass.stack_cache` then caches around the stack. Every test
compares against `ReferenceFBCache` (tests/fbcache_reference.py), written without wavepass,
decision for decision, and many runs share one process as a user's session does. `GlueStack`
(dual streams returned text first, controls between blocks, blocks that write in place) is
also compared with the one-graph path: the same weights without graph breaks.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from hypothesis import given, settings
from hypothesis import strategies as st

import wavepass
from wavepass import notices
from fbcache_reference import ReferenceFBCache
from test_random_models import SLOW_EXAMPLES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import moe  # noqa: E402

WIDTH = 8


class BreakingBlock(torch.nn.Module):
    """x -> x + mlp(x + cond), with graph breaks at `breaks` (0: before the MLP, 1: inside
    it, through `nonzero`, whose shape Dynamo cannot know, 2: after it; "item": a `.item()`
    in the maths)."""

    def __init__(self, breaks: tuple = (1,)) -> None:
        super().__init__()
        self.breaks = breaks
        self.fc1, self.fc2 = torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if 0 in self.breaks:
            torch._dynamo.graph_break()
        h = torch.nn.functional.gelu(self.fc1(x + cond))
        if 1 in self.breaks:
            active = (h[..., 0] == h[..., 0]).nonzero()  # data-dependent shape (all rows: no recompiles)
            h = h * (1.0 + 0.0 * active.shape[0])
        if "item" in self.breaks:
            h = h * (1.0 + 0.0 * h.sum().item())
        out = x + 0.3 * self.fc2(h)
        if 2 in self.breaks:
            torch._dynamo.graph_break()
        return out


class BreakingStack(torch.nn.Module):
    """embed -> blocks (graph breaks inside them, and between blocks in `between`) -> head."""

    def __init__(self, blocks: list[tuple], between: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.between = between
        self.embed = torch.nn.Linear(WIDTH, WIDTH)
        self.time = torch.nn.Linear(1, WIDTH)
        self.blocks = torch.nn.ModuleList(BreakingBlock(b) for b in blocks)
        self.head = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = torch.tanh(self.time(t[:, None, None]))
        x = self.embed(x)
        for i, block in enumerate(self.blocks):
            if i in self.between:
                torch._dynamo.graph_break()
            x = block(x, cond)
        return self.head(x)

    # the stages the reference cache runs, written from the forward above
    def stages(self):
        def head(x, t):
            cond = torch.tanh(self.time(t[:, None, None]))
            h = self.embed(x)
            return h, {"x": self.blocks[0](h, cond)}, cond

        def rest(first, cond):
            x = first["x"]
            for block in self.blocks[1:]:
                x = block(x, cond)
            return {"x": x}

        def tail(final, cond):
            return self.head(final["x"])

        return head, rest, tail


def _steps(count: int, size: float = 0.02, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, WIDTH, generator=generator)
    for i in range(count):
        yield x + size * i * torch.randn(1, 4, WIDTH, generator=generator), torch.full((1,), 1.0 - i * size)


def _run_against_reference(model, compiled, threshold: float, steps, reference=None):
    reference = reference or ReferenceFBCache(threshold, main="x")
    wavepass.reset(model)
    with wavepass.cache_settings(residual_diff_threshold=threshold):
        for x, t in steps:
            expected = reference(*model.stages(), x, t)
            torch.testing.assert_close(compiled(x, t), expected, rtol=1e-5, atol=1e-5)
    assert list(wavepass.stats(model).decisions) == reference.decisions
    return reference.decisions


@pytest.fixture(scope="module")
def inductor_stack():
    """One stack with a `nonzero` inside every block, compiled by Inductor once for the tests
    that share it (conftest resets Dynamo per test; Inductor's disk cache keeps the code)."""
    torch.manual_seed(0)
    return BreakingStack([(1,), (1, 2), (1,), (1,)])


def test_every_block_breaking_caches_like_the_reference(inductor_stack):
    model = inductor_stack
    compiled = torch.compile(model, backend="wavespeed")
    steps = list(_steps(10))
    with torch.no_grad():
        compiled(*steps[0])  # the stack is learned during the first call
        compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        decisions = []
        for threshold in (0.0, 0.05, 0.1, 0.3, 0.1):  # tuned again and again: compiles nothing
            decisions += _run_against_reference(model, compiled, threshold, steps)
            assert wavepass.stats(model).reason is None
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles
    assert any(decisions) and not all(decisions)
    for x, t in steps[:2]:  # threshold 0 and eager agree
        with wavepass.cache_settings(residual_diff_threshold=0.0):
            torch.testing.assert_close(compiled(x, t), model(x, t))


def test_item_in_every_block():
    torch.manual_seed(1)
    model = BreakingStack([("item",)] * 3)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    steps = list(_steps(8))
    with torch.no_grad():
        compiled(*steps[0])
        decisions = _run_against_reference(model, compiled, 0.2, steps)
    assert any(decisions)


def test_the_first_call_after_compiling_is_cached_when_a_prologue_frame_comes_first():
    """A helper frame the skipped forward calls before the blocks (here Dynamo compiles
    `torch.tanh(self.time(...))`'s frame? no: the MoE model's `_sinusoids`) lets the backend
    learn the stack before block 0 runs: the very first call counts."""
    model = moe.build(moe.Config(depth=3))
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    latent, text = moe.inputs(model.config)
    with torch.no_grad():
        compiled(latent, text, torch.tensor([900.0]))
    assert wavepass.stats(model).calls == 1


class MoEStages:
    """The MoE denoiser's forward as the reference cache's stages."""

    def __init__(self, model: moe.MoEDenoiser) -> None:
        self.model = model

    def stages(self):
        m = self.model

        def head(latent, text, t):
            temb = m.time_in(moe._sinusoids(t, 64))
            img, txt = m.img_in(latent), m.txt_in(text)
            img1, txt1 = m.blocks[0](img, txt, temb)
            return img, {"img": img1, "txt": txt1}, temb

        def rest(first, temb):
            img, txt = first["img"], first["txt"]
            for block in m.blocks[1:]:
                img, txt = block(img, txt, temb)
            return {"img": img, "txt": txt}

        def tail(final, temb):
            return m.proj_out(m.norm_out(final["img"]))

        return head, rest, tail


def test_moe_stack_with_data_dependent_routing():
    model = moe.build(moe.Config(depth=4, experts=4, top_k=2), seed=3)
    compiled = torch.compile(model, backend="wavespeed")
    latent, text = moe.inputs(model.config, tokens=12)
    stages = MoEStages(model).stages()
    with torch.no_grad():
        compiled(latent, text, torch.tensor([1000.0]))
        for threshold in (0.3, 0.0):
            wavepass.reset(model)
            reference = ReferenceFBCache(threshold, main="img")
            x = latent
            with wavepass.cache_settings(residual_diff_threshold=threshold):
                for t in moe.timesteps(20):
                    tt = torch.full((1,), t * 1000.0)
                    expected = reference(*stages, x, text, tt)
                    out = compiled(x, text, tt)
                    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
                    x = x - expected / 20
            assert list(wavepass.stats(model).decisions) == reference.decisions
            assert any(reference.decisions) == (threshold > 0)


def test_fullgraph_still_fails_at_the_first_graph_break():
    model = BreakingStack([(2,), (2,)])
    compiled = torch.compile(model, backend="wavespeed", fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match="graph_break"):
        compiled(*next(_steps(1)))


class TupleBlock(torch.nn.Module):
    """Returns a value that continues none of its inputs (a shape no argument has)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(WIDTH, 2 * WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return self.fc(x)


class Widening(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([TupleBlock(), torch.nn.Sequential(torch.nn.Linear(2 * WIDTH, WIDTH))])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_blocks_that_do_not_continue_their_inputs_fall_back_and_say_why():
    model = Widening()
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    x = torch.randn(1, 4, WIDTH)
    with torch.no_grad(), pytest.warns(wavepass.WavespeedWarning, match="which does not have its shape"):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))
    stats = wavepass.stats(model)
    assert stats.hits == 0 and "which does not have its shape" in stats.reason


def test_another_model_of_the_class_is_cached_too_and_eager_calls_never_skip():
    """A second checkpoint of the same class shares Dynamo's compiled frames (the backend
    does not see it): the cache is put around its stack when its blocks first run. The
    same model called eagerly, outside torch.compile, runs every block."""
    torch.manual_seed(2)
    first, second = BreakingStack([(1,)] * 3), BreakingStack([(1,)] * 3)
    steps = list(_steps(8))
    with torch.no_grad():
        for model in (first, second):
            compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
            compiled(*steps[0])
            assert any(_run_against_reference(model, compiled, 0.3, steps))
        wavepass.reset()
        for x, t in steps:
            torch.testing.assert_close(first(x, t), ReferenceFBCache(0.0, main="x")(*first.stages(), x, t))
        assert wavepass.stats(first).calls == 0


def test_an_exception_inside_the_stack_leaves_nothing_stale():
    torch.manual_seed(3)
    model = BreakingStack([(1,)] * 3)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    steps = list(_steps(6))

    def fail(module, args):
        raise RuntimeError("interrupted")

    with torch.no_grad():
        compiled(*steps[0])
        reference = ReferenceFBCache(0.3, main="x")
        _run_against_reference(model, compiled, 0.3, steps[:3], reference)
        hook = model.blocks[1].register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            compiled(*steps[3])  # fails after block 0 decided
        hook.remove()
        reference.reset()
        with wavepass.cache_settings(residual_diff_threshold=0.3):
            for x, t in steps[3:]:  # starts clean: no skip before a computed call
                torch.testing.assert_close(compiled(x, t), reference(*model.stages(), x, t))
        assert not reference.decisions[0] and any(reference.decisions)


@settings(max_examples=12, **SLOW_EXAMPLES)
@given(
    blocks=st.lists(st.sets(st.sampled_from([0, 1, 2, "item"])).map(tuple), min_size=2, max_size=5),
    between=st.sets(st.integers(0, 4)).map(tuple),
    threshold=st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]),
    size=st.sampled_from([0.0, 0.005, 0.02, 0.1]),
    count=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_random_stacks_with_random_graph_breaks_match_the_reference(blocks, between, threshold, size, count, seed):
    torch._dynamo.reset()
    notices._warned.clear()
    torch.manual_seed(seed)
    model = BreakingStack(blocks, between)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    steps = list(_steps(count, size, seed))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", wavepass.WavespeedWarning)
        compiled(*steps[0])
        _run_against_reference(model, compiled, threshold, steps)
        assert wavepass.stats(model).reason is None


def test_diffusers_hidream_takes_the_split_path():
    """diffusers' HiDream routes its experts with `bincount` and `.cpu().numpy()`: 18 graph
    breaks. Threshold 0 gives the eager output; a threshold skips, within its hit limit."""
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(0)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_single_layers=3,
        attention_head_dim=8, num_attention_heads=2, caption_channels=[8, 8], text_emb_dim=8,
        axes_dims_rope=(4, 2, 2), max_resolution=(8, 8), llama_layers=[0, 1, 2, 3, 3]).eval()
    x = torch.randn(1, 16, 8, 8)
    kwargs = dict(encoder_hidden_states_t5=torch.randn(1, 6, 8), pooled_embeds=torch.randn(1, 8),
                  encoder_hidden_states_llama3=torch.randn(4, 1, 6, 8), return_dict=False)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    with torch.no_grad():
        for threshold in (0.0, 0.3):
            wavepass.reset(model)
            with wavepass.cache_settings(residual_diff_threshold=threshold, max_consecutive_cache_hits=2):
                for i in range(6):
                    t = torch.tensor([1000 - 20 * i])
                    out, expected = compiled(x, t, **kwargs)[0], model(x, t, **kwargs)[0]
                    if threshold == 0:
                        torch.testing.assert_close(out, expected)
            stats = wavepass.stats(model)
            assert stats.reason is None and stats.calls == 6
            assert (stats.hits > 0) == (threshold > 0) and not all(stats.decisions)
        (program,) = wavepass.runtime.programs_of(model)
        assert program.blocks == tuple(f"single_stream_blocks.{i}" for i in range(3))


@pytest.mark.parametrize("policy", ["taylor", "predictive", "accumulated"])
@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_extrapolating_policies_match_their_reference_on_the_split_path(threshold, policy):
    torch.manual_seed(4)
    model = BreakingStack([(1,)] * 4)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager", "policy": policy})
    steps = list(_steps(12))
    with torch.no_grad():
        compiled(*steps[0])
        reference = ReferenceFBCache(threshold, main="x", policy=policy)
        decisions = _run_against_reference(model, compiled, threshold, steps, reference)
    assert any(decisions)


@settings(max_examples=16, **SLOW_EXAMPLES)
@given(
    policy=st.sampled_from(wavepass.POLICIES),
    breaks=st.sampled_from([(), (1,)]),
    threshold=st.sampled_from([0.05, 0.1, 0.3, 1.0]),
    size=st.sampled_from([0.005, 0.02, 0.1]),
    count=st.integers(3, 12),
    seed=st.integers(0, 2**16),
)
def test_every_policy_matches_the_reference_on_both_paths_and_compiles_nothing(policy, breaks, threshold, size,
                                                                                count, seed):
    """Each policy, a run-time setting, decision for decision and output for output against
    the reference, on the one-graph path (no break) and the split path (a break in every
    block); choosing it after the model compiled compiles nothing more."""
    torch._dynamo.reset()
    notices._warned.clear()
    torch.manual_seed(seed)
    model = BreakingStack([breaks] * 4)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    steps = list(_steps(count, size, seed))
    with torch.no_grad():
        compiled(*steps[0])
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with wavepass.cache_settings(policy=policy):
            _run_against_reference(model, compiled, threshold, steps,
                                   ReferenceFBCache(threshold, main="x", policy=policy))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    (program,) = wavepass.runtime.programs_of(model)
    assert type(program).__name__ == ("StackCache" if breaks else "CachedProgram")


# ---------------------------------------------------------------------------------------------
# Streams by role, code between blocks, blocks that write in place: the split path against the
# one-graph path (the same model with no graph breaks) and the reference, call by call
# ---------------------------------------------------------------------------------------------

class GlueBlock(torch.nn.Module):
    """`BreakingBlock`'s maths on x, reading `txt`; `dual`: also updates `txt` and returns
    `(txt, x)` (the order of diffusers' Flux blocks); `inplace`: updates its arguments in place
    (`x += ...`, as ComfyUI's Flux blocks do) and returns them."""

    def __init__(self, breaks: tuple, dual: bool, inplace: bool) -> None:
        super().__init__()
        self.breaks, self.dual, self.inplace = breaks, dual, inplace
        self.fc1, self.fc2 = torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.Linear(2 * WIDTH, WIDTH)
        self.txt_fc = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, txt: torch.Tensor, cond: torch.Tensor):
        if 0 in self.breaks:
            torch._dynamo.graph_break()
        h = torch.nn.functional.gelu(self.fc1(x + cond + 0.5 * txt))
        if 1 in self.breaks:
            active = (h[..., 0] == h[..., 0]).nonzero()
            h = h * (1.0 + 0.0 * active.shape[0])
        if "item" in self.breaks:
            h = h * (1.0 + 0.0 * h.sum().item())
        dx = 0.3 * self.fc2(h)
        dt = 0.3 * torch.tanh(self.txt_fc(txt + x))
        if self.inplace:
            x += dx
            if self.dual:
                txt += dt
        else:
            x = x + dx
            txt = txt + dt
        if 2 in self.breaks:
            torch._dynamo.graph_break()
        return (txt, x) if self.dual else x


class GlueStack(torch.nn.Module):
    """embed -> blocks -> head, with as many text as image tokens; `control` after each block:
    "inplace" (`x[:, :2] += c`, ComfyUI's Flux ControlNet) or "new" (`x = x + c`, a new
    tensor between blocks, as diffusers' Flux ControlNet)."""

    def __init__(self, blocks: list[tuple], between: tuple[int, ...] = (), dual: bool = False,
                 inplace: bool = False, control: str | None = None) -> None:
        super().__init__()
        self.between, self.dual, self.control_kind = between, dual, control
        self.embed, self.text = torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, WIDTH)
        self.time = torch.nn.Linear(1, WIDTH)
        self.blocks = torch.nn.ModuleList(GlueBlock(b, dual, inplace) for b in blocks)
        self.control = torch.nn.Parameter(0.2 * torch.randn(len(blocks), 2, WIDTH))
        self.head = torch.nn.Linear(WIDTH, WIDTH)

    def without_breaks(self) -> GlueStack:
        """The same model (its weights) without a graph break: the one-graph path."""
        other = GlueStack([()] * len(self.blocks), (), self.dual, self.blocks[0].inplace, self.control_kind)
        other.load_state_dict(self.state_dict())
        return other

    def _control(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.control_kind == "inplace":
            x[:, :2] += self.control[i]
        elif self.control_kind == "new":
            x = x + torch.nn.functional.pad(self.control[i], (0, 0, 0, x.shape[1] - 2))
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = torch.tanh(self.time(t[:, None, None]))
        txt = self.text(x.flip(1))
        x = self.embed(x)
        for i, block in enumerate(self.blocks):
            if i in self.between:
                torch._dynamo.graph_break()
            if self.dual:
                txt, x = block(x, txt, cond)
            else:
                x = block(x, txt, cond)
            x = self._control(i, x)
        return self.head(x)

    def stages(self):
        """The reference's stages: everything from after block 0 to the end of the last block
        is the cached region (the control after block 0 too, the one after the last not)."""
        def head(x, t):
            cond = torch.tanh(self.time(t[:, None, None]))
            txt = self.text(x.flip(1))
            h = self.embed(x)
            block_input, txt_input = h.clone(), txt.clone()
            out = self.blocks[0](h, txt, cond)
            first = {"txt": out[0].clone(), "x": out[1].clone()} if self.dual else {"x": out.clone()}
            return block_input, first, (cond, txt_input)

        def rest(first, aux):
            cond, txt = aux
            x, txt = first["x"].clone(), first.get("txt", txt).clone()  # blocks may write in place
            x = self._control(0, x)
            for i, block in enumerate(self.blocks[1:], 1):
                if self.dual:
                    txt, x = block(x, txt, cond)
                else:
                    x = block(x, txt, cond)
                if i < len(self.blocks) - 1:
                    x = self._control(i, x)
            return {"x": x}

        def tail(final, aux):
            return self.head(self._control(len(self.blocks) - 1, final["x"].clone()))

        return head, rest, tail


def _outputs_and_decisions(model, compiled, threshold, steps):
    wavepass.reset(model)
    outputs = []
    with wavepass.cache_settings(residual_diff_threshold=threshold):
        for x, t in steps:
            outputs.append(compiled(x, t))
    return outputs, list(wavepass.stats(model).decisions), wavepass.stats(model).reason


def _split_one_graph_reference(model, threshold, steps):
    """The split path (`model`, with its graph breaks), the one-graph path (its weights without
    graph breaks) and the reference, call by call: each output and decision alike."""
    one_graph = model.without_breaks()
    results = []
    for m in (model, one_graph):
        compiled = torch.compile(m, backend="wavespeed", options={"compiler": "eager"})
        compiled(*steps[0])  # the stack is learned during the first call
        results.append(_outputs_and_decisions(m, compiled, threshold, steps))
    reference = ReferenceFBCache(threshold, main="x")
    expected = [reference(*model.stages(), x, t) for x, t in steps]
    (split, split_decisions, split_reason), (whole, whole_decisions, whole_reason) = results
    assert split_reason is None and whole_reason is None, (split_reason, whole_reason)
    assert split_decisions == whole_decisions == reference.decisions
    for got, same, want in zip(split, whole, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(same, want, rtol=1e-5, atol=1e-5)
    return reference.decisions


def _gradual(count: int, size: float = 0.01, seed: int = 0):
    """Inputs that change slowly, so that some calls skip at threshold 0.2."""
    generator = torch.Generator().manual_seed(seed)
    x, direction = torch.randn(1, 4, WIDTH, generator=generator), torch.randn(1, 4, WIDTH, generator=generator)
    return [(x + size * i * direction, torch.full((1,), 1.0 - 0.02 * i)) for i in range(count)]


def test_dual_streams_returned_text_first_with_equal_lengths_keep_their_roles():
    """Blocks return `(txt, img)` with as many text as image tokens: a pairing by shape hands
    the streams back swapped on skipped calls; by identity, each keeps its role."""
    torch.manual_seed(5)
    model = GlueStack([(1,)] * 4, dual=True)
    decisions = _split_one_graph_reference(model, 0.2, _gradual(8))
    assert any(decisions) and not all(decisions)


def test_an_inplace_control_between_blocks_belongs_to_the_cached_region():
    """`x[:, :2] += control` after every block (ComfyUI's Flux ControlNet): a skipped call
    returns block 0's output + residual, the residual holding the controls, as the one-graph
    path does (the controls are not added again on top of it)."""
    torch.manual_seed(6)
    model = GlueStack([(1,)] * 4, dual=True, control="inplace")
    decisions = _split_one_graph_reference(model, 0.2, _gradual(8))
    assert any(decisions)


def test_new_tensors_between_blocks_of_a_single_stream_are_its_stream():
    """One stream, which the code between blocks rebuilds (`x = x + control`, HiDream's
    concatenate and slice): there is nothing to confuse it with; cached like the one-graph path."""
    torch.manual_seed(7)
    model = GlueStack([(1,)] * 4, control="new")
    assert any(_split_one_graph_reference(model, 0.2, _gradual(8)))


def test_new_tensors_between_blocks_of_several_streams_turn_the_cache_off_and_say_why():
    torch.manual_seed(8)
    model = GlueStack([(1,)] * 3, dual=True, control="new")
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    steps = _gradual(5)
    with pytest.warns(wavepass.WavespeedWarning, match="builds new tensors"):
        for x, t in steps:
            with wavepass.cache_settings(residual_diff_threshold=1.0):
                torch.testing.assert_close(compiled(x, t), model(x, t))
    stats = wavepass.stats(model)
    assert stats.hits == 0 and stats.calls == len(steps) and "builds new tensors" in stats.reason


@pytest.mark.parametrize("dual", [False, True])
def test_a_first_block_that_updates_its_input_in_place_still_decides(dual):
    """`img += ...` in every block: the signal is measured against a copy of block 0's
    input (not `out - out = 0`, which never skips)."""
    torch.manual_seed(9)
    model = GlueStack([(1,)] * 4, dual=dual, inplace=True)
    assert any(_split_one_graph_reference(model, 0.2, _gradual(8)))


@settings(max_examples=10, **SLOW_EXAMPLES)
@given(
    blocks=st.lists(st.sets(st.sampled_from([0, 1, 2, "item"])).map(tuple), min_size=2, max_size=4),
    between=st.sets(st.integers(0, 3)).map(tuple),
    shape=st.sampled_from([(False, False, None), (True, False, None), (True, False, "inplace"),
                           (False, True, None), (True, True, "inplace"), (False, False, "new"),
                           (False, True, "inplace")]),
    threshold=st.sampled_from([0.0, 0.05, 0.2, 0.5]),
    size=st.sampled_from([0.0, 0.005, 0.02]),
    count=st.integers(2, 7),
    seed=st.integers(0, 2**16),
)
def test_random_glue_stacks_split_equal_one_graph_equal_reference(blocks, between, shape, threshold, size, count, seed):
    """Dual or single streams, blocks in place or not, controls between blocks, graph breaks
    at random places (or none): split path == one-graph path == reference, call by call."""
    torch._dynamo.reset()
    notices._warned.clear()
    torch.manual_seed(seed)
    dual, inplace, control = shape
    model = GlueStack(blocks, between, dual=dual, inplace=inplace, control=control)
    with warnings.catch_warnings():
        warnings.simplefilter("error", wavepass.WavespeedWarning)
        _split_one_graph_reference(model, threshold, _gradual(count, size, seed))


# ---------------------------------------------------------------------------------------------
# Removing the cache; threads
# ---------------------------------------------------------------------------------------------

def test_uninstall_restores_every_block_forward_exactly():
    torch.manual_seed(10)
    model = BreakingStack([(1,)] * 3)
    wrapped = model.blocks[1].forward  # a forward replaced before the cache (as diffusers' hooks do)
    model.blocks[1].forward = lambda *args, **kwargs: wrapped(*args, **kwargs)
    before = [block.__dict__.get("forward") for block in model.blocks]
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    compiled(*next(_steps(1)))
    assert all(block.__dict__.get("forward") is not b for block, b in zip(model.blocks, before))
    wavepass.stack_cache.uninstall(compiled)
    assert [block.__dict__.get("forward") for block in model.blocks] == before
    assert wavepass.stats(model).calls == 0


def test_remove_wavespeed_takes_the_cache_off_the_blocks():
    from wavepass_diffusers import apply_wavespeed, remove_wavespeed

    torch.manual_seed(11)
    model = BreakingStack([(1,)] * 3)
    pipe = type("Pipe", (), {})()
    pipe.transformer = model
    apply_wavespeed(pipe, compile=False)
    model(*next(_steps(1)))
    assert all("forward" in block.__dict__ for block in model.blocks)
    remove_wavespeed(pipe)
    assert not any("forward" in block.__dict__ for block in model.blocks)


@pytest.mark.parametrize("breaks", [(), (1,)], ids=["one graph", "split"])
def test_threads_in_the_default_context_keep_separate_state(breaks):
    """Thread A computes then skips; thread B's first call, with A's inputs, computes: it has
    nothing of its own stored (a shared default state would skip on A's residuals)."""
    import gc
    import threading

    torch.manual_seed(12)
    model = BreakingStack([breaks] * 3)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    x, t = next(_steps(1))
    compiled(x, t)
    wavepass.reset(model)

    def calls(n):
        with torch.no_grad(), wavepass.cache_settings(residual_diff_threshold=0.5):
            for _ in range(n):
                compiled(x, t)

    for n in (2, 1):
        thread = threading.Thread(target=calls, args=(n,))
        thread.start()
        thread.join()
    assert wavepass.stats(model).decisions == (False, True, False)
    gc.collect()
    (program,) = wavepass.runtime.programs_of(model)
    assert not program._states._threads  # a thread's state goes with it

"""A Python float the model reads (a LoRA strength under ComfyUI's partial loading) makes no
more Dynamo graphs than plain Inductor does (issue 29).

Under partial loading ("lowvram", the common case on consumer GPUs) ComfyUI leaves LoRA
patches unmerged: `comfy.ops.cast_bias_weight` applies them inside the forward through each
layer's `weight_function` (`comfy.model_patcher.LowVramPatch`), which reads the strength as a
Python float. Dynamo guards on that float's value; when it changes, automatic dynamic
(`specialize_float=False`) makes it symbolic, so a second graph serves every later strength.
AOTAutograd's `tensorify_python_scalars` then turns the float into a tensor, and ends by
specializing every float of the shape environment that the graph it compiles did not turn
into a tensor, restarting Dynamo's analysis (`TensorifyScalarRestartAnalysis`). The pieces of
a wavespeed graph share that shape environment: compiled apart, each piece specialized the
floats that only the others read, and every strength got a graph of its own, until the
recompile limit turned compiling off. `torch_api.floats_read_elsewhere` keeps them symbolic.

Dynamo's restarts pass through the backend: before, a restart raised by a block graph's
compile was taken for a failed outline (`pipeline.compile_plan`), the piece compiled whole.

Every test turns AOTAutograd's cache off: a cache hit skips the trace, and with it the pass.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import comfy_support
import wavepass
from wavepass import torch_api

STRENGTHS = (1.0, 0.5, 0.75, 0.6, 0.9, 0.3, 0.2, 0.1, 0.8, 0.4)  # changed ten times (the first is the start)


@pytest.fixture(autouse=True)
def traced_by_aot_autograd():
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


# --- a synthetic stack ------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """A residual block whose weight is patched by a Python float, as a LoRA is in lowvram."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.delta = torch.nn.Parameter(torch.randn(16, 16) * 0.1)
        self.act = torch.nn.Tanh()
        self.strength = 1.0

    def forward(self, x):
        weight = self.linear.weight + self.strength * self.delta
        return x + torch.nn.functional.linear(self.act(x), weight, self.linear.bias)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(4))
        self.proj_out = torch.nn.Linear(16, 8)

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def _run_strengths(model: torch.nn.Module, compiled, x: torch.Tensor) -> int:
    """Set every block's strength to each of STRENGTHS in turn; the compiled model equals the
    eager one each time. The unique graphs Dynamo made."""
    counters.clear()
    for strength in STRENGTHS:
        for block in model.blocks:
            block.strength = strength
        torch.testing.assert_close(compiled(x), model(x))
    return graphs()


def test_a_float_each_block_reads_makes_no_more_graphs_than_inductor(caplog, no_fallback):
    """Each block (the first in `head`, the others in `rest`, outlined as one block graph)
    reads its own float: wavespeed makes as many graphs as plain Inductor (two: the first
    strength, then one with the floats symbolic), every call runs the cached program, and no
    block graph is taken for one that failed to compile."""
    torch.manual_seed(0)
    model, x = _Model().eval(), torch.randn(2, 8)
    inductor = _run_strengths(model, torch.compile(model, backend="inductor"), x)
    torch._dynamo.reset()
    caplog.set_level(logging.INFO, logger="wavepass")
    ours = _run_strengths(model, torch.compile(model, backend="wavespeed",
                                               options={"residual_diff_threshold": 0.0}), x)
    assert (ours, inductor) == (2, 2)
    assert wavepass.stats(model).calls == len(STRENGTHS)  # compiling was never turned off
    assert counters["wavepass"]["blocks"] == 2 * len(model.blocks)  # outlined in both graphs
    assert not [r for r in caplog.records if "failed to compile" in r.getMessage()]


def test_without_the_api_a_float_is_specialized_per_value(without_piece_floats, caplog, no_fallback):
    """What `piece_floats` prevents: with its APIs missing, every strength is a graph of its
    own (each piece specializes the floats the others read). The restart still reaches
    Dynamo (`dynamo_restarts`): no piece is compiled whole for it."""
    torch.manual_seed(0)
    model, x = _Model().eval(), torch.randn(2, 8)
    caplog.set_level(logging.INFO, logger="wavepass")
    with torch._dynamo.config.patch(recompile_limit=len(STRENGTHS) + 1):
        ours = _run_strengths(model, torch.compile(model, backend="wavespeed",
                                                   options={"residual_diff_threshold": 0.0}), x)
    assert ours == len(STRENGTHS)
    assert not torch_api.enabled("piece_floats") and torch_api.enabled("dynamo_restarts")
    assert not [r for r in caplog.records if "failed to compile" in r.getMessage()]


@pytest.fixture
def without_piece_floats(without):
    """The APIs of `piece_floats` look missing, as on a torch without them."""
    without(*torch_api.FEATURES["piece_floats"].apis)


# --- ComfyUI with partial loading -------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy():
    nodes = comfy_support.require_nodes()
    import comfy.model_management
    import comfy.sample
    import comfy_models
    import folder_paths
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from wavepass_comfy.nodes import ApplyFirstBlockCache, CompileModelPlus

    return dict(nodes=nodes, model_management=comfy.model_management, sample=comfy.sample,
                models=comfy_models, folder_paths=folder_paths, TorchCompileModel=TorchCompileModel,
                ApplyFirstBlockCache=ApplyFirstBlockCache, CompileModelPlus=CompileModelPlus)


@pytest.fixture
def partial_loading(comfy, monkeypatch):
    """ComfyUI loads every model partially, as on a GPU with too little free memory.

    `comfy.model_management.load_models_gpu` gives `LoadedModel.model_load` the memory the
    weights may take, 0 for "load it all": on the CPU (vram state DISABLED) it is always 0. With
    0.1 bytes (what it passes for NO_VRAM) `ModelPatcher.load` loads no layer, and each
    patched layer gets a `weight_function` that applies its LoRA patch at every call."""
    loaded = comfy["model_management"].LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return loaded(self, lowvram_model_memory or 0.1, force_patch_weights)

    monkeypatch.setattr(comfy["model_management"].LoadedModel, "model_load", model_load)


def test_comfy_lora_strengths_under_partial_loading_compile_no_more_than_torch_compile_model(
        comfy, partial_loading, tmp_path):
    """Tiny ComfyUI Flux, loaded partially, a LoRA through LoraLoaderModelOnly at ten
    strengths: Apply First Block Cache -> Compile Model+ makes no more Dynamo graphs than
    ComfyUI's TorchCompileModel node (plain Inductor), and samples what the uncompiled
    model samples at each strength."""
    nodes, models = comfy["nodes"], comfy["models"]
    tiny = models.build("flux")
    comfy["folder_paths"].add_model_folder_path("loras", str(tmp_path))
    lora = models.write_lora(tmp_path, "lowvram.safetensors", tiny.diffusion_model, 1)

    def sample(model, strength):
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora, strength)[0]
        latent = tiny.latent()["samples"]
        noise = comfy["sample"].prepare_noise(latent, 0)
        out = comfy["sample"].sample(patched, noise, 2, tiny.cfg, "euler", "simple", tiny.positive,
                                     tiny.negative, latent, disable_pbar=True, seed=0)
        return out, patched

    def run(model) -> int:
        counters.clear()
        for strength in STRENGTHS:
            out, patched = sample(model, strength)
            torch.testing.assert_close(out, expected[strength], atol=1e-4, rtol=1e-4)
        assert patched.model.model_lowvram  # loaded partially: the patches ran in the forward
        return graphs()

    expected = {strength: sample(tiny.patcher, strength)[0] for strength in STRENGTHS}
    assert (expected[1.0] - expected[0.5]).abs().max() > 1e-3  # the strength matters

    plain = run(comfy["TorchCompileModel"].execute(model=tiny.patcher, backend="inductor").result[0])
    torch._dynamo.reset()
    cached = comfy["ApplyFirstBlockCache"].execute(
        model=tiny.patcher, object_to_patch="diffusion_model", residual_diff_threshold=0.0,
        start=0.0, end=1.0, max_consecutive_cache_hits=-1, policy="fbcache").result[0]
    compiled = comfy["CompileModelPlus"].execute(
        model=cached, object_to_patch="diffusion_model", mode="default", dynamic="auto",
        fullgraph=False, options="").result[0]
    ours = run(compiled)
    assert plain == 2 and ours <= plain, (ours, plain)
    assert counters["wavepass"]["pieces"] == 3 * ours  # head, rest and tail of each graph

"""Compile each distinct block once, and never recompile in ordinary use (issue #6).

Blocks of one structure share one compiled body (the weights are its inputs), the stitched
program equals the eager model, and a scripted session (new prompts, cache hits and misses,
a LoRA change in place and by replacement, new resolutions) compiles nothing new: Dynamo's
counters say so.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import models
import wavepass
import wavepass.options
from wavepass.compilers import compile_graph
from wavepass.passes.errors import UnsafeCut
from wavepass.passes.fx_facts import example_value
from wavepass.passes.split_blocks import split_blocks, structural_key

# (case, extra blocks, blocks, distinct block structures). Why the structures differ:
# FLUX: dual block 0 runs in the head and indexes the rotary embedding itself (the partition
# hoists that indexing out of the later blocks into the head); dual blocks 1-2 match; single
# block 0 reads the dual stack's contiguous text stream, the later ones a slice of a
# concatenation (other strides); singles 1-2 match; the last single block's text output is
# unused, so Dynamo's graph drops it. SD3 (no rotary embedding): blocks 0-2 match, the
# head's included; the last block is `context_pre_only` (no text output).
DEEP = {
    "flux": (models.flux, dict(num_layers=3, num_single_layers=4), 7, 5),
    "sd3": (models.sd3, dict(num_layers=4), 4, 2),
}


def deep_case(name: str) -> models.Case:
    """The tiny case with more blocks, so that blocks of one structure repeat."""
    make, layers, _, _ = DEEP[name]
    case = make()
    torch.manual_seed(1)
    model = type(case.model).from_config({**case.model.config, **layers}).eval()
    return models.Case(**{**vars(case), "model": model})


def call(case: models.Case, model, t: float = 0.5, **inputs):
    kwargs = {**case.call_kwargs(case.inputs[case.latent_key], torch.tensor([t * case.timestep_scale])), **inputs}
    return model(**kwargs)[0]


@pytest.fixture(scope="module", params=sorted(DEEP))
def deep(request):
    return request.param, deep_case(request.param)


def test_split_groups_blocks_by_structure(deep, no_fallback):
    """The pass alone (run as-is, no Inductor): one submodule per block, the program equals
    the model, and structural keys group the blocks into the expected structures."""
    name, case = deep
    outers = []

    def split_backend(gm, example_inputs):
        outers.append(split_blocks(gm))
        return outers[-1]

    out = call(case, torch.compile(case.model, backend=split_backend, fullgraph=True))
    torch.testing.assert_close(out, call(case, case.model))
    (outer,) = outers
    blocks = [n for n in outer.graph.find_nodes(op="call_module")
              if outer.get_submodule(n.target).meta["block"] is not None]
    keys = {structural_key(outer.get_submodule(n.target), [example_value(a) for a in n.args])
            for n in blocks}
    _, _, count, _ = DEEP[name]
    assert len(blocks) == count
    assert len(keys) < count  # some blocks share a structure


def test_identical_blocks_compile_once(deep, caplog, no_fallback):
    name, case = deep
    _, _, count, kinds = DEEP[name]
    caplog.set_level(logging.INFO, logger="wavepass")
    compiled = torch.compile(case.model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    for t in (0.3, 0.7):
        torch.testing.assert_close(call(case, compiled, t), call(case, case.model, t), atol=1e-4, rtol=1e-4)
    assert counters["wavepass"]["blocks"] == count
    assert counters["wavepass"]["block_graphs"] == kinds
    assert f"{count} block(s) in {kinds} distinct compiled block graph(s)" in caplog.text


def test_session_compiles_nothing_new(deep, no_fallback):
    """3 prompts with cache hits and misses, then a LoRA change in place and by replacement:
    one Dynamo graph, compiled once; every computed call equals the eager model."""
    name, case = deep
    model = copy.deepcopy(case.model)
    compiled = torch.compile(model, backend="wavespeed", options={"residual_diff_threshold": 0.2})
    generator = torch.Generator().manual_seed(0)

    def generation():
        wavepass.reset(compiled)
        prompt = torch.randn(case.inputs["encoder_hidden_states"].shape, generator=generator)
        for t in (0.9, 0.88, 0.86, 0.5):
            out = call(case, compiled, t, encoder_hidden_states=prompt)
            if not wavepass.stats(model).decisions[-1]:
                reference = call(case, model, t, encoder_hidden_states=prompt)
                torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)

    for _ in range(3):
        generation()
    lora_in_place(model)
    generation()
    lora_by_replacement(model)
    generation()
    decisions = wavepass.stats(model).decisions
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["wavepass"]["pieces"] == 3
    assert any(decisions) and not all(decisions), "the session needs cache hits and misses"


def lora_in_place(model: torch.nn.Module, rank: int = 2) -> None:
    """A LoRA fused into the attention query weights: `w += B @ A`."""
    generator = torch.Generator().manual_seed(2)
    for name, module in model.named_modules():
        if name.endswith("attn.to_q"):
            out_features, in_features = module.weight.shape
            lora = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
            module.weight.add_(0.1 * lora)


def lora_by_replacement(model: torch.nn.Module) -> None:
    """A loader that sets new same-shape parameters (the key projections)."""
    for name, module in model.named_modules():
        if name.endswith("attn.to_k"):
            module.weight = torch.nn.Parameter(module.weight.detach() * 1.1)


@pytest.mark.parametrize("family, sized", [
    ("flux", lambda n: models.flux(tokens=n * n)),
    ("sd3", lambda n: models.sd3(size=2 * n)),
])
def test_new_resolutions_reuse_one_dynamic_graph(family, sized, no_fallback):
    compiled_model = sized(5).model
    compiled = torch.compile(compiled_model, backend="wavespeed", dynamic=True,
                             options={"residual_diff_threshold": 0.0})
    for n in (5, 6, 7):
        case = models.Case(**{**vars(sized(n)), "model": compiled_model})
        torch.testing.assert_close(call(case, compiled), call(case, compiled_model), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def test_dynamic_graph_is_split_too(no_fallback):
    """A new resolution (torch's default `dynamic=None`) recompiles once, with symbolic sizes;
    that graph is split as well (each part receives the size symbols it uses)."""
    case = deep_case("sd3")
    options = wavepass.options.CacheOptions()
    compiled = torch.compile(case.model, backend=lambda gm, inputs: compile_graph(gm, inputs, options))
    for size in (8, 12, 16):
        sized = models.Case(**{**vars(models.sd3(size=size)), "model": case.model})
        torch.testing.assert_close(call(sized, compiled), call(sized, case.model), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["wavepass"]["whole_graphs"] == 0
    assert counters["wavepass"]["blocks"] == 2 * DEEP["sd3"][2]


class _InPlaceBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))

    def forward(self, x):
        x += self.mlp(x)  # writes into its input, as ComfyUI's blocks do
        return x


class _InPlaceModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(8, 8)
        self.blocks = torch.nn.ModuleList(_InPlaceBlock() for _ in range(3))

    def forward(self, x):
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return x


def test_in_place_writes_across_blocks_refuse_the_split():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(_InPlaceModel(), backend=capture)(torch.randn(2, 8))
    with pytest.raises(UnsafeCut, match="writes in place"):
        split_blocks(graphs[0])


def test_split_blocks_option_is_validated(deep):
    _, case = deep
    compiled = torch.compile(case.model, backend="wavespeed", options={"split_blocks": "yes"})
    with pytest.raises(Exception, match="split_blocks must be True or False"):
        call(case, compiled)

"""Compile each distinct block once, and never recompile in ordinary use (issue #6).

Blocks of one structure are calls of one block graph, which Inductor compiles once for all
pieces (the weights are its inputs); the compiled program equals the eager model, and a
scripted session (new prompts, cache hits and misses,
a LoRA change in place and by replacement, new resolutions) compiles nothing new: Dynamo's
counters say so.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

import models
import wavepass
import wavepass.options
from wavepass.pipeline import compile_graph
from wavepass.cpp_bundle import wait_for_builds
from wavepass.passes.errors import UnsafeCut
from wavepass.passes.outline_blocks import outline_blocks

# (case, extra blocks, blocks, outlined blocks, block graphs). Blocks are outlined where their
# structure occurs twice or more among the pieces, or where that makes a piece only block
# calls (which runs as Python); one block graph per outlined structure.
# Why the structures differ:
# FLUX: dual blocks 0-2 match (block 0 runs in the head; its indexing of the rotary
# embedding, which the partition hoists out of the later blocks, is peeled off as glue);
# single block 0 reads the dual stack's two contiguous outputs, the later ones two slices of
# one tensor, which differ only where the structure leaves layouts out (the stride of the
# batch dimension, of size 1, and the storage offset), so singles 0-3 match (each ends in
# two slices, which stay outside the subgraph, so the last block's unused text slice makes
# no difference): block graphs for duals 0-2 and singles 0-3. SD3 (no rotary embedding):
# blocks 0-2 match (block 0 in the head calls the block graph of 1-2 in `rest`); the last
# block is `context_pre_only` (no text output), a structure of its own, outlined so that
# `rest` is block calls only.
DEEP = {
    "flux": (models.flux, dict(num_layers=3, num_single_layers=4), 7, 7, 2),
    "sd3": (models.sd3, dict(num_layers=4), 4, 4, 2),
}
INVOKE_SUBGRAPH = torch.ops.higher_order.invoke_subgraph


def deep_case(name: str) -> models.Case:
    """The tiny case with more blocks, so that blocks of one structure repeat."""
    make, layers, *_ = DEEP[name]
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


def test_outline_groups_blocks_by_structure(deep, no_fallback):
    """The pass alone on a whole Dynamo graph (run as it is, no Inductor): subgraph calls for
    blocks of repeated structures, fewer subgraphs than calls, and the program equals the
    model."""
    name, case = deep
    outlined = []

    def outline_backend(gm, example_inputs):
        outlined.append(outline_blocks(gm))
        return outlined[-1]

    out = call(case, torch.compile(case.model, backend=outline_backend, fullgraph=True))
    torch.testing.assert_close(out, call(case, case.model))
    (graph,) = outlined
    calls = graph.graph.find_nodes(op="call_function", target=INVOKE_SUBGRAPH)
    kinds = {node.args[0].target for node in calls}
    _, _, count, _, _ = DEEP[name]
    assert len(kinds) < len(calls) <= count  # exact counts per piece: next test


def test_identical_blocks_compile_once(deep, caplog, monkeypatch, no_fallback):
    """Inductor compiles one graph per outlined block structure, not one per block nor one
    per piece (counted where Inductor lowers subgraphs inside a graph and where it is handed
    a block graph of its own; its FX graph cache is off here, so that everything is
    lowered), and the compiled program equals the eager model."""
    import torch._inductor.compile_fx as compile_fx_module
    from torch._inductor.graph import GraphLowering

    name, case = deep
    _, _, _, outlined, block_graphs = DEEP[name]
    lowered = []
    make_subgraph, compile_fx = GraphLowering.make_subgraph, compile_fx_module.compile_fx

    def counting(self, gm, *args, **kwargs):
        lowered.append(gm)
        return make_subgraph(self, gm, *args, **kwargs)

    def counting_graphs(gm, *args, **kwargs):  # compile_fx calls itself once more to patch config
        if "structure" in getattr(gm, "meta", {}) and all(gm is not g for g in lowered):
            lowered.append(gm)
        return compile_fx(gm, *args, **kwargs)

    monkeypatch.setattr(GraphLowering, "make_subgraph", counting)
    monkeypatch.setattr(compile_fx_module, "compile_fx", counting_graphs)
    caplog.set_level(logging.INFO, logger="wavepass")
    compiled = torch.compile(case.model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    with torch._inductor.config.patch(fx_graph_cache=False):
        for t in (0.3, 0.7):
            torch.testing.assert_close(call(case, compiled, t), call(case, case.model, t), atol=1e-4, rtol=1e-4)
    assert counters["wavepass"]["blocks"] == outlined
    assert counters["wavepass"]["block_graphs"] == block_graphs
    assert len(lowered) == block_graphs
    assert counters["wavepass"]["python_pieces"] == 1  # `rest` is block calls only
    assert f"{outlined} block(s) as calls of {block_graphs} compiled block graph(s)" in caplog.text


def test_a_new_process_finds_every_piece_in_the_cache(no_fallback, tmp_path):
    """A warm start: after this process compiled the model, a new process (same Inductor
    cache folder) loads head, tail and both block graphs from AOTAutograd's on-disk cache
    instead of tracing them again (`rest`, which only calls blocks, runs as Python), and
    finds every C++ library built: it runs no compiler. The cache keys hold block structures and the names pieces call block graphs by,
    which must not name anything by memory address. The block graphs run as Inductor's
    compiled modules, without AOTAutograd's wrappers, in the new process too."""
    with temporary_cache_dir(str(tmp_path)):  # its own folder: the other test worker builds too
        check_a_new_process_finds_every_piece(tmp_path)


def check_a_new_process_finds_every_piece(folder) -> None:
    case = deep_case("flux")
    call(case, torch.compile(case.model, backend="wavespeed", options={"residual_diff_threshold": 0.0}))
    libraries = built_libraries()
    code = (
        "import json, sys, torch\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from torch._dynamo.utils import counters\n"
        "import test_compile_once as t\n"
        "case = t.deep_case('flux')\n"
        "with torch.no_grad():\n"
        "    t.call(case, torch.compile(case.model, backend='wavespeed', options={'residual_diff_threshold': 0.0}))\n"
        "from wavepass.block_op import _registry\n"
        "runs = sorted(type(s.run).__name__ for s in _registry.values())\n"
        "print(json.dumps([dict(counters['aot_autograd']), runs, dict(counters['wavepass'])]))\n"
    )
    tests = os.path.dirname(__file__)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(folder))
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, tests], capture_output=True, text=True,
                          check=True, env=env)
    aot, runs, wavepass_counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert wavepass_counts["pieces"] == 3 and wavepass_counts["python_pieces"] == 1  # `rest` only calls blocks
    head_tail_and_block_graphs = 2 + DEEP["flux"][4]
    assert aot.get("autograd_cache_hit") == head_tail_and_block_graphs and not aot.get("autograd_cache_miss"), aot
    assert runs == ["CompiledFxGraph"] * DEEP["flux"][4]
    assert built_libraries() == libraries, sorted(built_libraries() ^ libraries)


def built_libraries() -> set[str]:
    """The kernel libraries (`*.main.so`, Inductor's and the bundles) in Inductor's cache
    folder, once no build writes there. Inductor's probes of the CPU's vector instructions
    (plain `*.so`) are left out: a new process may probe an instruction set again."""
    wait_for_builds()
    root = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    return {os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".main.so")}


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
    ("flux", lambda n: models.flux(tokens=n * n)),  # (SD3 behaves alike; one family keeps CI short)
])
def test_new_resolutions_reuse_one_dynamic_graph(family, sized, no_fallback):
    compiled_model = sized(5).model
    compiled = torch.compile(compiled_model, backend="wavespeed", dynamic=True,
                             options={"residual_diff_threshold": 0.0})
    for n in (5, 6, 7):
        case = models.Case(**{**vars(sized(n)), "model": compiled_model})
        torch.testing.assert_close(call(case, compiled), call(case, compiled_model), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def test_dynamic_graph_is_outlined_too(no_fallback):
    """A new resolution (torch's default `dynamic=None`) recompiles once, with symbolic sizes;
    that graph's blocks are subgraphs as well (each receives the size symbols it uses)."""
    case = deep_case("sd3")
    options = wavepass.options.CacheOptions()
    compiled = torch.compile(case.model, backend=lambda gm, inputs: compile_graph(gm, inputs, options))
    outlined = []
    for size in (8, 12, 16):
        sized = models.Case(**{**vars(models.sd3(size=size)), "model": case.model})
        torch.testing.assert_close(call(sized, compiled), call(sized, case.model), atol=1e-4, rtol=1e-4)
        outlined.append(counters["wavepass"]["blocks"])
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["wavepass"]["whole_graphs"] == 0
    static, dynamic, reused = outlined[0], outlined[1] - outlined[0], outlined[2] - outlined[1]
    assert static > 0 and dynamic > 0 and reused == 0


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


class _ViewBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))

    def forward(self, x):
        return self.mlp(x), x[:, :4]  # the second output is a view of the block's input


class _ViewModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ViewBlock() for _ in range(3))

    def forward(self, x):
        views = []
        for block in self.blocks:
            x, view = block(x)
            views.append(view)
        return x, torch.cat(views, 1)


def dynamo_graph(model: torch.nn.Module, *inputs) -> torch.fx.GraphModule:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(model, backend=capture)(*inputs)
    (graph,) = graphs
    return graph


def test_blocks_writing_into_their_input_refuse_the_outline():
    with pytest.raises(UnsafeCut, match="writes in place"):
        outline_blocks(dynamo_graph(_InPlaceModel(), torch.randn(2, 8)))


def test_trailing_views_stay_outside_the_subgraphs():
    """A block returning a view of its input (or FLUX's single block, two slices of one
    tensor) is a subgraph returning fresh tensors, with the views after the call: Inductor
    compiles it and the results equal the eager model. (The views leave the blocks, so the
    model gets no cache: it is the plain-Inductor fallback that compiles the subgraphs.)"""
    torch.manual_seed(0)
    model, x = _ViewModel().eval(), torch.randn(2, 8)
    outlined = outline_blocks(dynamo_graph(model, x))
    kinds = [m for m in outlined.children() if "structure" in m.meta]
    assert len(kinds) == 1 and len(kinds[0].graph.find_nodes(op="output")[0].args[0]) == 1
    compiled = torch.compile(model, backend="wavespeed")
    with torch.no_grad(), pytest.warns(UserWarning, match="without First Block Cache"):
        for got, expected in zip(compiled(x), model(x)):
            torch.testing.assert_close(got, expected)
    assert counters["wavepass"]["blocks"] == 3


def test_values_between_pieces_are_checked(deep, no_fallback):
    """Pieces run without Inductor's per-input size asserts; a value passed between pieces
    with other strides than its piece was compiled for is an error, never a wrong result."""
    _, case = deep
    model = copy.deepcopy(case.model)
    compiled = torch.compile(model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    with torch.no_grad():
        call(case, compiled)
        (program,) = wavepass.runtime.programs_of(model)
        checked = {slot for slot, sizes, _ in program._wiring.strides if len(sizes) >= 2 and min(sizes[-2:]) > 1}
        index = next(i for i, slot in enumerate(program._wiring.head_out) if slot in checked)
        head = program._head

        def restrided_head(*args):
            outputs = list(head(*args))
            x = outputs[index]
            outputs[index] = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values
            return tuple(outputs)

        program._head = restrided_head
        with pytest.raises(RuntimeError, match="passed between compiled pieces"):
            call(case, compiled)

"""Block structures compiled once for all pieces, called through `wavepass.blocks`.

The pass alone (`call_compiled_blocks`, with stand-in structures that run the block graph as
it is, no Inductor) on random stacks, some ending in a block of a structure of its own
(outlined with `every_block`, else inline): chains of blocks are single calls and the program
equals the model, also run as Python (`call_blocks_directly`) where it only calls blocks.
Through the backend: a second model of the same architecture calls the block graphs the
first one compiled, each with its own weights; block graphs live as long as a compiled
piece that calls them.
"""

from __future__ import annotations

import copy
import gc

import torch
import torch._dynamo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters

import wavepass
from test_compile_once import DEEP, call, deep_case
from wavepass import block_op
from wavepass.passes.call_blocks_directly import call_blocks_directly, calls_only_blocks
from wavepass.passes.call_compiled_blocks import blocks_called, call_compiled_blocks
from wavepass.passes.fx_facts import example_value
from wavepass.passes.outline_blocks import outline_blocks, structural_key


class Block(nn.Module):
    """A residual block on one stream (`x`) or two (`x` and the text stream `c`); an `odd`
    one ends in a `tanh`, a structure of its own (as SD3's last block is)."""

    def __init__(self, streams: int, odd: bool = False):
        super().__init__()
        self.streams, self.odd = streams, odd
        self.scale = nn.Linear(4, 8)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    def forward(self, x, c, temb):
        x = x + self.mlp(x * (1 + self.scale(temb)))
        if self.streams == 2:
            c = c + self.mlp(c) * 0.5
        return (torch.tanh(x) if self.odd else x), c


class Stack(nn.Module):
    """Blocks with optional glue after each: `x * 0.5` breaks a chain of calls."""

    def __init__(self, streams: int, glue: list[bool], odd_last: bool = False):
        super().__init__()
        self.glue = glue
        self.blocks = nn.ModuleList(Block(streams, odd_last and i == len(glue) - 1) for i in range(len(glue)))

    def forward(self, x, c, temb):
        for block, glue in zip(self.blocks, self.glue):
            x, c = block(x, c, temb)
            if glue:
                x = x * 0.5
        return x + c


def dynamo_graph(model: nn.Module, *inputs) -> tuple[torch.fx.GraphModule, list]:
    """Dynamo's graph of `model` and the inputs it passes the graph (weights included)."""
    graphs = []
    torch.compile(model, backend=lambda gm, example_inputs: graphs.append((gm, example_inputs)) or gm)(*inputs)
    (graph,) = graphs
    return graph


def stand_in_structures(outlined: torch.fx.GraphModule) -> dict[str, block_op.Structure]:
    """Each block graph registered as a structure that runs it as it is (a stand-in for its
    Inductor compile, which the backend tests below exercise)."""
    found = {}
    for kind, subgraph in outlined.named_children():
        (outputs,) = subgraph.graph.find_nodes(op="output")[0].args
        name = f"stand_in_{id(subgraph)}"
        found[kind] = block_op.register(block_op.Structure(name, subgraph.meta["structure"],
                                                           lambda args, subgraph=subgraph: subgraph(*args),
                                                           block_op.tensor_specs(map(example_value, outputs))))
    return found


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams=st.sampled_from([1, 2]), glue=st.lists(st.booleans(), min_size=3, max_size=6),
       odd_last=st.booleans(), every_block=st.booleans(), seed=st.integers(0, 2**16))
def test_chains_of_blocks_are_one_call_and_equal_the_model(streams, glue, odd_last, every_block, seed):
    torch.manual_seed(seed)
    model = Stack(streams, glue, odd_last).eval()
    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))
    torch._dynamo.reset()
    gm, graph_inputs = dynamo_graph(model, *inputs)
    outlined = outline_blocks(gm, every_block=every_block)
    structures = stand_in_structures(outlined)
    rewritten = call_compiled_blocks(outlined, {kind: s.name for kind, s in structures.items()})
    calls = rewritten.graph.find_nodes(op="call_function", target=block_op.BLOCKS)
    (got,) = rewritten(*graph_inputs)
    torch.testing.assert_close(got, model(*inputs))
    inline = odd_last and not every_block  # a structure that occurs once stays inline unless asked
    assert len(structures) == 1 + (odd_last and every_block)
    # glue after a block ends its chain (after the last: no call follows); an odd last block
    # is a call of its own, or none (inline)
    chains = 1 + sum(glue[:-2]) + (every_block if odd_last else glue[-2])
    assert len(calls) == chains
    assert sum(map(blocks_called, calls)) == len(glue) - inline
    assert not list(rewritten.children()), "the block graphs are called by name, not held"
    assert calls_only_blocks(rewritten) == (not any(glue) and not inline)  # `x * 0.5` is work of its own
    direct = call_blocks_directly(rewritten)
    assert not direct.graph.find_nodes(op="call_function", target=block_op.BLOCKS)
    (got,) = direct(*graph_inputs)
    torch.testing.assert_close(got, model(*inputs))


def test_a_second_model_calls_the_block_graphs_of_the_first(caplog, no_fallback):
    """Same architecture, other weights, compiled apart (other options): the block graphs
    are compiled once, each model's results equal its eager model."""
    first = deep_case("sd3")
    second_model = copy.deepcopy(first.model)
    with torch.no_grad():
        for p in second_model.parameters():
            p.mul_(1.5)
    compiled_first = torch.compile(first.model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    compiled_second = torch.compile(second_model, backend="wavespeed",
                                    options={"residual_diff_threshold": 0.0, "warmup_steps": 1})
    torch.testing.assert_close(call(first, compiled_first), call(first, first.model), atol=1e-4, rtol=1e-4)
    graphs_of_first = counters["wavepass"]["block_graphs"]
    torch.testing.assert_close(call(first, compiled_second), call(first, second_model), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(call(first, compiled_first), call(first, first.model), atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2
    assert graphs_of_first == DEEP["sd3"][4]
    assert counters["wavepass"]["block_graphs"] == graphs_of_first


def test_block_graphs_live_as_long_as_a_piece_that_calls_them(no_fallback):
    case = deep_case("sd3")
    compiled = torch.compile(case.model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    call(case, compiled)
    (program,) = wavepass.runtime.programs_of(case.model)
    names = {s.name for piece in (program._head, program._rest) for s in piece.structures}
    assert names and all(block_op.registered(name) for name in names)
    del compiled, program
    torch._dynamo.reset()
    gc.collect()
    assert not any(block_op.registered(name) for name in names)


def test_block_graphs_run_bare_where_the_wrappers_would_do_nothing(no_fallback):
    """Outside autocast, a block graph runs as Inductor's compiled module: AOTAutograd's
    runtime wrappers (~10 us a call) would pass its arguments and results through unchanged.
    The same blocks compiled under autocast are another program (AOTAutograd traces them
    with casts), compiled apart and run in the wrappers, which turn autocast off around
    Inductor's code; each model equals its eager model, with both compiled models alive."""
    from torch._inductor.output_code import CompiledFxGraph

    torch.manual_seed(0)
    plain = Stack(2, [False] * 4).eval()
    autocast = copy.deepcopy(plain)
    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))
    compiled_plain = torch.compile(plain, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    torch.testing.assert_close(compiled_plain(*inputs), plain(*inputs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled_autocast = torch.compile(autocast, backend="wavespeed", options={"residual_diff_threshold": 0.0})
        torch.testing.assert_close(compiled_autocast(*inputs), autocast(*inputs), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(compiled_plain(*inputs), plain(*inputs))

    def runs(model):
        (program,) = wavepass.runtime.programs_of(model)
        return {s.name: isinstance(s.run, CompiledFxGraph) for piece in (program._head, program._rest)
                for s in piece.structures}

    assert list(runs(plain).values()) == [True]
    assert list(runs(autocast).values()) == [False]
    assert runs(plain).keys() != runs(autocast).keys()


def _key(fn, *inputs):
    return structural_key(torch.fx.symbolic_trace(fn).graph, inputs)


def test_a_structure_leaves_out_layout_facts_inductor_never_reads():
    """The stride of a dimension of size 1 and the storage offset do not separate two blocks
    (FLUX's first single block reads contiguous tensors, the later ones slices of one); the
    stride of a larger dimension does, and so does the offset where the block calls
    `as_strided`, which addresses its input's storage from the start."""
    def block(x):
        return torch.relu(x) * 2

    def strided(x):
        return x.as_strided((3, 4), (4, 1), 0) * 2

    contiguous, joined = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
    assert _key(block, contiguous) == _key(block, joined[:, 2:])
    assert _key(block, torch.randn(2, 3, 4)) != _key(block, torch.randn(2, 5, 4)[:, 2:])
    assert _key(strided, contiguous) != _key(strided, joined[:, 2:])
    assert _key(strided, contiguous) == _key(strided, joined[:, :3])  # same offset, size-1 stride

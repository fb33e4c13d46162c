"""The compile pipeline: the passes run once, in order, into one plan, which a compiler compiles.

    pieces of one Dynamo graph: (name, graph, example inputs), e.g. head | rest | tail
      |  block_structures        how often each block structure occurs, over all pieces
      v
    per piece:
      outline_blocks             repeated blocks -> calls of one subgraph per structure
      call_compiled_blocks       calls of static structures -> wavepass.blocks calls by name
      call_blocks_directly       a piece of nothing but block calls -> Python calls
      v
    Plan: per piece the graph to compile, its block graphs, whether it runs as Python
      |  compile_plan (a `compiler_interface.CompilerInterface`)
      v
    block graphs compiled once per process (`block_op` registry), then each piece; the
    compiled pieces in order

Each pass is a pure function of the graph it is given; planning compiles nothing and runs no
node (the passes read the values Dynamo recorded on every node, `example_value`). Where a
piece's plan fails to compile (a block Inductor cannot compile as a subgraph), the piece is
compiled whole, as it was cut; Dynamo's restarts of its analysis pass through
(`torch_api.restart_exceptions`). A block structure that occurs in more than one piece, even
once in each, is compiled once. Counts and times go to `compile_session.py`.

`plain_fallback` is the single exit for graphs the cache cannot handle: it says why, once per
reason (`fallback_notice`; the backend defers it for a graph that may be one piece of a model
another graph caches), and compiles the whole graph as `backend="inductor"` would (its blocks
still compiled once per structure).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule

from . import torch_api
from .block_op import Structure, register, registered, source_key, tensor_specs
from .compile_session import count, session_of
from .compiler_interface import CompilerInterface, compiler_for
from .notices import warn_once
from .options import CacheOptions
from .passes.call_blocks_directly import call_blocks_directly, calls_only_blocks
from .passes.call_compiled_blocks import call_compiled_blocks, is_static
from .passes.errors import CannotCache
from .passes.fx_facts import example_value
from .passes.outline_blocks import block_structures, outline_blocks

log = logging.getLogger("wavepass")


@dataclass(frozen=True)
class BlockGraph:
    """A static block structure, compiled on its own once per process: `graph` (attribute
    `kind` of the outlined piece), registered and called as `name`."""

    kind: str
    name: str
    graph: GraphModule
    floats: frozenset[str]


@dataclass(frozen=True)
class PiecePlan:
    """How one piece compiles. `whole`: the piece as it was cut (compiled as it is where
    `calling` is None or fails). `calling`: its blocks outlined, the static ones called by
    name (`block_graphs`); `python`: `calling` run as Python, where it only calls blocks.
    `recorded_mode`: the fake mode of the Dynamo graph's values (its compile session).
    `floats`: per graph, the float symbols only other pieces read (kept symbolic)."""

    name: str
    whole: GraphModule
    example_inputs: tuple[Any, ...]
    recorded_mode: Any
    whole_floats: frozenset[str]
    calling: GraphModule | None = None
    calling_floats: frozenset[str] = frozenset()
    block_graphs: tuple[BlockGraph, ...] = ()
    python: GraphModule | None = None


@dataclass(frozen=True)
class Plan:
    """The pieces of one Dynamo graph, in order, each with its plan."""

    pieces: tuple[PiecePlan, ...]


def compile_pieces(pieces: Sequence[tuple[str, GraphModule, Sequence[Any]]], options: CacheOptions,
                   mode: str | None = None) -> list[Callable[..., Any]]:
    """Plan and compile the (name, graph, example inputs) pieces of one Dynamo graph; return
    the compiled pieces in order, each called as `f(*args)`."""
    compiler = compiler_for(options, mode)
    return compile_plan(plan(pieces, compiler, options.outline_blocks), compiler)


def compile_graph(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                  mode: str | None = None, name: str = "graph") -> Callable[..., Any]:
    """One graph (a fragment of a split stack, a whole graph) planned and compiled alone."""
    (compiled,) = compile_pieces([(name, gm, example_inputs)], options, mode)
    return compiled


def fallback_notice(reason: str, options: CacheOptions) -> str:
    return (f"wavespeed: {reason}; compiling without First Block Cache ({options.compiler} only), "
            f"results are unchanged")


def plain_fallback(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                   mode: str | None, reason: str, say: bool = True) -> Callable[..., Any]:
    """Compile `gm` without caching, after warning once for this `reason` (`say`; else the
    caller says `fallback_notice` when it knows the model runs uncached)."""
    if say:
        warn_once(fallback_notice(reason, options))
    return compile_graph(gm, example_inputs, options, mode, name="whole graph (no cache)")


def plan(pieces: Sequence[tuple[str, GraphModule, Sequence[Any]]], compiler: CompilerInterface,
         outline: bool) -> Plan:
    """Run the passes over every piece, once and in order (see the module docstring).
    `outline`: the option `outline_blocks`; blocks are outlined only for a compiler that
    compiles, on a torch that can (`outline_blocks`)."""
    outline = outline and compiler.compiles and torch_api.enabled("outline_blocks")
    occurrences: Counter[Hashable] = Counter()
    if outline:
        for _, gm, _ in pieces:
            occurrences += _structures_in(gm)
    floats = frozenset().union(*(_floats_read(gm) for _, gm, _ in pieces)) if compiler.compiles else frozenset()
    return Plan(tuple(_plan_piece(name, gm, example_inputs, compiler, outline, occurrences, floats)
                      for name, gm, example_inputs in pieces))


def _plan_piece(name: str, gm: GraphModule, example_inputs: Sequence[Any], compiler: CompilerInterface,
                outline: bool, occurrences: Counter[Hashable], floats: frozenset[str]) -> PiecePlan:
    """The plan of one piece. Blocks are outlined where Dynamo recorded values to key them by
    and without grad (training compiles the piece as Dynamo gave it). Blocks of a structure
    that occurs once stay inline, unless outlining them too leaves a piece that runs as
    Python (`outline_blocks(every_block=None)`): SD3's `rest` holds its last block, which
    differs from the others; compiled as a block graph of its own, that one block costs less
    than Inductor's compile of a piece over every block's weights."""
    if not compiler.compiles:  # run as it is, or by plain Inductor: no values to read
        return PiecePlan(name, gm, tuple(example_inputs), None, frozenset())
    fake_mode = torch_api.fake_mode_of(example_inputs)
    recorded_mode = fake_mode if fake_mode is not None else _placeholders_mode(gm, len(example_inputs))
    whole = PiecePlan(name, gm, tuple(example_inputs), recorded_mode, floats - _floats_read(gm) if floats else floats)
    if not outline or recorded_mode is None or torch.is_grad_enabled():
        return whole
    try:
        outlined = outline_blocks(gm, occurrences, every_block=None if compiler.runs_python_pieces else False)
    except CannotCache as exc:
        log.info("wavespeed: compiling %s whole: %s", name, exc)
        return whole
    names = structure_names(outlined, compiler.block_config)
    calling = call_compiled_blocks(outlined, names)
    block_graphs = tuple(BlockGraph(kind, block_name, getattr(outlined, kind), floats - _floats_read(getattr(outlined, kind)))
                         for kind, block_name in names.items())
    python = call_blocks_directly(calling) if compiler.runs_python_pieces and calls_only_blocks(calling) else None
    return PiecePlan(name, gm, whole.example_inputs, recorded_mode, whole.whole_floats, calling,
                     floats - _floats_read(calling), block_graphs, python)


def structure_names(outlined: GraphModule, block_config: Hashable) -> dict[str, str]:
    """The registry name of each static block subgraph of `outlined`, by attribute: a hash
    of its structure (the tensor type and dtype of every input included), the compiler's
    `block_config` (Inductor's patches), the autocast state it is compiled under and
    wavepass's sources (`block_op.source_key`): the name rides in the calling pieces' on-disk
    cache keys."""
    names = {}
    for kind, subgraph in outlined.named_children():
        if "structure" in getattr(subgraph, "meta", {}) and is_static(subgraph):
            program = (subgraph.meta["structure"], block_config, _autocast_state(subgraph), source_key())
            names[kind] = "wp_" + hashlib.sha256(repr(program).encode()).hexdigest()[:20]
    return names


def compile_plan(plan: Plan, compiler: CompilerInterface) -> list[Callable[..., Any]]:
    """The plan's pieces compiled, in order. The largest piece is compiled first: its C++
    kernels, the most, build in the background (`cpp_bundle`) while the smaller pieces are
    lowered."""
    if not compiler.compiles:
        return [compiler.compile_piece(piece.whole, piece.example_inputs) for piece in plan.pieces]
    largest_first = sorted(range(len(plan.pieces)), key=lambda i: -len(plan.pieces[i].whole.graph.nodes))
    with compiler.compiling():
        compiled = {i: _compile_piece(plan.pieces[i], compiler) for i in largest_first}
    return [compiled[i] for i in range(len(plan.pieces))]


def _compile_piece(piece: PiecePlan, compiler: CompilerInterface) -> Callable[..., Any]:
    session = session_of(piece.recorded_mode)
    started = time.perf_counter()
    compiled = None
    if piece.calling is not None:
        restarts = torch_api.restart_exceptions()
        try:
            structures, new = _compiled_structures(piece.block_graphs, compiler)
            run = piece.python.forward if piece.python is not None else compiler.compile_piece(
                piece.calling, piece.example_inputs, piece.calling_floats)
            compiled = _Piece(run, structures)
            detail = session.add_blocks(piece.calling, tuple(s.key for s in structures), new)
            if piece.python is not None:
                detail += ", run as Python"
                count("python_pieces")
        except restarts:  # Dynamo's control flow (a float to specialize): not a failure
            raise
        except Exception as exc:  # e.g. a block Inductor cannot compile as a subgraph
            log.info("wavespeed: compiling %s whole: its blocks failed to compile as subgraphs (%s: %s)",
                     piece.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    if compiled is None:
        compiled, detail = compiler.compile_piece(piece.whole, piece.example_inputs, piece.whole_floats), "whole"
        count("whole_graphs")
    seconds = time.perf_counter() - started
    session.add_piece(seconds)
    log.info("wavespeed: compiled %s (%d nodes, %s) in %.1f s", piece.name, len(piece.whole.graph.nodes),
             detail, seconds)
    log.info("wavespeed: this graph so far: %s", session.summary())
    return compiled


def _compiled_structures(block_graphs: tuple[BlockGraph, ...],
                         compiler: CompilerInterface) -> tuple[tuple[Structure, ...], int]:
    """The compiled structure of each block graph, compiled where no live one has its name,
    and how many were compiled."""
    found = []
    compiled = 0
    for block in block_graphs:
        structure = registered(block.name)
        if structure is None:
            started = time.perf_counter()
            run = compiler.compile_block(block.graph, block.floats)
            (outputs,) = block.graph.graph.find_nodes(op="output")[0].args
            log.info("wavespeed: compiled block structure %s (%d nodes) in %.1f s", block.name,
                     len(block.graph.graph.nodes), time.perf_counter() - started)
            structure = register(Structure(block.name, block.graph.meta["structure"], run,
                                           tensor_specs(map(example_value, outputs))))
            compiled += 1
        found.append(structure)
    return tuple(found), compiled


@dataclass(frozen=True)
class _Piece:
    """A compiled piece that calls compiled block structures: it keeps them alive."""

    run: Callable[..., Any]
    structures: tuple[Structure, ...]

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)


def _structures_in(gm: GraphModule) -> Counter[Hashable]:
    try:
        return block_structures(gm)
    except CannotCache:  # `_plan_piece` says why, when it plans this piece
        return Counter()


def _floats_read(gm: GraphModule) -> frozenset[str]:
    """The float symbols free in the values Dynamo recorded on `gm`'s nodes and on those of
    its subgraphs (outlined blocks): the Python floats it reads (`torch_api.float_symbols`)."""
    return torch_api.float_symbols(example_value(node) for module in gm.modules()
                                   if isinstance(module, GraphModule) for node in module.graph.nodes)


def _autocast_state(subgraph: GraphModule) -> tuple[tuple[str, bool, torch.dtype], ...]:
    """Autocast for each device type of the block's inputs: AOTAutograd traces the block
    under it (Dynamo's graph is the same), so a block compiled inside and one outside autocast
    are different programs."""
    values = map(example_value, subgraph.graph.find_nodes(op="placeholder"))
    devices = sorted({v.device.type for v in values if isinstance(v, torch.Tensor)})
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


def _placeholders_mode(gm: GraphModule, inputs: int) -> Any:
    """The fake mode of the values Dynamo recorded on `gm`'s placeholders, where it handed
    over real tensors (as it does to a backend for a whole graph; a piece's example inputs
    are fake already). None: no recorded values to key blocks by."""
    recorded = [example_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    return torch_api.fake_mode_of(recorded) if len(recorded) == inputs else None

"""The `wavespeed` torch.compile backend: First Block Cache and Inductor in one compile step.

    torch.compile(model, backend="wavespeed", options={...})
        -> Dynamo graph -> validate options -> find_blocks -> partition -> head | rest | tail
        -> pipeline (passes, then each piece compiled by Inductor) -> CachedProgram (runtime.py)

Graphs the cache cannot handle (no repeated blocks, a cut it cannot prove correct, grad
mode) are compiled whole, as `backend="inductor"` would, after one warning per reason, and
run as an `UncachedProgram` that counts its calls with that reason for `wavepass.stats`.

A graph of a frame that runs *inside* a block stack (Dynamo split the stack: a graph break in
a block or between blocks, so the blocks reach the backend as frames of their own) is a
fragment: compiled as it is, while `stack_cache.StackCache` caches around the stack at the
module level (`module_stack.py` finds the stack on the Python call stack).

The cache settings in `options=` (threshold, hit limit, warm-up) are only the program's
defaults: the program reads them at every call (`wavepass.cache_settings` overrides them),
so they never need another compile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .compiler_interface import compiler_for
from .diagnosis import frame_outside
from .distributed import collective_groups, decision_reducer
from .module_stack import Stack, enclosing_stack, modules_on_call_stack
from .options import CacheOptions
from .passes.errors import CannotCache, NoRepeatedBlocks
from .passes.find_blocks import find_blocks
from .passes.fx_facts import example_value
from .passes.partition import CachedPartition, Piece, partition
from .pipeline import compile_graph, compile_pieces, fallback_notice, plain_fallback
from .runtime import CachedProgram, UncachedProgram, Wiring, watched_module
from .stack_cache import FragmentProgram, adopt
from .torch_api import core_unavailable_reason, enabled

log = logging.getLogger("wavepass")


def wavespeed(gm: GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
              mode: str | None = None) -> Any:
    """Dynamo backend entry point (registered as "wavespeed")."""
    opts = CacheOptions.from_dict(options)
    mode = mode if mode is not None else opts.mode
    unavailable = core_unavailable_reason()
    if unavailable is not None:  # a torch whose internals wavepass cannot use: plain Inductor
        return _uncached(gm, example_inputs, opts, mode, unavailable)
    if torch.is_grad_enabled():
        return _uncached(gm, example_inputs, opts, mode,
                         "grad mode is on (training, or a call outside torch.no_grad()), "
                         "where cached steps would have no gradient")
    stack = enclosing_stack() if enabled("split_stacks") else None
    if stack is not None:
        return _fragment(gm, example_inputs, opts, mode, stack)
    try:
        part, larger = _first_partition(gm)
    except NoRepeatedBlocks as exc:
        outside = frame_outside(watched_module())
        if outside is not None:
            return _uncached(gm, example_inputs, opts, mode, outside)
        return _uncached(gm, example_inputs, opts, mode, str(exc), maybe_a_piece=True)
    except CannotCache as exc:
        return _uncached(gm, example_inputs, opts, mode, str(exc))
    wiring = _wiring(part, example_inputs)
    head, rest, tail = compile_pieces(
        [(name, piece.gm, [example_value(n) for n in piece.inputs])
         for piece, name in ((part.head, "head"), (part.rest, "rest"), (part.tail, "tail"))],
        opts, mode)
    log.info("wavespeed: caching blocks %s, %d stream(s), decided on `%s`%s", part.region.describe(),
             len(part.streams), part.signal_source.name,
             "".join(f"; not the larger region {region} ({reason})" for region, reason in larger))
    blocks = tuple(block.path for block in part.region.blocks)
    return CachedProgram(head, rest, tail, wiring, opts.settings, blocks,
                         stores_copies=compiler_for(opts, mode).records_cuda_graphs, reduce=decision_reducer(gm))


def _fragment(gm: GraphModule, example_inputs: Sequence[Any], opts: CacheOptions, mode: str | None,
              stack: Stack) -> FragmentProgram:
    """A graph of a frame inside `stack`, compiled as it is; the stack gets its cache, which
    reduces its decision over the process groups the graph communicates over."""
    groups = collective_groups(gm)
    adopt(stack, wavespeed, groups)
    running = {id(m) for m in modules_on_call_stack()}
    of_anchor_block = any(id(block) in running for block in stack.blocks)
    compiled = compile_graph(gm, example_inputs, opts, mode, name="fragment of a split stack")
    return FragmentProgram(compiled, of_anchor_block, wavespeed, groups)


def _uncached(gm: GraphModule, example_inputs: Sequence[Any], opts: CacheOptions, mode: str | None,
              reason: str, maybe_a_piece: bool = False) -> UncachedProgram:
    """The whole graph compiled without the cache, its calls counted with `reason`, said
    once. `maybe_a_piece`: a graph without blocks may be one piece of a model that another
    graph caches (the prologue before a graph break, a hook's frame around the model): its
    reason is said only where no cached program runs between its first two calls."""
    compiled = plain_fallback(gm, example_inputs, opts, mode, reason, say=not maybe_a_piece)
    notice = fallback_notice(reason, opts) if maybe_a_piece else None
    return UncachedProgram(compiled, _parameter_slots(example_inputs), reason, notice)


def _parameter_slots(example_inputs: Sequence[Any]) -> tuple[int, ...]:
    return tuple(i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter))


def _first_partition(gm: GraphModule) -> tuple[CachedPartition, list[tuple[str, str]]]:
    """Partition the first region `find_blocks` offers (the most cached work first, a bounded
    number of them) that can be cut correctly, with the (region, reason) of each larger one
    that could not; else `CannotCache` with each distinct reason, the most preferred region's
    first."""
    failed: list[tuple[str, str]] = []
    for region in find_blocks(gm):
        try:
            return partition(gm, region), failed
        except CannotCache as exc:
            failed.append((region.describe(), str(exc)))
    raise CannotCache("; ".join(dict.fromkeys(reason for _, reason in failed)))


def _wiring(part: CachedPartition, example_inputs: Sequence[Any]) -> Wiring:
    slots: dict[Node, int] = {node: i for i, node in enumerate(part.placeholders)}

    def slot(node: Node) -> int:
        return slots.setdefault(node, len(slots))

    def read(piece: Piece) -> tuple[int, ...]:
        return tuple(slot(n) for n in piece.inputs)

    def write(piece: Piece) -> tuple[int, ...]:
        return tuple(slot(n) for n in piece.outputs)

    head_out, rest_out = write(part.head), write(part.rest)
    wiring = dict(
        head_in=read(part.head), head_out=head_out, rest_in=read(part.rest), rest_out=rest_out,
        tail_in=read(part.tail),
        streams=tuple((tuple(map(slot, s.sources)), s.dim, slot(s.result)) for s in part.streams),
    )
    parameters = _parameter_slots(example_inputs)
    activations = tuple(i for i in range(len(example_inputs)) if i not in set(parameters))
    return Wiring(num_slots=len(slots), parameters=parameters, activations=activations,
                  strides=_strides(part, slots), **wiring)


def _strides(part: CachedPartition, slots: dict[Node, int]) -> tuple[tuple[int, tuple, tuple], ...]:
    """(slot, sizes, strides) that rest and tail were compiled for, of each value passed
    between pieces (graph inputs are Dynamo's to guard) whose sizes and strides are static."""
    inputs = set(part.placeholders)
    strides_of = {}
    for node in (*part.rest.inputs, *part.tail.inputs):
        value = example_value(node)
        if node in inputs or not isinstance(value, torch.Tensor):
            continue
        sizes, strides = tuple(value.shape), tuple(value.stride())
        if all(isinstance(x, int) for x in (*sizes, *strides)):
            strides_of[slots[node]] = (sizes, strides)
    return tuple((slot, sizes, strides) for slot, (sizes, strides) in strides_of.items())

"""Cut a graph into head | rest | tail so that skipping `rest` is a correct program.

    before (one Dynamo graph)                  after (three graphs and their wiring)
    --------------------------------------     -----------------------------------------------
    x, c, t, params...  (placeholders)         head(x, c, t, params)
    prologue: embed(x), embed(c), temb(t)        -> prologue, first block,
    block 0  (first block)                       -> first-block outputs s_i = (img0, txt0),
    block 1 .. block N-1                         -> signal = img0 - copy(block-0 input)
    epilogue: norm_out(img), proj_out          rest(s_i, temb, ..., params)
    output                                       -> blocks 1..N-1: outputs o_j (img_N)
                                                 -> residuals r_j = o_j - copy(s_j)
                                               tail(o_j, temb, ..., params)
                                                 -> epilogue, the graph's outputs

A runtime that skips `rest` sets `o_j = s_j + r_j` (the residuals stored at the last call
that ran `rest`), which is First Block Cache. The cut is correct when, and only when:

- every value `rest` hands on is a tensor that continues one first-block output `s_j`
  (along a residual path, found by `find_streams.trace_stream`), or a concatenation of them
  (`cat((txt0, img0))` where two stacks are joined: then `o_j = cat(...) + r_j`), or, where
  no path exists, as in a UNet, the last first-block output of its shape. A first-block
  output is a value the first block computes, or one of its inputs it writes in place
  (`x[:, :n] += y; return x` keeps the node of `x`);
- values computed inside `rest`'s range that do not depend on the streams (e.g. a ControlNet
  sample picked by index) are needed by `tail` on skipped steps: they move to `head`;
- `rest` writes in place into no value that the caller sees, and into none that `tail`
  reads but through the value's own node (a stream updated only in place, whose node
  `rest` then hands on as it hands on the values it computes);
- the deciding first-block output (below) has an input to the first block on a residual
  path within it (`trace_stream`): the signal is its output minus that input, and never
  another value (no path: `UnsafeCut`, the model runs uncached with that reason).

The deciding stream is chosen by data flow, never by shape or size:

1. the first-block outputs that the model's output is computed from: walk back from the
   graph's output through the epilogue (`find_streams.read_regions`, which keeps the region a
   slice reads across ops that keep the sliced dimension apart) to the values `rest` hands on,
   and from each to the first-block output its stream continues, or, for a joined stream, the
   parts of its `cat` that the region read overlaps (ComfyUI's Flux: the epilogue reads
   `h[:, T:]` of `cat((txt0, img0))`: `img0`, however long the text is);
2. if there are several (an epilogue that reads the image and the text), the ones whose input
   to the first block is computed, in the prologue, from a *latent input*: an activation input
   of the graph (not a parameter) that one of its output tensors has the sizes of, the noisy
   latent a denoiser returns a prediction for (the image stream; the text comes from the
   prompt embedding);
3. last resort, where that leaves several (or none qualifies): the latest in graph order.

Otherwise the pass raises `UnsafeCut` with the reason. In-place block code (ComfyUI's blocks
do `img += ...`) is kept correct by copies: the first block's input is copied before the block
runs (for the signal), and `rest` and `tail` write into copies of their inputs, never into
the inputs themselves (so residuals are measured against unwritten sources, and aliasing
between inputs cannot differ between the trace and a skipped step).

The input graph is not changed; the pieces are new `GraphModule`s that share its attributes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from .errors import UnsafeCut
from .find_blocks import BlockRegion
from .find_streams import disjoint, parts_read, read_regions, slice_region, trace_concatenation, trace_stream
from .subgraph import graph_reading
from .fx_facts import (
    alias_root, depends_on, example_value, inputs_of, is_inplace, is_tensor, same_shape, same_sizes,
    size_inputs, written_bases,
)


@dataclass(frozen=True)
class Piece:
    """A graph cut from the original: reads `inputs`, returns `outputs` (original nodes)."""

    gm: GraphModule
    inputs: tuple[Node, ...]
    outputs: tuple[Node, ...]


@dataclass(frozen=True)
class Stream:
    """`rest` turns the first-block output `sources[0]` into `result`, or, where `dim` is
    set, the concatenation `cat(sources, dim)` of first-block outputs."""

    sources: tuple[Node, ...]
    result: Node
    dim: int | None = None


@dataclass(frozen=True)
class CachedPartition:
    """head returns `head.outputs` + (signal,); rest returns `rest.outputs` + one residual per
    stream. The signal is the first block's change of `signal_source`."""

    placeholders: tuple[Node, ...]
    head: Piece
    rest: Piece
    tail: Piece
    streams: tuple[Stream, ...]
    signal_source: Node
    region: BlockRegion


def partition(gm: GraphModule, region: BlockRegion) -> CachedPartition:
    """Cut `gm` around the blocks of `region`; raise `UnsafeCut` where the cut is not correct."""
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    placeholders = tuple(n for n in nodes if n.op == "placeholder")
    first_start = position[region.first_block.nodes[0]]
    head_end = position[region.first_block.nodes[-1]]
    rest_end = position[region.last_block.nodes[-1]]

    output = nodes[-1]
    first_block = nodes[first_start : head_end + 1]
    block_inputs = [n for n in inputs_of(first_block, set(first_block)) if is_tensor(n)]
    first_outputs = set(first_block) | (written_bases(first_block) & set(block_inputs))
    head = [n for n in nodes[: head_end + 1] if n.op != "placeholder"]
    rest = [n for n in nodes[head_end + 1 : rest_end + 1] if n.op != "placeholder"]
    tail = [n for n in nodes[rest_end + 1 : -1] if n.op != "placeholder"]
    tail_set = set(tail) | {output}

    hoisted = _stream_free_values_for_tail(rest, tail_set, first_outputs)
    head += hoisted
    rest = [n for n in rest if n not in set(hoisted)]
    rest_set = set(rest)
    written_for_tail = _values_rest_writes_for_tail(nodes, rest, rest_set, tail_set)

    results = [n for n in rest if any(user in tail_set for user in n.users)] + written_for_tail
    sources = sorted((n for n in inputs_of(rest, rest_set) if is_tensor(n)), key=position.__getitem__)
    streams = tuple(_stream_of(result, sources, first_outputs, rest_set) for result in results)
    if not streams:
        raise UnsafeCut("the epilogue reads nothing the blocks computed; nothing to cache")
    deciding = _deciding_outputs(streams, output, tail_set, first_outputs, region)
    inputs = {source: trace_stream(source, block_inputs, set(first_block)) for source in deciding}
    if len(deciding) > 1:
        latents = _latent_inputs(placeholders, output)
        from_latent = [s for s in deciding if inputs[s] is not None and depends_on(inputs[s], latents)]
        deciding = from_latent or deciding
    signal_source = max(deciding, key=position.__getitem__)
    signal_input = inputs[signal_source]
    if signal_input is None:
        raise UnsafeCut(
            f"the input of the stream that decides (`{signal_source.name}`) to the first block "
            f"({region.first_block.path}) cannot be traced: no residual path (`x + f(x)`, "
            "`addcmul(x, ...)`, ...) leads from its output back to an input of the block, so its "
            "residual cannot be measured"
        )

    head_outputs = tuple(n for n in head if any(u in rest_set or u in tail_set for u in n.users))
    head_piece = _build_head(gm, head, head_outputs, signal_source, signal_input, first_block[0])
    rest_piece = _build_rest(gm, rest, rest_set, tuple(results), streams)
    tail_piece = _build(gm, tail, inputs_of(tail + [output], set(tail)), (), output_node=output)
    return CachedPartition(placeholders, head_piece, rest_piece, tail_piece, streams, signal_source, region)


def _deciding_outputs(streams: tuple[Stream, ...], output: Node, tail: set[Node], first_outputs: set[Node],
                      region: BlockRegion) -> list[Node]:
    """The first-block outputs that the graph's output is computed from (rule 1 above)."""
    reads = read_regions(output, {s.result for s in streams}, tail)
    found: dict[Node, None] = {}
    for stream in streams:
        for region in reads.get(stream.result, ()):
            parts = stream.sources if stream.dim is None else parts_read(stream.sources, stream.dim, region)
            found.update(dict.fromkeys(p for p in parts if p in first_outputs))
    if not found:
        raise UnsafeCut(
            f"the model's output is computed from no value that the first block "
            f"({region.first_block.path}) computes; no residual of it can decide"
        )
    return list(found)


def _latent_inputs(placeholders: tuple[Node, ...], output: Node) -> set[Node]:
    """The graph's activation inputs (not parameters) that one of its output tensors has the
    sizes of: the latent a denoiser predicts for."""
    outputs = [n for n in output.all_input_nodes if is_tensor(n)]
    return {
        p for p in placeholders
        if is_tensor(p) and not isinstance(example_value(p), torch.nn.Parameter)
        and any(same_sizes(p, o) for o in outputs)
    }


def _stream_free_values_for_tail(rest: list[Node], tail: set[Node], first_outputs: set[Node]) -> list[Node]:
    """Nodes of `rest` that `tail` needs and that depend neither on the first block's work nor
    on a value the blocks write in place (in `head` they would read it unwritten)."""
    written = written_bases(rest)
    depends: dict[Node, bool] = {}
    for node in rest:
        depends[node] = any(
            a in first_outputs or alias_root(a) in written or depends.get(a, False)
            for a in node.all_input_nodes
        )
    needed: set[Node] = set()
    todo = [n for n in rest if not depends[n] and any(u in tail for u in n.users)]
    while todo:
        node = todo.pop()
        if node in needed:
            continue
        needed.add(node)
        todo.extend(a for a in node.all_input_nodes if a in depends)
    # A value in head (a tuple from split or chunk, a tensor) is read through getitem: move the
    # getitems too, but for views the blocks write through (`img[:, :n] += c`), which stay.
    written_through = {n.args[0] for n in rest if is_inplace(n) and isinstance(n.args[0], Node)}
    for node in rest:
        if node.target is operator.getitem and node.args[0] not in depends and node not in written_through:
            needed.add(node)
    moved = [n for n in rest if n in needed]
    for node in moved:
        if is_inplace(node):
            raise UnsafeCut(
                f"`{node.name}` writes in place between the blocks and the epilogue depends on it"
            )
    return moved


def _values_rest_writes_for_tail(nodes: list[Node], rest: list[Node], rest_set: set[Node],
                                 tail: set[Node]) -> list[Node]:
    """Values from before `rest` that it writes in place and `tail` reads: `rest` hands them on
    (the copies it writes, see `_build`), as it hands on the values it computes.

    A block that updates its stream only in place (`x[:, :n] += y; return x`) keeps the node of
    `x`: the value after the blocks is `x`'s node. `rest` may write in place only into such
    values, or into values that nothing after it reads: a write the caller sees (into a graph
    input), or one `tail` reads through another alias (a view made before `rest`), would be
    left undone by a skipped step.
    """
    written = written_bases(rest) - rest_set
    for node in nodes:
        root = alias_root(node)
        if root in written and node not in rest_set and (
            root.op == "placeholder" or (node is not root and any(user in tail for user in node.users))
        ):
            raise UnsafeCut(
                f"the blocks write in place into `{root.name}`, which the model's caller or its "
                "epilogue reads; a skipped step would leave it unwritten"
            )
    return [node for node in nodes if node in written and any(user in tail for user in node.users)]


def _stream_of(result: Node, sources: list[Node], first_outputs: set[Node], rest: set[Node]) -> Stream:
    """The first-block output(s) that `result` continues.

    Along a residual path if there is one (a first-block output before any other value, such
    as a ControlNet sample added on the way), or a concatenation of such paths (two stacks
    joined by a `cat`). Where no path exists, as in a UNet whose up path concatenates skip
    connections and changes channels, the last first-block output of the same shape, dtype
    and device: the residual then spans everything after that output.
    """
    if not is_tensor(result):
        raise UnsafeCut(
            f"the epilogue reads `{result.name}` from between the blocks, which is not a tensor"
        )
    from_block = [s for s in sources if s in first_outputs]
    source = trace_stream(result, from_block, rest) or trace_stream(result, sources, rest)
    if source is not None:
        return Stream((source,), result)
    joined = trace_concatenation(result, from_block, rest, fallback=sources)
    if joined is not None:
        return Stream(joined.parts, result, joined.dim)
    same_shape_outputs = [s for s in from_block if same_shape(s, result)]
    if not same_shape_outputs:
        raise UnsafeCut(
            f"`{result.name}` leaves the blocks but continues no first-block output: no "
            "residual path or concatenation of them leads back to one and none has its shape"
        )
    return Stream((same_shape_outputs[-1],), result)


def _build(gm, nodes, inputs, outputs, output_node=None, before=None, after=None) -> Piece:
    """A new GraphModule running `nodes`.

    Inputs that `nodes` write into in place are copied first and the copies are written
    instead, so no piece but the head (whose inputs are the model's) mutates its inputs: a
    piece's inputs may alias one another differently at run time (a skipped step builds them
    afresh) than in the trace. `before(graph, env, node)` may add nodes as they are copied;
    `after(graph, env, placeholders)` returns extra outputs. Every piece also takes the
    graph's size inputs (SymInt placeholders under dynamic shapes): Inductor needs each symbol
    a piece's values use among its inputs.
    """
    inputs = list(inputs) + [s for s in size_inputs(gm) if s not in inputs]
    graph, env = graph_reading(inputs)
    placeholders = dict(env)
    for value in _inputs_written_in_place(nodes, inputs):
        env[value] = _copy(graph, placeholders[value], f"{value.name}_copy")
    for node in nodes:
        if before is not None:
            before(graph, env, node)
        env[node] = graph.node_copy(node, env.__getitem__)
    if output_node is not None:
        graph.node_copy(output_node, env.__getitem__)
        outs = tuple(output_node.all_input_nodes)
    else:
        extra = after(graph, env, placeholders) if after is not None else ()
        graph.output(tuple(env[n] for n in outputs) + tuple(extra))
        outs = tuple(outputs)
    graph.lint()
    return Piece(GraphModule(gm, graph), tuple(inputs), outs)


def _inputs_written_in_place(nodes, inputs) -> list[Node]:
    """Inputs (or views of them) that `nodes` write into, when copying each is exact: inputs
    that share a base must be provably disjoint slices of it (FLUX's `h[:, :T]`, `h[:, T:]`)."""
    written = written_bases(nodes)
    copied = [v for v in inputs if v.op != "placeholder" and alias_root(v) in written]
    by_base: dict[Node, list[Node]] = {}
    for value in copied:
        by_base.setdefault(alias_root(value), []).append(value)
    for base, views in by_base.items():
        if len(views) < 2:
            continue
        regions = [slice_region(v) for v in views]
        if any(r is None or r[0] is not base for r in regions) or not all(
            disjoint(a[1], b[1]) for i, a in enumerate(regions) for b in regions[i + 1 :]
        ):
            raise UnsafeCut(
                f"the blocks write in place into views of `{base.name}` that may overlap"
            )
    return copied


def _copy(graph: Graph, value: Node, name: str) -> Node:
    return graph.create_node("call_function", torch.clone, (value,), name=name)


def _sub(graph: Graph, a: Node, b: Node, name: str) -> Node:
    return graph.create_node("call_function", torch.sub, (a, b), name=name)


def _build_head(gm, head, outputs, signal_source: Node, signal_input: Node, first_node: Node) -> Piece:
    """Head = prologue + first block; it also returns the signal that decides a skip.

    The first block's input is copied before the block runs: in-place block code would
    otherwise make "output minus input" zero.
    """
    copies: dict[str, Node] = {}

    def before(graph, env, node):
        if node is first_node:
            copies["input"] = _copy(graph, env[signal_input], "wavepass_block_input")

    def after(graph, env, placeholders):
        return (_sub(graph, env[signal_source], copies["input"], "wavepass_signal"),)

    return _build(gm, head, inputs_of(head, set(head)), outputs, before=before, after=after)


def _build_rest(gm, rest, rest_set, outputs, streams) -> Piece:
    """Rest = the remaining blocks; it also returns `result - source` for every stream
    (the sources are its inputs, which it never writes into: see `_build`)."""

    def source(graph, placeholders, stream: Stream) -> Node:
        if stream.dim is None:
            return placeholders[stream.sources[0]]
        parts = [placeholders[s] for s in stream.sources]
        return graph.create_node("call_function", torch.cat, (parts, stream.dim), name="wavepass_joined")

    def after(graph, env, placeholders):
        return tuple(
            _sub(graph, env[s.result], source(graph, placeholders, s), "wavepass_residual")
            for s in streams
        )

    return _build(gm, rest, inputs_of(rest, rest_set), outputs, after=after)

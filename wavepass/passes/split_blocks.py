"""Split a graph into one submodule per block and per run of glue code between blocks.

Identical blocks then compile once: `structural_key` says when two block submodules are the
same program (same ops on inputs of the same shapes, strides, dtypes and devices; only the
weights, which are inputs, differ), and the compiler reuses one compiled body for all of them.

    before (one piece, e.g. `rest`)               after (outer graph calling submodules)
    -------------------------------------------   -------------------------------------------
    img, txt, temb, w1a, w1b, w2a, w2b ...        img, txt, temb, w1a, w1b, w2a, w2b ...
    transformer_blocks.1: linear(img, w1a) ...    block_0 = transformer_blocks_1(img, txt,
                          ... -> img1, txt1                     temb, w1a, w1b)
    transformer_blocks.2: linear(img1, w2a) ...   img1, txt1 = block_0[0], block_0[1]
                          ... -> img2, txt2       block_1 = transformer_blocks_2(img1, txt1,
    sub(img2, img)  (glue: the residual)                        temb, w2a, w2b)
    output(img2, residual)                        img2, txt2 = block_1[0], block_1[1]
                                                  glue_2 = glue_2(img2, img)
                                                  output(img2, glue_2[0])

A *block* is the set of nodes one composite indexed module call ran (`fx_facts.block_tag`:
an item of a `ModuleList`/`Sequential` that computes in submodules of its own), together
with the untagged nodes inside its range; *glue* is each maximal run of nodes between
blocks. A fragment of a block that only indexes (the `getitem`s of a block that
`partition` hoists into the head) is glue.
Submodule `meta["block"]` holds the block's tag (None for glue). Submodules take their
inputs in first-use order, so identical blocks take identical argument lists, followed by
the graph's size inputs (SymInt placeholders) whose symbols their values use: Inductor
compiles a part with symbolic sizes only if every symbol arrives as an input.

The split is refused (`UnsafeCut`) when compiling the parts separately could change the
result: blocks whose nodes interleave, or a part that writes in place into a value it did
not compute (a block doing `img += ...` on its input, as ComfyUI's do). It raises
`NoRepeatedBlocks` when the graph holds no block. The input graph is not changed.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.fx.node import map_arg

from .errors import NoRepeatedBlocks, UnsafeCut
from .fx_facts import (
    BlockTag, block_tag, example_value, in_submodule_of_block, inputs_of, size_inputs, written_bases,
)

_BODY_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Segment:
    """Nodes (in graph order) that become one submodule; `tag` is None for glue."""

    name: str
    tag: BlockTag | None
    nodes: tuple[Node, ...]


def split_blocks(gm: GraphModule) -> GraphModule:
    """The outer graph: `gm`'s placeholders and output, one `call_module` per segment."""
    segments = segments_of(gm)
    if not any(s.tag is not None for s in segments):
        raise NoRepeatedBlocks("no composite indexed block in the graph")
    _check_writes_stay_inside(segments)
    outer = Graph()
    env: dict[Node, Node] = {}
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = outer.node_copy(node)
            if node.op == "get_attr":
                root[node.target] = functools.reduce(getattr, node.target.split("."), gm)
    sizes = _size_symbols(gm)
    for segment in segments:
        inputs = _inputs(segment, sizes)
        root[segment.name] = _submodule(gm, segment, inputs, _outputs(segment))
        _call(outer, segment, inputs, env)
    outer.node_copy(gm.graph.find_nodes(op="output")[0], env.__getitem__)
    outer.lint()
    return GraphModule(root, outer)


def segments_of(gm: GraphModule) -> list[Segment]:
    """Blocks (by their node range) and the runs of glue between them, in graph order."""
    body = [n for n in gm.graph.nodes if n.op in _BODY_OPS]
    ranges = _block_ranges(body)
    segments: list[Segment] = []
    position = 0
    for tag, (first, last) in ranges:
        glue = body[position:first]
        if glue:
            segments.append(Segment(f"glue_{len(segments)}", None, tuple(glue)))
        name = f"{tag.stack}_{tag.index}".replace(".", "_")
        segments.append(Segment(name, tag, tuple(body[first : last + 1])))
        position = last + 1
    if body[position:]:
        segments.append(Segment(f"glue_{len(segments)}", None, tuple(body[position:])))
    return segments


def _block_ranges(body: list[Node]) -> list[tuple[BlockTag, tuple[int, int]]]:
    """(tag, (first, last) position in `body`) of every composite block, in graph order."""
    ranges: dict[BlockTag, list[int]] = {}
    composite: set[BlockTag] = set()
    for position, node in enumerate(body):
        tag = block_tag(node)
        if tag is None:
            continue
        ranges.setdefault(tag, [position, position])[1] = position
        if in_submodule_of_block(node) and node.target is not operator.getitem:
            composite.add(tag)
    ordered = sorted(((tag, tuple(r)) for tag, r in ranges.items() if tag in composite),
                     key=lambda item: item[1][0])
    for (before, (_, end)), (after, (start, _)) in zip(ordered, ordered[1:]):
        if start <= end:
            raise UnsafeCut(f"the nodes of blocks {before.stack}.{before.index} and "
                            f"{after.stack}.{after.index} interleave")
    return ordered


def _check_writes_stay_inside(segments: list[Segment]) -> None:
    for segment in segments:
        outside = written_bases(segment.nodes) - set(segment.nodes)
        if outside:
            raise UnsafeCut(
                f"`{segment.name}` writes in place into `{next(iter(outside)).name}`, which it "
                "did not compute; compiled apart, that write could not be proven exact"
            )


def _size_symbols(gm: GraphModule) -> dict[Any, Node]:
    """The graph's size inputs that are a bare symbol, by symbol."""
    exprs = {node: example_value(node).node.expr for node in size_inputs(gm)}
    return {expr: node for node, expr in exprs.items() if expr.is_symbol}


def _inputs(segment: Segment, sizes: dict[Any, Node]) -> list[Node]:
    """Values the segment reads and does not compute, in first-use order, then the size
    inputs whose symbols its values' sizes use (Inductor needs every symbol as an input)."""
    seen = inputs_of(segment.nodes, set(segment.nodes))
    used = free_symbols([example_value(n) for n in (*seen, *segment.nodes)])
    return seen + [node for symbol, node in sizes.items() if symbol in used and node not in seen]


def _outputs(segment: Segment) -> list[Node]:
    inside = set(segment.nodes)
    return [n for n in segment.nodes if any(user not in inside for user in n.users)]


def _submodule(gm: GraphModule, segment: Segment, inputs: list[Node], outputs: list[Node]) -> GraphModule:
    graph = Graph()
    env: dict[Node, Node] = {}
    for value in inputs:
        env[value] = graph.placeholder(value.name)
        env[value].meta = dict(value.meta)
    for node in segment.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in outputs))
    graph.lint()
    sub = GraphModule(gm, graph)
    sub.meta["block"] = segment.tag
    return sub


def _call(outer: Graph, segment: Segment, inputs: list[Node], env: dict[Node, Node]) -> None:
    """Call the segment's submodule and bind each of its outputs to a `getitem` of the call."""
    call = outer.call_module(segment.name, tuple(env[v] for v in inputs))
    for index, value in enumerate(_outputs(segment)):
        env[value] = outer.call_function(operator.getitem, (call, index))
        env[value].meta = dict(value.meta)


def structural_key(gm: GraphModule, example_inputs: Sequence[Any]) -> Hashable:
    """Equal keys: the same program on inputs of the same layout, so one compiled body serves
    both. Ops, targets and constant arguments are compared with node references numbered
    by position (placeholder names, which name the weights, are left out); inputs by sizes, strides and storage offset (symbolic ones by expression),
    dtype, device and `requires_grad`."""
    number = {node: f"%{i}" for i, node in enumerate(gm.graph.nodes)}
    ops = tuple(
        (node.op, "" if node.op == "placeholder" else repr(node.target),
         repr(map_arg((node.args, node.kwargs), number.__getitem__)))
        for node in gm.graph.nodes
    )
    return ops, tuple(_layout(x) for x in example_inputs)


def _layout(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return (tuple(map(str, value.shape)), tuple(map(str, value.stride())),
                str(value.storage_offset()), value.dtype, value.device, value.requires_grad)
    return type(value).__name__, str(value)

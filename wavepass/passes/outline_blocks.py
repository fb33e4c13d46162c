"""Replace every block of a repeated structure by a call of that structure's one subgraph.

The subgraph is compiled once and called for every block of the structure with the block's
own weights (`call_compiled_blocks` makes the calls of static subgraphs calls of a block
graph compiled on its own; Inductor lowers the others once per graph); the glue between
blocks stays inline. The calls are `torch.ops.higher_order.invoke_subgraph`, the operator
`torch.compiler.nested_compile_region` produces. A block whose structure occurs once (in
the graph, or among the graphs `occurrences` counts) stays inline, since a subgraph would
only add a call and block fusion with its neighbours, unless `every_block` asks for it too,
or, by default in the pipeline, where outlining it leaves the graph nothing but block calls
(SD3's last block, which differs from the others: as a subgraph call, `rest` is then only
block calls, which need no compile of their own; see `call_blocks_directly`).

    before (one piece, e.g. `rest`)               after
    -------------------------------------------   ----------------------------------------------
    img, txt, temb, w1a, w1b, w2a, w2b ...        img, txt, temb, w1a, w1b, w2a, w2b ...
    transformer_blocks.1: linear(img, w1a) ...    block_kind_0 = get_attr[block_kind_0]
                          ... -> img1, txt1       b1 = invoke_subgraph(block_kind_0, "block_kind_0",
    transformer_blocks.2: linear(img1, w2a) ...                        img, txt, temb, w1a, w1b)
                          ... -> img2, txt2       img1, txt1 = b1[0], b1[1]
    sub(img2, img)  (glue: the residual)          b2 = invoke_subgraph(block_kind_0, "block_kind_0",
    output(img2, residual)                                         img1, txt1, temb, w2a, w2b)
                                                  img2, txt2 = b2[0], b2[1]
                                                  sub(img2, img)
                                                  output(img2, residual)

A *block* is the set of nodes one composite indexed module call ran (`fx_facts.block_tag`:
an item of a `ModuleList`/`Sequential` that computes in submodules of its own), together
with the untagged nodes inside its range; *glue* is each maximal run of nodes between
blocks. A fragment of a block that only indexes (the `getitem`s of a block that
`partition` hoists into the head) is glue.

A block subgraph takes its inputs in first-use order, so identical blocks take identical
argument lists, followed by the graph's size inputs (SymInt placeholders) whose symbols its
values use: every symbol of a subgraph must arrive as an operand. `structural_key` says when
two blocks are the same program (same ops on inputs of the same shapes, strides, dtypes and
devices; only the weights, which are inputs, differ).

A subgraph's outputs must be fresh tensors that start their storage (see `_check_fresh`),
so a block's trailing views stay in the outer graph: FLUX's single block ends in two slices
of one tensor, `out[:, :txt_len]` and `out[:, txt_len:]`; its subgraph returns `out` and the
slices follow the call. The rewrite is refused (`UnsafeCut`) where a subgraph call could
differ from the inline code: blocks whose nodes interleave, a block that writes in place
into a value it did not compute (a block doing `img += ...` on its input, as ComfyUI's do),
or a block output that is still no fresh tensor. It raises `NoRepeatedBlocks` when no block
structure occurs twice. The input graph is not changed.
"""

from __future__ import annotations

import functools
import operator
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from .. import torch_api
from .errors import CannotCache, NoRepeatedBlocks, UnsafeCut
from .fx_facts import (
    BlockTag, block_tag, example_value, in_submodule_of_block, inputs_of, is_additive_glue, is_tensor, is_view,
    plain_static_tensors, size_inputs, written_bases,
)
from .subgraph import extract

_BODY_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True)
class Segment:
    """A block's nodes or a run of glue nodes, in graph order; `tag` is None for glue."""

    name: str
    tag: BlockTag | None
    nodes: tuple[Node, ...]


@dataclass(frozen=True)
class _Block:
    """A block as a subgraph: its nodes less the `leading` and trailing `views`, and the
    call's operands."""

    segment: Segment
    leading: tuple[Node, ...]
    views: tuple[Node, ...]
    inputs: list[Node]
    outputs: list[Node]
    graph: Graph
    key: Hashable


def outline_blocks(gm: GraphModule, occurrences: Mapping[Hashable, int] | None = None,
                   every_block: bool | None = False) -> GraphModule:
    """`gm` with each block whose structure repeats a call of that structure's subgraph
    (attribute `block_kind_<k>`, whose `meta["structure"]` is its `structural_key`); blocks
    of a structure that occurs once, and glue, are copied as they are. `every_block`: those
    blocks are outlined too; None: where that leaves `gm` nothing but calls of static
    structures and additive glue (`_leaves_only_calls`), so that it can run as Python.
    `occurrences` counts the structures over several graphs (`block_structures`, summed),
    so that a block alone in its graph is outlined too where its structure occurs in
    another; by default, over `gm` alone."""
    sizes = _size_symbols(gm)
    segments = segments_of(gm)
    blocks = {s: _block(gm, s, sizes) for s in segments if s.tag is not None}
    if occurrences is None:
        occurrences = Counter(block.key for block in blocks.values())
    repeated = {s: block for s, block in blocks.items() if occurrences.get(block.key, 0) > 1}
    if not repeated:
        raise NoRepeatedBlocks(f"no block structure occurs twice among the graph's {len(blocks)} block(s)")
    if every_block is None:
        every_block = len(repeated) < len(blocks) and _leaves_only_calls(gm, segments, blocks)
    outlined = blocks if every_block else repeated
    for block in outlined.values():
        _check_writes_stay_inside(block.segment)
        _check_fresh(block)
    graph = Graph()
    env: dict[Node, Node] = {}
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            env[node] = graph.node_copy(node)
            if node.op == "get_attr":
                root[node.target] = functools.reduce(getattr, node.target.split("."), gm)
    kinds: dict[Hashable, str] = {}
    for segment in segments:
        block = outlined.get(segment)
        if block is None:
            for node in segment.nodes:
                env[node] = graph.node_copy(node, env.__getitem__)
            continue
        if block.key not in kinds:  # a GraphModule (Python code) only per structure
            kinds[block.key] = f"block_kind_{len(kinds)}"
            root[kinds[block.key]] = subgraph = GraphModule(gm, block.graph)
            subgraph.meta["structure"] = block.key
        _call(graph, kinds[block.key], block, env)
    graph.node_copy(gm.graph.find_nodes(op="output")[0], env.__getitem__)
    graph.lint()
    return GraphModule(root, graph)


def block_structures(gm: GraphModule) -> Counter[Hashable]:
    """How many blocks of each structure `gm` holds."""
    sizes = _size_symbols(gm)
    return Counter(_block(gm, s, sizes).key for s in segments_of(gm) if s.tag is not None)


def _leaves_only_calls(gm: GraphModule, segments: list[Segment], blocks: dict[Segment, _Block]) -> bool:
    """Whether, every block outlined, `gm` would hold nothing but calls of static structures
    (which `call_compiled_blocks` turns into `wavepass.blocks` calls) and additive glue: no
    attribute read, no view beside a block, every block a subgraph that can be cut."""
    if gm.graph.find_nodes(op="get_attr"):
        return False
    for segment in segments:
        if segment.tag is None:
            if not all(map(is_additive_glue, segment.nodes)):
                return False
            continue
        block = blocks[segment]
        if block.leading or block.views or not plain_static_tensors(map(example_value, (*block.inputs, *block.outputs))):
            return False
        try:
            _check_writes_stay_inside(block.segment)
            _check_fresh(block)
        except CannotCache:
            return False
    return True


def _block(gm: GraphModule, segment: Segment, sizes: dict[Any, Node]) -> _Block:
    kept, leading, views = _peeled(segment)
    inputs, outputs = _inputs(kept, sizes), _outputs(kept)
    graph = extract(kept.nodes, inputs, outputs)
    return _Block(kept, leading, views, inputs, outputs, graph,
                  structural_key(graph, [example_value(v) for v in inputs]))


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


def _check_writes_stay_inside(block: Segment) -> None:
    outside = written_bases(block.nodes) - set(block.nodes)
    if outside:
        raise UnsafeCut(
            f"`{block.name}` writes in place into `{next(iter(outside)).name}`, which it did not "
            "compute; as a subgraph call, that write could not be proven exact"
        )


def _peeled(block: Segment) -> tuple[Segment, tuple[Node, ...], tuple[Node, ...]]:
    """The block without its leading and trailing views, and those views (each in graph
    order). Trailing: view-like ops and `getitem`s whose users all lie outside the block or
    are trailing views too. Leading: tensor views of values from outside the block, such as
    the indexing of a rotary embedding that the partition hoists out of every block but the
    first (which runs in the head): peeled, the first block has its followers' structure."""
    inside = set(block.nodes)
    peeled: set[Node] = set()
    for node in reversed(block.nodes):
        if is_view(node) and all(user not in inside or user in peeled for user in node.users):
            peeled.add(node)
    for node in block.nodes:  # a subgraph returns tensors: a `split`'s tuple stays inside
        if node in peeled and any(v in inside and v not in peeled and not is_tensor(v) for v in node.all_input_nodes):
            peeled.discard(node)
    leading = {n for n in block.nodes if n not in peeled and is_view(n) and is_tensor(n)
               and not any(v in inside for v in n.all_input_nodes)}
    kept = tuple(n for n in block.nodes if n not in peeled and n not in leading)
    return (Segment(block.name, block.tag, kept), tuple(n for n in block.nodes if n in leading),
            tuple(n for n in block.nodes if n in peeled))


def _check_fresh(block: _Block) -> None:
    """A subgraph's outputs must be fresh tensors that start their storage: Inductor 2.13
    lays a subgraph output out at the storage offset it had inside the subgraph, and then
    indexes the returned view, which already starts there, at that offset again."""
    seen: dict[Any, Node] = {}
    for node in (*block.inputs, *block.outputs):
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            continue
        storage = torch_api.storage_ref(value)
        if node in block.outputs and storage in seen:
            raise UnsafeCut(f"`{block.segment.name}` returns `{node.name}`, which shares memory with "
                            f"`{seen[storage].name}`; a subgraph's outputs must be fresh tensors")
        if node in block.outputs and not torch_api.statically_known_true(value.storage_offset() == 0):
            raise UnsafeCut(f"`{block.segment.name}` returns `{node.name}`, a view at a storage offset; "
                            "a subgraph's outputs must start their storage")
        seen.setdefault(storage, node)


def _size_symbols(gm: GraphModule) -> dict[Any, Node]:
    """The graph's size inputs that are a bare symbol, by symbol."""
    exprs = {node: example_value(node).node.expr for node in size_inputs(gm)}
    return {expr: node for node, expr in exprs.items() if expr.is_symbol}


def _inputs(segment: Segment, sizes: dict[Any, Node]) -> list[Node]:
    """Values the segment reads and does not compute, in first-use order, then the size
    inputs whose symbols its values' sizes use (Inductor needs every symbol as an input)."""
    seen = inputs_of(segment.nodes, set(segment.nodes))
    if not sizes:  # a static graph: no symbol to pass
        return seen
    used = torch_api.free_symbols([example_value(n) for n in (*seen, *segment.nodes)])
    return seen + [node for symbol, node in sizes.items() if symbol in used and node not in seen]


def _outputs(segment: Segment) -> list[Node]:
    inside = set(segment.nodes)
    return [n for n in segment.nodes if any(user not in inside for user in n.users)]


def _call(graph: Graph, kind: str, block: _Block, env: dict[Node, Node]) -> None:
    """Call subgraph `kind` on the block's inputs, bind each output to a `getitem` of the
    call, then copy the block's trailing views (its leading views go first)."""
    for node in block.leading:
        env[node] = graph.node_copy(node, env.__getitem__)
    subgraph = graph.get_attr(kind)
    call = graph.call_function(torch_api.invoke_subgraph(),
                               (subgraph, kind, *(env[v] for v in block.inputs)))
    call.meta["val"] = tuple(example_value(v) for v in block.outputs)
    for index, value in enumerate(block.outputs):
        env[value] = graph.call_function(operator.getitem, (call, index))
        env[value].meta = dict(value.meta)
    for node in block.views:
        env[node] = graph.node_copy(node, env.__getitem__)


def structural_key(graph: Graph, example_inputs: Sequence[Any]) -> Hashable:
    """Equal keys: the same program on inputs of the same kind, so one subgraph serves
    both. Ops, targets and constant arguments are compared with node references numbered
    by position (placeholder names, which name the weights, are left out); inputs by sizes,
    strides (symbolic ones by expression), tensor type (a subclass by name, with its inner
    tensors: `_tensor_type`), dtype, device and `requires_grad`.

    Two facts of a layout that Inductor's code for a graph never reads are left out, so
    FLUX's first single block, which reads the dual stack's two contiguous outputs, shares
    the structure of the later ones, which read two slices of one tensor: the stride of a
    dimension of size 1 (Inductor's indexing skips it) and the storage offset (the code gets
    each input's pointer, which includes it; on GPU, an input that the code assumes aligned
    is checked and copied on every call). A block that calls `as_strided` can address its
    input's storage from the start, so its inputs' offsets count."""
    number = {node: f"%{i}" for i, node in enumerate(graph.nodes)}
    ops = tuple(
        (node.op, "" if node.op == "placeholder" else _target_name(node.target),
         repr(map_arg((node.args, node.kwargs), number.__getitem__)))
        for node in graph.nodes
    )
    offsets = any("as_strided" in op[1] for op in ops)
    return ops, tuple(_input_key(x, offsets) for x in example_inputs)


def _target_name(target: Any) -> str:
    """A node target by name, not by `repr`: a function's repr holds its address, which
    differs between processes, and the key rides on the subgraph into Inductor's and
    AOTAutograd's on-disk cache keys."""
    if isinstance(target, str) or not hasattr(target, "__qualname__"):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{target.__qualname__}"


def _input_key(value: Any, offset: bool) -> Hashable:
    if isinstance(value, torch.Tensor):
        strides = tuple("-" if str(size) == "1" else str(stride) for size, stride in zip(value.shape, value.stride()))
        return (_tensor_type(value, offset), tuple(map(str, value.shape)), strides,
                str(value.storage_offset()) if offset else "-", value.dtype, value.device, value.requires_grad)
    return type(value).__name__, str(value)


def _tensor_type(value: torch.Tensor, offset: bool) -> Hashable:
    """What kind of tensor `value` is, by name: "Tensor" for a plain one (Dynamo records
    plain tensors and parameters as FakeTensors); for a tensor subclass, its class, and for
    a wrapper subclass (quantized or GGUF weights: `__torch_dispatch__` over inner tensors)
    also its flattening context and each inner tensor's type and layout (an int8 weight
    with a float scale is another program than a float weight of the same outer dtype).
    Two same-shaped blocks whose weights differ only here are different structures."""
    cls = type(value)
    if cls is torch.Tensor or cls is torch.nn.Parameter or isinstance(value, _plain_types()):
        return "Tensor"
    name = f"{cls.__module__}.{cls.__qualname__}"
    if not torch_api.is_wrapper_subclass(value):
        return name
    attributes, context = value.__tensor_flatten__()
    return name, repr(context), tuple((a, _input_key(getattr(value, a), offset)) for a in attributes)


@functools.cache
def _plain_types() -> tuple[type, ...]:
    """The classes a plain tensor has while Dynamo and AOTAutograd trace (fake, functional)."""
    return tuple(torch_api.plain_tensor_types())

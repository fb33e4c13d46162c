"""Pair each tensor that leaves a run of blocks with the stream it continues, and find which
values the model's output is computed from.

A transformer block updates its streams through residual connections (`x = x + f(x)`), so
the value a stream ends with is reachable from the value it started with along *identity
paths*: ops of the form "first argument + something" (`add` in every form, `x + y`, `x += y`,
`torch.add(x, y, alpha=a)`, `x.add_(y)`; the first operand of `sub`; `addcmul`/`addcdiv`,
function, method and in-place; `baddbmm`/`addmm`/`addbmm`/`addmv`/`addr` where the first
operand has the output's sizes and `beta` is 1), rescaling by a constant, dtype casts, copies,
clamps, and slices of concatenations (FLUX's single blocks concatenate the text and image
streams and split them again: the slice `h[:, T:]` of `cat([txt, img])` leads back to `img`,
not `txt`). A slice written in place (`x[:, :n] += y`) keeps the node of `x` in a Dynamo
graph: the value after it is still `x`, on the identity path.

    rest of the blocks                         trace_stream(out, candidates=[img0, txt0])
    ------------------------------------       ------------------------------------------
    h   = cat([txt0, img0], dim=1)             out -> getitem(h2, [:, T:])
    h2  = torch.addcmul(h, f(h), gate)         h2 = addcmul(h, ...) -> h[:, T:]
    out = h2[:, T:]                            h  = cat(...)[:, T:] -> img0   => img0

A stream may also continue a concatenation of first-block outputs as a whole: ComfyUI's Flux
joins its two stacks with `h = cat((txt, img), 1)` and runs the single blocks on `h`, so the
value that leaves the blocks continues `cat((txt0, img0), 1)` (`trace_concatenation`).

Which values an output is computed from is read the other way, walking back from the output
(`read_regions`), through every input of every op, keeping the region of a value that a slice
reads across ops that keep the sliced dimension apart (elementwise ops, casts, `linear` and
norms over later dimensions):

    epilogue (ComfyUI's Flux)                  read_regions(output, values=[h_N])
    ------------------------------------       ------------------------------------------
    img = h_N[:, T:]                           output <- linear <- ... <- layer_norm(img)
    img = layer_norm(img) * (1 + scale)        img = h_N[:, T:]        => {h_N: [h_N[:, T:]]}
    out = linear(img)                          (parts_read: the part `img0` of cat((txt0, img0)))

A pass uses these to know which first-block outputs a cached residual belongs to, and which
one decides. Nothing here changes the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence, Set
from typing import NamedTuple

import torch
from torch.fx import Node

from .. import torch_api
from .fx_facts import carries_data, example_value, op_name, same_sizes

_CAT = frozenset({torch.cat, torch.concat, torch.concatenate})
# "first argument + something": the first argument is on the identity path when the output has
# its sizes (and `beta`, the factor of the first argument where there is one, is 1).
_ACCUMULATE = frozenset({"add", "sub", "addcmul", "addcdiv", "baddbmm", "addmm", "addbmm", "addmv", "addr"})
# Rescaling by a constant keeps a stream (`x / output_scale_factor`).
_SCALE = frozenset({"mul", "div"})
# Ops that return a copy or a cast of their first argument (`to(other)` reads only other's type).
_CASTS = frozenset({"clone", "contiguous", "to", "float", "half", "bfloat16", "double", "type", "type_as"})
# Ops that return their first argument, a copy or a cast of it, element for element.
_SAME_VALUE = _CASTS | {"clamp", "clip"}
# Ops that compute each element from the same element of their operands (broadcast).
_ELEMENTWISE = _SCALE | frozenset(
    {"add", "sub", "addcmul", "addcdiv", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "abs", "square",
     "reciprocal", "sin", "cos", "tanh", "sigmoid", "relu", "gelu", "silu", "mish", "softplus", "elu",
     "leaky_relu", "hardswish", "hardsigmoid", "dropout", "clamp", "clip", "where", "lerp", "maximum",
     "minimum", "erf"}
)
# Ops that mix the elements of their first argument only along its last dimensions.
_NORMS = frozenset({"layer_norm", "rms_norm"})


class _Region(NamedTuple):
    """The slice `[start:stop]` along `dim` of a value; `None` stands for the whole value."""

    dim: int
    start: int
    stop: int


def trace_stream(value: Node, candidates: Collection[Node], within: Set[Node]) -> Node | None:
    """The latest candidate (in graph order) that `value` continues along an identity path.

    The search walks back from `value` through the nodes in `within` only; it returns
    None when no candidate is reachable.
    """
    order = {node: i for i, node in enumerate(value.graph.nodes)}
    found: set[Node] = set()
    wanted = set(candidates)

    def ends_at(node: Node, region: _Region | None) -> bool:
        if node in wanted and region is None:
            found.add(node)
            return True
        return node not in within

    _walk_back([(value, None)], _identity_sources, ends_at)
    return max(found, key=order.__getitem__, default=None)


class Concatenation(NamedTuple):
    """A value that continues `cat(parts, dim)`, each part continuing a candidate."""

    parts: tuple[Node, ...]
    dim: int


def trace_concatenation(value: Node, candidates: Collection[Node], within: Set[Node],
                        fallback: Collection[Node] = ()) -> Concatenation | None:
    """The candidates whose concatenation `value` continues as a whole, if any.

    Walks back from `value` along identity paths (within `within`) to a `cat` whose every
    part continues a candidate (`trace_stream`), or else one of `fallback` (a part that
    passes through the blocks unchanged continues a value from before them); the latest such
    `cat` in graph order wins.
    """
    order = {node: i for i, node in enumerate(value.graph.nodes)}
    seen: set[Node] = set()
    todo, joins = [value], []
    while todo:
        node = todo.pop()
        if node in seen or node not in within:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target in _CAT:
            joins.append(node)
            continue
        todo.extend(source for source, region in _identity_sources(node, None) if region is None)
    for join in sorted(joins, key=order.__getitem__, reverse=True):
        parts = [
            trace_stream(part, candidates, within) or trace_stream(part, fallback, within)
            if isinstance(part, Node) else None
            for part in join.args[0]
        ]
        if parts and all(p is not None for p in parts):
            return Concatenation(tuple(parts), _cat_dim(join))
    return None


def read_regions(output: Node, values: Set[Node], within: Set[Node]) -> dict[Node, list[_Region | None]]:
    """The regions of `values` that the data `output` returns is computed from.

    Walks back from `output` through the nodes in `within` along every input that carries data
    (a size read from a value is no data of it), keeping a region where an op keeps the sliced
    dimension apart (`_region_sources`); `None` stands for a whole value. Values not reached
    are left out.
    """
    found: dict[Node, dict[tuple | None, _Region | None]] = {}

    def ends_at(node: Node, region: _Region | None) -> bool:
        if node in values:
            found.setdefault(node, {})[_hashable(region)] = region
            return True
        return node not in within

    _walk_back([(n, None) for n in output.all_input_nodes if carries_data(n)], _region_sources, ends_at)
    return {node: list(regions.values()) for node, regions in found.items()}


def _walk_back(start: list[tuple[Node, _Region | None]],
               sources: Callable[[Node, _Region | None], list[tuple[Node, _Region | None]]],
               ends_at: Callable[[Node, _Region | None], bool]) -> None:
    """Visit every (value, region) reachable from `start` through `sources`, each once,
    going no further from those where `ends_at` is true."""
    seen: set[tuple[Node, tuple | None]] = set()
    todo = list(start)
    while todo:
        node, region = todo.pop()
        key = (node, _hashable(region))
        if key in seen:
            continue
        seen.add(key)
        if not ends_at(node, region):
            todo.extend(sources(node, region))


def parts_read(parts: Sequence[Node], dim: int, region: _Region | None) -> list[Node]:
    """The parts of `cat(parts, dim)` that `region` of it may hold elements of."""
    if region is None or region.dim != dim:
        return list(parts)
    return [part for part, _, _ in _overlapping_parts(parts, region)]


def _cat_dim(node: Node) -> int:
    """The dimension a `cat` node joins along, counted from the front."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % example_value(node).dim()


def _identity_sources(node: Node, region: _Region | None) -> list[tuple[Node, _Region | None]]:
    """The inputs of `node` whose values pass through it unchanged (with their regions)."""
    if node.op == "call_function" and node.target is operator.getitem:
        return _through_slice(node, region)
    if node.op == "call_function" and node.target in _CAT:
        return _through_cat(node, region)
    args, name = node.args, op_name(node)
    if not args or name is None:
        return []
    first = args[0]
    on_path = isinstance(first, Node) and same_sizes(first, node)
    if name in _ACCUMULATE:
        sources = [first] if on_path and node.kwargs.get("beta", 1) == 1 else []
        second = args[1] if len(args) > 1 else None
        if name == "add" and isinstance(second, Node) and same_sizes(second, node) and node.kwargs.get("alpha", 1) == 1:
            sources.append(second)  # `f(x) + x`: addition is symmetric
        return [(source, region) for source in sources]
    if name in _SCALE:
        scalar = args[1] if len(args) > 1 else None
        return [(first, region)] if on_path and isinstance(scalar, (int, float)) else []
    if name in _SAME_VALUE:
        return [(first, region)] if on_path else []
    return []


def _region_sources(node: Node, region: _Region | None) -> list[tuple[Node, _Region | None]]:
    """The inputs (with their regions) that the data of `region` of `node` is computed from:
    through a slice, the region it reads; through a `cat`, the parts the region overlaps;
    through an op that keeps the region's dimension apart, the same region of each operand
    that has that dimension (an operand broadcast along it is read whole); else every input
    that carries data, whole."""
    sliced = _through_slice(node, region) if node.target is operator.getitem else []
    if sliced:
        return sliced
    if node.op == "call_function" and node.target in _CAT and region is not None:
        parts = [p for p in node.args[0] if isinstance(p, Node)]
        if region.dim == _cat_dim(node):
            return [(part, inner) for part, inner, _ in _overlapping_parts(parts, region)]
        return [(part, region) for part in parts]
    everything = [(n, None) for n in node.all_input_nodes if carries_data(n)]
    name, first = op_name(node), node.args[0] if node.args else None
    if region is None or name is None or not isinstance(example_value(node), torch.Tensor):
        return everything
    if name in _CASTS and isinstance(first, Node):
        return [(first, region)]
    if name in _ELEMENTWISE:
        return [(n, _aligned(region, node, n)) for n, _ in everything]
    mixed = _mixed_last_dims(node, name)
    if mixed is not None and isinstance(first, Node) and region.dim < example_value(node).dim() - mixed:
        return [(n, region if n is first else None) for n, _ in everything]
    return everything


def _mixed_last_dims(node: Node, name: str) -> int | None:
    """How many last dimensions of its first argument `linear` or a norm mixes (None for
    other ops)."""
    if name == "linear":
        return 1
    if name in _NORMS:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return len(shape) if isinstance(shape, (list, tuple, torch.Size)) else None
    return None


def _aligned(region: _Region, node: Node, operand: Node) -> _Region | None:
    """`region` of `node`'s output as a region of an operand broadcast to it (None where the
    operand is broadcast along the region's dimension: every element reads all of it)."""
    value, out = example_value(operand), example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    dim = region.dim - (out.dim() - value.dim())
    if dim < 0 or not _known(value.shape[dim] == out.shape[region.dim]):
        return None
    return _Region(dim, region.start, region.stop)


def _overlapping_parts(parts: Sequence[Node], region: _Region) -> list[tuple[Node, _Region | None, bool]]:
    """The parts of a concatenation along `region.dim` that `region` may overlap, each with
    the region of it read and whether the part provably holds all of `region` (where it does
    not, the region read is None: the whole part)."""
    found, offset = [], 0
    for part in parts:
        value = example_value(part)
        if not isinstance(value, torch.Tensor):
            return [(p, None, False) for p in parts]
        size = value.shape[region.dim]
        if not (_known(region.stop <= offset) or _known(offset + size <= region.start)):
            contained = _known(offset <= region.start) and _known(region.stop <= offset + size)
            inner = _Region(region.dim, region.start - offset, region.stop - offset)
            found.append((part, _whole_or(inner, size) if contained else None, contained))
        offset = offset + size
    return found


def slice_region(node: Node) -> tuple[Node, _Region] | None:
    """For `source[..., a:b, ...]` (one sliced dimension, unit step): `(source, region)`."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    source, index = node.args
    source_value = example_value(source) if isinstance(source, Node) else None
    if not isinstance(source_value, torch.Tensor):
        return None
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None for i in index) or not all(isinstance(i, slice) for i in index):
        return None
    sliced = [(d, i) for d, i in enumerate(index) if i != slice(None)]
    if len(sliced) != 1:
        return None
    dim, piece = sliced[0]
    bounds = _bounds(piece, source_value.shape[dim])
    return (source, _Region(dim, *bounds)) if bounds is not None else None


def disjoint(a: _Region, b: _Region) -> bool:
    """Whether two regions of one tensor provably share no element."""
    return a.dim == b.dim and (_known(a.stop <= b.start) or _known(b.stop <= a.start))


def _through_slice(node: Node, region: _Region | None) -> list[tuple[Node, _Region | None]]:
    """`source[..., a:b, ...]`: the region of `source` that this slice reads."""
    found = slice_region(node)
    if found is None:
        return []
    source, (dim, start, stop) = found
    if region is not None:
        if region.dim != dim:
            return []
        start, stop = start + region.start, start + region.stop
    return [(source, _whole_or(_Region(dim, start, stop), example_value(source).shape[dim]))]


def _through_cat(node: Node, region: _Region | None) -> list[tuple[Node, _Region | None]]:
    """`cat(parts, dim)` seen through a region: the one part that holds all of the region."""
    if region is None or not isinstance(example_value(node), torch.Tensor) or _cat_dim(node) != region.dim:
        return []
    parts = node.args[0]
    if not all(isinstance(part, Node) for part in parts):
        return []
    found = _overlapping_parts(parts, region)
    return [(part, inner) for part, inner, _ in found] if len(found) == 1 and found[0][2] else []


def _hashable(region: _Region | None) -> tuple | None:
    """A region as a set key: symbolic bounds (unhashable SymInts) by their expression."""
    return None if region is None else tuple(str(v) for v in region)


def _known(condition) -> bool:
    """True only if provably true, for ints and symbolic sizes alike; never adds a guard."""
    return torch_api.statically_known_true(condition)


def _bounds(piece: slice, size):
    """(start, stop) of a unit-step slice of a dimension of `size`, or None if not provable."""
    if piece.step not in (None, 1):
        return None
    start = 0 if piece.start is None else _plain(piece.start)
    stop = size if piece.stop is None else _plain(piece.stop)
    bounds = []
    for bound in (start, stop):
        if _known(bound < 0):
            bound = size + bound
        if not _known(bound >= 0):
            return None
        bounds.append(size if _known(bound >= size) else bound)
    return tuple(bounds)


def _plain(value):
    """A slice bound as an int or SymInt (a graph node stands for the size it computed)."""
    return example_value(value) if isinstance(value, Node) else value


def _whole_or(region: _Region, size) -> _Region | None:
    return None if (_known(region.start == 0) and _known(region.stop == size)) else region

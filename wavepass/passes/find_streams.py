"""Pair each tensor that leaves a run of blocks with the stream it continues.

A transformer block updates its streams through residual connections (`x = x + f(x)`), so
the value a stream ends with is reachable from the value it started with along *identity
paths*: additions (either same-shaped operand), the first operand of a subtraction,
rescaling by a constant, dtype casts, copies, clamps, and slices of concatenations (FLUX's
single blocks concatenate the text and image streams and split them again: the slice
`h[:, T:]` of `cat([txt, img])` leads back to `img`, not `txt`).

    rest of the blocks                         trace_stream(out, candidates=[img0, txt0])
    ------------------------------------       ------------------------------------------
    h   = cat([txt0, img0], dim=1)             out -> getitem(h2, [:, T:])
    h2  = h + gate * proj(attn(h))             h2 = add(h, ...) -> h[:, T:]
    out = h2[:, T:]                            h  = cat(...)[:, T:] -> img0   => img0

A stream may also continue a concatenation of first-block outputs as a whole: ComfyUI's Flux
joins its two stacks with `h = cat((txt, img), 1)` and runs the single blocks on `h`, so the
value that leaves the blocks continues `cat((txt0, img0), 1)` (`trace_concatenation`).

A pass uses this to know which first-block outputs a cached residual belongs to. Nothing
here changes the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Set
from typing import NamedTuple

import torch
from torch.fx import Node

from .. import torch_api
from .fx_facts import example_value, same_shape, same_sizes

_ADD = frozenset({operator.add, operator.iadd, torch.add})
_SUB = frozenset({operator.sub, operator.isub, torch.sub})
_CAT = frozenset({torch.cat, torch.concat, torch.concatenate})
_CLAMP = frozenset({torch.clamp, torch.clip})
_SCALE = frozenset({operator.mul, operator.truediv, torch.mul, torch.div})
# Methods that return their input, or a copy or cast of it, element for element.
_SAME_VALUE_METHODS = frozenset(
    {"add", "add_", "sub", "sub_", "clone", "contiguous", "to", "float", "half", "bfloat16",
     "double", "type", "type_as", "clamp", "clamp_", "clip", "clip_"}
)


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
    seen: set[tuple[Node, tuple | None]] = set()
    todo: list[tuple[Node, _Region | None]] = [(value, None)]
    wanted = set(candidates)
    while todo:
        node, region = todo.pop()
        key = (node, _hashable(region))
        if key in seen:
            continue
        seen.add(key)
        if node in wanted and region is None:
            found.add(node)
            continue
        if node not in within:
            continue
        todo.extend(_identity_sources(node, region))
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


def _cat_dim(node: Node) -> int:
    """The dimension a `cat` node joins along, counted from the front."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % example_value(node).dim()


def _identity_sources(node: Node, region: _Region | None) -> list[tuple[Node, _Region | None]]:
    """The inputs of `node` whose values pass through it unchanged (with their regions)."""
    target, args = node.target, node.args
    is_method = node.op == "call_method"
    if node.op == "call_function" and target is operator.getitem:
        return _through_slice(node, region)
    if node.op == "call_function" and target in _CAT:
        return _through_cat(node, region)
    if not args or not isinstance(args[0], Node):
        return []
    name = target if is_method else None
    if (node.op == "call_function" and target in _ADD) or name in ("add", "add_"):
        operands = [a for a in args[:2] if isinstance(a, Node)]
        return [(a, region) for a in operands if same_shape(a, node)]
    if (node.op == "call_function" and target in _SCALE) or name in ("mul", "div"):
        # `x / output_scale_factor`: a constant rescaling keeps the stream
        scalar = args[1] if len(args) > 1 else None
        return [(args[0], region)] if isinstance(scalar, (int, float)) else []
    if (node.op == "call_function" and target in (_SUB | _CLAMP)) or name in _SAME_VALUE_METHODS:
        source = args[0]
        return [(source, region)] if same_sizes(source, node) else []
    return []


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
    if region is None:
        return []
    parts = node.args[0]
    if not isinstance(example_value(node), torch.Tensor) or _cat_dim(node) != region.dim:
        return []
    offset = 0
    for part in parts:
        part_value = example_value(part) if isinstance(part, Node) else None
        if not isinstance(part_value, torch.Tensor):
            return []
        size = part_value.shape[region.dim]
        if _known(offset <= region.start) and _known(region.stop <= offset + size):
            inner = _Region(region.dim, region.start - offset, region.stop - offset)
            return [(part, _whole_or(inner, size))]
        offset = offset + size
    return []


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

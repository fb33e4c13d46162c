"""Small read-only facts about FX nodes, shared by the passes.

Nothing here changes a graph: each function answers one question about a node of a Dynamo
graph (which module called it, what value it holds, whether it writes to its input).
"""

from __future__ import annotations

import operator
import re
from typing import NamedTuple

import torch
from torch.fx import GraphModule, Node

from .. import torch_api

# Tokens of a Dynamo module path that say how the path was written, not which module it names:
# "L['self'].__dict__['_modules']['transformer_blocks'].0" names self.transformer_blocks[0].
_PATH_NOISE = frozenset({"L", "self", "__dict__", "_modules", "G"})
_PATH_TOKEN = re.compile(r"\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(\d+)\s*\]|\.?([A-Za-z_0-9]+)")


class BlockTag(NamedTuple):
    """The repeated-block call a node belongs to: `stack[index]`, an instance of `cls_name`."""

    stack: str
    index: int
    cls_name: str


def module_path_tokens(path: str) -> tuple[str, ...]:
    """`"L['self'].__dict__['_modules']['blocks'].3.attn"` -> `("blocks", "3", "attn")`."""
    tokens = []
    for match in _PATH_TOKEN.finditer(path):
        token = next(group for group in match.groups() if group is not None)
        if token not in _PATH_NOISE:
            tokens.append(token)
    return tuple(tokens)


# The class recorded for a block whose own forward never ran: its parent called the block's
# items one by one (ComfyUI's UNet runs each `TimestepEmbedSequential`'s layers itself), so
# only the items' calls, `input_blocks.4.0`, `input_blocks.4.1`, are on the module stacks.
ITEMS_RUN_BY_PARENT = "(items run by parent)"


def block_tag(node: Node, outermost: bool = False) -> BlockTag | None:
    """The outermost indexed module (an item of a ModuleList or Sequential) that ran `node`.

    With `outermost`, the outermost indexed item on that module's path, whether or not it
    ran: `input_blocks.4` for a node that ran in `input_blocks.4.0`.
    """
    found = _block_entry(node, outermost)
    return found[0] if found else None


def in_submodule_of_block(node: Node, outermost: bool = False) -> bool:
    """Whether `node` ran in a submodule of its block (blocks are composite, layers are not);
    for a block whose items its parent ran, in a submodule of an item."""
    found = _block_entry(node, outermost)
    return found is not None and found[1] < len(node.meta["nn_module_stack"]) - 1


def _block_entry(node: Node, outermost: bool = False) -> tuple[BlockTag, int] | None:
    """(the node's block, the depth on its module stack of the call that found it)."""
    stack = node.meta.get("nn_module_stack") or {}
    for depth, (path, cls) in enumerate(stack.values()):
        tokens = module_path_tokens(path)
        indexed = [i for i, token in enumerate(tokens) if token.isdigit()]
        if not indexed or (not outermost and indexed[-1] != len(tokens) - 1):
            continue
        index = indexed[0] if outermost else len(tokens) - 1
        if index == len(tokens) - 1:
            cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        else:
            cls_name = ITEMS_RUN_BY_PARENT
        return BlockTag(".".join(tokens[:index]), int(tokens[index]), cls_name), depth
    return None


def inputs_of(nodes, inside: set[Node]) -> list[Node]:
    """Values read by `nodes` that are defined outside them (`inside`), in first-use order."""
    seen: dict[Node, None] = {}
    for node in nodes:
        for value in node.all_input_nodes:
            if value not in inside:
                seen.setdefault(value, None)
    return list(seen)


def size_inputs(gm: GraphModule) -> list[Node]:
    """The graph's size inputs: its SymInt placeholders (under dynamic shapes)."""
    return [n for n in gm.graph.find_nodes(op="placeholder") if isinstance(example_value(n), torch.SymInt)]


def example_value(node: Node):
    """The fake value Dynamo recorded for `node` (a FakeTensor, a SymInt, a tuple, ...)."""
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def is_tensor(node: Node) -> bool:
    return isinstance(example_value(node), torch.Tensor)


def plain_static_tensors(values) -> bool:
    """Whether every one of `values` is a plain tensor (no tensor subclass; fake and
    functional tensors are plain while Dynamo and AOTAutograd trace) whose sizes, strides
    and offset are plain integers."""
    values = list(values)
    plain = torch_api.plain_tensor_types()
    return (all(isinstance(v, torch.Tensor) and (type(v) is torch.Tensor or isinstance(v, plain)) for v in values)
            and not torch_api.free_symbols(values))


# Besides block calls and taking their outputs apart, a graph run as Python may only do
# elementwise additions and subtractions (residuals, ControlNet samples): one eager op each.
_ADDITIVE_GLUE = frozenset({operator.getitem, operator.add, operator.sub, torch.add, torch.sub})


def is_additive_glue(node: Node) -> bool:
    """Whether `node` takes a tuple apart or adds or subtracts: glue that a graph of block
    calls can run as Python (`call_blocks_directly`)."""
    return node.op == "call_function" and node.target in _ADDITIVE_GLUE


def carries_data(node: Node) -> bool:
    """Whether `node` holds data (a tensor, or a tuple of them), not a size or another number."""
    return not isinstance(example_value(node), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


# `operator` functions by the name of the op they run (in place or not).
_OPERATORS = {"iadd": "add", "isub": "sub", "imul": "mul", "truediv": "div", "itruediv": "div"}


def op_name(node: Node) -> str | None:
    """The op a call runs, one name for its function, method, operator and in-place forms:
    `torch.addcmul(x, ..)`, `x.addcmul(..)`, `x.addcmul_(..)` -> "addcmul"; `x + y`, `x += y`,
    `torch.add(x, y)`, `x.add_(y)` -> "add"; `x / 2`, `torch.div(x, 2)` -> "div"."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", None)
        if isinstance(name, str) and getattr(operator, name, None) is node.target:
            name = _OPERATORS.get(name, name)
    else:
        return None
    if not isinstance(name, str):
        return None
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def depends_on(node: Node, sources: set[Node]) -> bool:
    """Whether the data of `node` is computed from one of `sources` (or is one)."""
    seen: set[Node] = set()
    todo = [node]
    while todo:
        value = todo.pop()
        if value in sources:
            return True
        if value not in seen:
            seen.add(value)
            todo.extend(n for n in value.all_input_nodes if carries_data(n))
    return False


def same_sizes(a: Node, b: Node) -> bool:
    """Two tensors of provably the same sizes (symbolic sizes must be known equal)."""
    va, vb = example_value(a), example_value(b)
    return (
        isinstance(va, torch.Tensor)
        and isinstance(vb, torch.Tensor)
        and va.dim() == vb.dim()
        and all(torch_api.statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))
    )


def same_shape(a: Node, b: Node) -> bool:
    """Same sizes, dtype and device, provably."""
    va, vb = example_value(a), example_value(b)
    return same_sizes(a, b) and va.dtype == vb.dtype and va.device == vb.device


def written_bases(nodes) -> set[Node]:
    """The values (through their views) that `nodes` write into in place."""
    return {alias_root(n.args[0]) for n in nodes if is_inplace(n) and isinstance(n.args[0], Node)}


_INPLACE_FUNCTIONS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
)


def is_inplace(node: Node) -> bool:
    """Whether `node` writes into its first argument (`x += y`, `x.add_(y)`, `x[i] = y`)."""
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


_VIEW_METHODS = frozenset(
    {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
     "expand", "narrow", "select", "chunk", "split", "unbind", "view_as", "t", "contiguous"}
)


def is_view(node: Node) -> bool:
    """Whether `node` is a view-like op (or a `getitem`): its result may share its first
    argument's storage."""
    if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], Node):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.target is operator.getitem or name in _VIEW_METHODS


def alias_root(node: Node) -> Node:
    """Follow view-like ops (and `getitem`) back to the tensor whose storage `node` may share."""
    while is_view(node):
        node = node.args[0]
    return node

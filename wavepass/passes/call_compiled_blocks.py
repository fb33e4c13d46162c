"""Call block structures compiled on their own instead of lowering them inside the piece.

`outline_blocks` leaves each repeated block as an `invoke_subgraph` call of its structure's
subgraph, which Inductor lowers inside the piece. This pass turns the calls of the given
structures into calls of `torch.ops.wavepass.blocks` (`wavepass/block_op.py`), which runs a
structure compiled once for every piece: the piece no longer holds the subgraph. A chain of
calls, each block's outputs feeding only the next block, becomes one call.

    before (`rest` of SD3: blocks 1 and 2)            after
    ------------------------------------------------  -----------------------------------------
    b1 = invoke_subgraph(block_kind_0, "block_kind_0",  b2 = wavepass.blocks("wp_3f2a...",
                         img, temb, txt, w1a, w1b)              carry=[0, -1, 1, -1, -1],
    img1 = b1[0]                                                [img, temb, txt, w1a, w1b,
    txt1 = b1[1]                                                 temb, w2a, w2b])
    b2 = invoke_subgraph(block_kind_0, "block_kind_0",  img2 = b2[0]
                         img1, temb, txt1, w2a, w2b)    txt2 = b2[1]
    img2 = b2[0]
    txt2 = b2[1]

`carry[i]` is the output of the block before that a block takes as input i, or -1 where
the block takes its own operand (listed after the first block's, in order). Only static
structures qualify (`is_static`): plain tensor operands and outputs (no tensor subclass)
whose sizes and strides are plain integers. The calls of other structures, and everything else, are copied as they
are. The input graph is not changed.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

from torch.fx import Graph, GraphModule, Node

from .. import torch_api
from ..block_op import BLOCKS
from .fx_facts import example_value, is_inplace, plain_static_tensors


def call_compiled_blocks(gm: GraphModule, names: Mapping[str, str]) -> GraphModule:
    """`gm` with the calls of each subgraph attribute `kind` in `names` made calls of
    `wavepass.blocks(names[kind], carry, operands)`, a chain of calls one call (`_chains`);
    the called attributes are dropped."""
    chains = _chains(gm, names)
    folded = {n for chain in chains.values() for call in chain[:-1] for n in (call, *call.users)}
    graph = Graph()
    env: dict[Node, Node] = {}
    for node in gm.graph.nodes:
        if node in folded or (node.op == "get_attr" and node.target in names):
            continue
        if node in chains:
            first, *later = chains[node]
            carry = _carry(first, later[0]) if later else [-1] * (len(first.args) - 2)
            operands = [env[arg] for arg in first.args[2:]]
            for call in later:
                operands += [env[arg] for arg, source in zip(call.args[2:], carry) if source < 0]
            env[node] = graph.call_function(BLOCKS, (names[_called_kind(node)], carry, operands))
            env[node].meta = dict(node.meta)
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.lint()
    return GraphModule(gm, graph)  # copies only the attributes `graph` still reads


def blocks_called(node: Node) -> int:
    """How many blocks a `wavepass.blocks` call runs."""
    _, carry, operands = node.args
    fresh = sum(source < 0 for source in carry)
    return 1 + (len(operands) - len(carry)) // fresh


def _chains(gm: GraphModule, names: Mapping[str, str]) -> dict[Node, list[Node]]:
    """The calls of `names`' kinds grouped into chains, by each chain's last call. A call
    joins the chain of the call before it when both call one kind, the earlier call's outputs
    feed the later call alone, at the same operand positions as along the rest of the chain,
    and nothing between the two writes in place: so the chain can run where its last call
    is, each call on the previous call's outputs."""
    chains: list[list[Node]] = []
    between: list[Node] = []
    for node in gm.graph.nodes:
        if _called_kind(node) not in names:
            between.append(node)
            continue
        chain = chains[-1] if chains else None
        if chain is not None and _continues(chain, node, between):
            chain.append(node)
        else:
            chains.append([node])
        between = []
    return {chain[-1]: chain for chain in chains}


def _continues(chain: list[Node], call: Node, between: list[Node]) -> bool:
    last = chain[-1]
    carry = _carry(last, call)
    return (_called_kind(last) == _called_kind(call)
            and all(user.target is operator.getitem and set(user.users) <= {call} for user in last.users)
            and any(source >= 0 for source in carry) and any(source < 0 for source in carry)
            and (len(chain) == 1 or carry == _carry(chain[0], chain[1]))
            and not any(is_inplace(node) for node in between))


def _carry(call: Node, after: Node) -> list[int]:
    """For each operand of `after`: the output of `call` it is, or -1."""
    return [arg.args[1] if isinstance(arg, Node) and arg.target is operator.getitem and arg.args[0] is call
            else -1 for arg in after.args[2:]]


def is_static(subgraph: GraphModule) -> bool:
    """Plain tensor operands and outputs, none with a symbolic size, stride or offset.

    A block on a tensor subclass (quantized or GGUF weights) is not called by name: the
    piece that calls it is traced by AOTAutograd, which takes each subclass apart before any
    operator sees it, so `wavepass.blocks` would be handed whatever the subclass's
    `__torch_dispatch__` makes of the call (dequantized weights, say), not the operands its
    block graph was compiled for. Such a structure stays a subgraph of the piece, lowered
    with it by Inductor (outline_blocks' key keeps it apart from plain blocks)."""
    placeholders = subgraph.graph.find_nodes(op="placeholder")
    (outputs,) = subgraph.graph.find_nodes(op="output")[0].args
    return plain_static_tensors(example_value(n) for n in (*placeholders, *outputs))


def _called_kind(node) -> str | None:
    if node.op == "call_function" and node.target is torch_api.invoke_subgraph():
        return node.args[0].target
    return None
